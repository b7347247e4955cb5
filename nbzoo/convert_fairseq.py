"""fairseq RoBERTa checkpoints (``model.pt``) → transformers ``RobertaForSequenceClassification`` /
``RobertaForMaskedLM``, saved as safetensors.

**Loading without running pickled code.** A fairseq checkpoint is a ``torch.save`` pickle holding
``{"args": argparse.Namespace, "model": state_dict, "optimizer_history": [...], "extra_state":
{...}}`` (newer ones: ``"args": None`` and the settings in a plain-dict ``"cfg"``); older ones
also pickle fairseq's meter objects. Pickle can call any importable function, so we unpickle through a restricted ``Unpickler`` (the pattern of the
Python docs' "Restricting Globals"): only an explicit list of globals resolves to real objects —
torch's tensor rebuilders and dtypes, ``OrderedDict``, ``argparse.Namespace``, numpy scalars and
arrays. Classes from ``fairseq.*`` and ``omegaconf.*`` (training bookkeeping, never weights) become
inert placeholders that only store their pickled state; any other global is refused with an error
naming it. ``torch.load(weights_only=True)`` with ``safe_globals`` cannot express the placeholders,
which is why this goes through ``pickle_module`` instead; no fairseq code is ever imported.

**Key names.** fairseq ≥ 0.10 names the RoBERTa encoder ``encoder.sentence_encoder.*`` with
``layers.N.self_attn.{q,k,v,out}_proj``, ``self_attn_layer_norm``, ``fc1``, ``fc2``,
``final_layer_norm``, ``layernorm_embedding``; the LM head is ``encoder.lm_head.{dense,layer_norm,
weight,bias}`` and classification heads ``classification_heads.<name>.{dense,out_proj}``.
Checkpoints of older fairseq releases may say ``decoder.`` for ``encoder.`` and ``emb_layer_norm``
for ``layernorm_embedding``, or pack q, k, v into ``in_proj_weight``; they are upgraded first, as
fairseq's own ``upgrade_state_dict_named`` methods do.
"""

from __future__ import annotations

import argparse
import builtins
import codecs
import collections
import contextlib
import copyreg
import os
import pickle
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification

from nbzoo import safe_write

TASKS = ("sequence-classification", "masked-lm")
DEFAULT_HEAD = "sentence_classification_head"  # fairseq's --classification-head-name default
INERT_MODULES = ("fairseq", "omegaconf")
# fairseq's activation names → transformers' (gelu_accurate is the tanh approximation).
ACTIVATIONS = {"gelu": "gelu", "gelu_accurate": "gelu_new", "gelu_fast": "gelu_new", "relu": "relu"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely or does not hold a RoBERTa model."""


# --- restricted unpickling --------------------------------------------------------------------


def _allowed_globals() -> dict[str, Any]:
    allowed: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "argparse.Namespace": argparse.Namespace,
        "copyreg._reconstructor": copyreg._reconstructor,  # its class arguments are restricted too
        "_codecs.encode": codecs.encode,  # how protocol 2 pickles bytes
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        "numpy.dtype": np.dtype,
        "numpy.ndarray": np.ndarray,
        "typing.Any": Any,
    }
    for name in ("set", "frozenset", "slice", "complex", "bytearray", "dict", "list", "tuple"):
        allowed[f"builtins.{name}"] = getattr(builtins, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[f"torch.{name}"] = getattr(torch, name)
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[f"{core}.scalar"] = np._core.multiarray.scalar
        allowed[f"{core}._reconstruct"] = np._core.multiarray._reconstruct
    return allowed


class Placeholder:
    """Stands in for a fairseq / omegaconf object found in a checkpoint: keeps what was pickled,
    runs none of its code."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        # Unpickling creates objects with __new__ alone (NEWOBJ) or by calling the class (REDUCE).
        obj = object.__new__(cls)
        obj.args, obj.state, obj.items = args, None, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<placeholder for {self.qualname}>"


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle that names a global outside the allowed list (never loaded)."""


class RestrictedUnpickler(pickle.Unpickler):
    allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        qualname = f"{module}.{name}"
        if qualname in self.allowed:
            return self.allowed[qualname]
        if module.split(".")[0] in INERT_MODULES:
            return type(name, (Placeholder,), {"qualname": qualname, "__module__": __name__})
        raise RefusedGlobal(
            f"refusing to unpickle the global {qualname}: only tensors, OrderedDict, "
            "argparse.Namespace, numpy scalars/arrays and inert fairseq/omegaconf objects are loaded"
        )


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# What torch.load needs of a pickle module: Unpickler, load, and a name.
restricted_pickle = types.SimpleNamespace(
    __name__="nbzoo_restricted_pickle", Unpickler=RestrictedUnpickler, load=_restricted_load
)


@dataclass
class FairseqCheckpoint:
    path: Path
    model: dict[str, torch.Tensor]
    args: argparse.Namespace | None
    placeholders: list[str] = field(default_factory=list)

    def arg(self, name: str, default: Any = None) -> Any:
        return getattr(self.args, name, default) if self.args is not None else default


def load_checkpoint(path: str | os.PathLike) -> FairseqCheckpoint:
    """Load a fairseq ``model.pt`` on the CPU through the restricted unpickler."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint (fairseq's model.pt)")
    try:
        # weights_only=False only because weights_only=True forbids a pickle_module; every global
        # goes through RestrictedUnpickler.find_class above.
        state = torch.load(
            path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False
        )
    except RefusedGlobal as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001
        # Bytes that are not a torch checkpoint fail anywhere in torch's zip reader or in the
        # unpickler, with any of a dozen exception types (UnpicklingError, ValueError "unsupported
        # pickle protocol", EOFError, KeyError, struct.error, ...): all of them mean the same.
        why = "".join(c if c.isprintable() else "?" for c in str(exc))  # bytes of the file, often
        why = why if len(why) <= 100 else why[:100] + "..."
        raise CheckpointError(
            f"{path} is not a fairseq checkpoint ({type(exc).__name__}: {why})"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path}: expected a fairseq checkpoint, a dict with a 'model' state dict; got {got}"
        )
    model = state["model"]
    bad = [k for k, v in model.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{path}: 'model' holds non-tensor entries: {bad[:5]}")
    args = state.get("args")
    if args is not None and not isinstance(args, argparse.Namespace):
        args = None
    if args is None:
        args = _args_from_cfg(state.get("cfg"))
    found: set[str] = set()
    _find_placeholders({k: v for k, v in state.items() if k != "model"}, found)
    return FairseqCheckpoint(path, dict(model), args, sorted(found))


def _find_placeholders(obj: Any, found: set[str], depth: int = 0) -> None:
    if depth > 50:
        return
    if isinstance(obj, Placeholder):
        found.add(obj.qualname)
        children = [*obj.args, obj.state, *obj.items]
    elif isinstance(obj, dict):
        children = [*obj.keys(), *obj.values()]
    elif isinstance(obj, list | tuple | set | frozenset):
        children = list(obj)
    elif isinstance(obj, argparse.Namespace):
        children = list(vars(obj).values())
    else:
        return
    for child in children:
        _find_placeholders(child, found, depth + 1)


def _args_from_cfg(cfg: Any) -> argparse.Namespace | None:
    """fairseq ≥ 0.10 saves ``"args": None`` and ``"cfg"`` as plain containers
    (``OmegaConf.to_container``); the model's settings are ``cfg["model"]``."""
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if isinstance(model, argparse.Namespace):
        return model
    if isinstance(model, dict):
        return argparse.Namespace(**{str(k): v for k, v in model.items()})
    return None


# --- key names --------------------------------------------------------------------------------


def upgrade_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old fairseq names → current ones: decoder. → encoder., emb_layer_norm → layernorm_embedding,
    in_proj_weight/bias → q_proj, k_proj, v_proj (q first, then k, then v)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("decoder."):
            key = "encoder." + key[len("decoder.") :]
        key = key.replace(".emb_layer_norm.", ".layernorm_embedding.")
        if key.endswith(".in_proj_weight") or key.endswith(".in_proj_bias"):
            base, kind = key.rsplit(".in_proj_", 1)
            for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                out[f"{base}.{name}_proj.{kind}"] = part
            continue
        out[key] = value
    return out


ENC = "encoder.sentence_encoder."
# transformers' names of one encoder layer's modules -> fairseq's
LAYER_NAMES = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "self_attn_layer_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "output.LayerNorm": "final_layer_norm",
}
# Keys fairseq keeps that carry no weights.
_IGNORED_SUFFIXES = (".version", "._float_tensor")


def num_layers(sd: dict[str, torch.Tensor]) -> int:
    layers = {int(k[len(ENC) + 7 :].split(".")[0]) for k in sd if k.startswith(ENC + "layers.")}
    if not layers:
        raise CheckpointError(
            f"no '{ENC}layers.N.*' keys: not a fairseq RoBERTa state dict "
            f"(first keys: {list(sd)[:5]})"
        )
    return max(layers) + 1


def classification_heads(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """Head name → number of classes, for every ``classification_heads.<name>`` in the dict."""
    return {
        k.split(".")[1]: int(v.shape[0])
        for k, v in sd.items()
        if k.startswith("classification_heads.") and k.endswith(".out_proj.weight")
    }


def _tensor(sd: dict[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    """A tensor the config is read from, or a message naming what is missing."""
    value = sd.get(key)
    if value is None:
        raise CheckpointError(
            f"the state dict lacks {key!r}, which every fairseq RoBERTa encoder has "
            "(a truncated or foreign checkpoint?)"
        )
    if value.ndim != ndim:
        raise CheckpointError(f"{key} has shape {tuple(value.shape)}; expected {ndim} dimensions")
    return value


def roberta_config(
    ckpt: FairseqCheckpoint | None,
    sd: dict[str, torch.Tensor],
    num_labels: int = 2,
    num_attention_heads: int | None = None,
    **overrides: Any,
) -> RobertaConfig:
    """A ``RobertaConfig`` for the weights: sizes from the tensors, the rest from fairseq's args."""

    def arg(name, default=None):
        return ckpt.arg(name, default) if ckpt is not None else default

    layers = num_layers(sd)  # also refuses a state dict that is not RoBERTa's
    if arg("encoder_normalize_before", False) or ENC + "layer_norm.weight" in sd:
        raise CheckpointError(
            "pre-LayerNorm RoBERTa (encoder_normalize_before) has no transformers Roberta layout"
        )
    if not arg("no_scale_embedding", True):
        raise CheckpointError("scaled embeddings (no_scale_embedding=False) are not RoBERTa's")
    if arg("pooler_activation_fn", "tanh") != "tanh":
        raise CheckpointError("transformers' Roberta classifier uses tanh; the checkpoint does not")
    activation = arg("activation_fn", "gelu")
    if activation not in ACTIVATIONS:
        raise CheckpointError(f"activation {activation!r} has no transformers equivalent")
    heads = num_attention_heads or arg("encoder_attention_heads")
    if heads is None:
        raise CheckpointError(
            "the checkpoint has no args naming encoder_attention_heads: pass num_attention_heads"
        )
    vocab, hidden = _tensor(sd, ENC + "embed_tokens.weight", 2).shape
    values = dict(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        num_hidden_layers=layers,
        num_attention_heads=int(heads),
        intermediate_size=int(_tensor(sd, ENC + "layers.0.fc1.weight", 2).shape[0]),
        hidden_act=ACTIVATIONS[activation],
        hidden_dropout_prob=float(arg("dropout", 0.1)),
        attention_probs_dropout_prob=float(arg("attention_dropout", 0.1)),
        max_position_embeddings=int(_tensor(sd, ENC + "embed_positions.weight", 2).shape[0]),
        type_vocab_size=1,
        layer_norm_eps=1e-5,  # torch's LayerNorm default, which fairseq uses
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        num_labels=num_labels,
        tie_word_embeddings=not arg("untie_weights_roberta", False),
    )
    values.update(overrides)
    return RobertaConfig(**values)


def to_hf_state_dict(
    sd: dict[str, torch.Tensor], task: str, head_name: str | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an (upgraded) fairseq state dict to transformers' Roberta names.

    Returns the new dict and the fairseq keys left unused (other heads, or the LM head when
    converting for classification). A classification head missing from ``sd`` is simply absent
    from the result: the caller's model keeps its fresh head, as fairseq's fine-tuning does.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise CheckpointError(f"the state dict lacks {key!r}")
        used.add(key)
        return sd[key]

    out = {
        "roberta.embeddings.word_embeddings.weight": take(ENC + "embed_tokens.weight"),
        "roberta.embeddings.position_embeddings.weight": take(ENC + "embed_positions.weight"),
        "roberta.embeddings.LayerNorm.weight": take(ENC + "layernorm_embedding.weight"),
        "roberta.embeddings.LayerNorm.bias": take(ENC + "layernorm_embedding.bias"),
    }
    hidden = out["roberta.embeddings.word_embeddings.weight"].shape[1]
    # RoBERTa has no segments: transformers' single token-type row must add nothing.
    out["roberta.embeddings.token_type_embeddings.weight"] = torch.zeros(
        1, hidden, dtype=out["roberta.embeddings.word_embeddings.weight"].dtype
    )
    for i in range(num_layers(sd)):
        for hf_name, fs_name in LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                out[f"roberta.encoder.layer.{i}.{hf_name}.{kind}"] = take(
                    f"{ENC}layers.{i}.{fs_name}.{kind}"
                )
    if task == "masked-lm":
        for hf_name, fs_name in (("dense", "dense"), ("layer_norm", "layer_norm")):
            for kind in ("weight", "bias"):
                out[f"lm_head.{hf_name}.{kind}"] = take(f"encoder.lm_head.{fs_name}.{kind}")
        out["lm_head.decoder.weight"] = take("encoder.lm_head.weight")
        out["lm_head.decoder.bias"] = out["lm_head.bias"] = take("encoder.lm_head.bias")
    else:
        heads = classification_heads(sd)
        name = head_name or (DEFAULT_HEAD if DEFAULT_HEAD in heads else None)
        if head_name and head_name not in heads:
            raise CheckpointError(
                f"no classification head {head_name!r} in the checkpoint (it has: "
                f"{', '.join(heads) or 'none'})"
            )
        if name is not None:
            for part in ("dense", "out_proj"):
                for kind in ("weight", "bias"):
                    out[f"classifier.{part}.{kind}"] = take(
                        f"classification_heads.{name}.{part}.{kind}"
                    )
    unused = [k for k in sd if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    stray = [k for k in unused if k.startswith(ENC)]
    if stray:
        raise CheckpointError(
            f"encoder weights with no place in transformers' Roberta: {stray[:5]} "
            "(a RoBERTa variant this converter does not know)"
        )
    return out, unused


@dataclass
class Converted:
    model: torch.nn.Module
    config: RobertaConfig
    unused_keys: list[str]
    initialized_keys: list[str]
    placeholders: list[str]


def convert(
    checkpoint: str | os.PathLike | FairseqCheckpoint,
    task: str = "sequence-classification",
    num_labels: int | None = None,
    head_name: str | None = None,
    id2label: dict[int, str] | None = None,
    **config_overrides: Any,
) -> Converted:
    """fairseq checkpoint → transformers model (eval mode), every converted tensor checked for shape.

    For ``sequence-classification`` without a matching head in the checkpoint (a pretrained
    ``roberta.base``), the classifier is freshly initialised, as fairseq's
    ``register_classification_head`` does before fine-tuning.
    """
    if num_labels is not None and (
        isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1
    ):
        raise CheckpointError(f"num_labels must be an integer >= 1, got {num_labels!r}")
    ckpt = checkpoint if isinstance(checkpoint, FairseqCheckpoint) else load_checkpoint(checkpoint)
    sd = upgrade_state_dict(ckpt.model)
    if num_labels is None:
        num_labels = classification_heads(sd).get(head_name or DEFAULT_HEAD, 2)
    if id2label is not None:
        config_overrides["id2label"] = dict(id2label)
        config_overrides["label2id"] = {v: k for k, v in id2label.items()}
    try:
        config = roberta_config(ckpt, sd, num_labels=num_labels, **config_overrides)
        hf_sd, unused = to_hf_state_dict(sd, task, head_name)
    except CheckpointError as exc:
        raise CheckpointError(f"{ckpt.path}: {exc}") from None
    model = (RobertaForMaskedLM if task == "masked-lm" else RobertaForSequenceClassification)(
        config
    )
    expected = model.state_dict()
    for key, value in hf_sd.items():
        if key not in expected:
            raise CheckpointError(
                f"{ckpt.path}: converted key {key} has no place in {type(model).__name__}"
            )
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{ckpt.path}: {key} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(expected[key].shape)} (num_labels={num_labels})"
            )
    result = model.load_state_dict(hf_sd, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(f"{ckpt.path}: unexpected keys {result.unexpected_keys[:5]}")
    initialized = [k for k in result.missing_keys if k != "lm_head.decoder.weight"]
    if task == "masked-lm" and initialized:
        raise CheckpointError(f"{ckpt.path}: the masked-LM model lacks {initialized[:5]}")
    model.eval()
    return Converted(model, config, unused, initialized, ckpt.placeholders)


WRITER = "nbzoo.convert_fairseq"


def check_output(folder: Path) -> None:
    """Refuse to replace anything but an absent or empty folder or nbzoo's own earlier output
    (marked, every file listed unchanged: nbzoo.safe_write)."""
    try:
        safe_write.check_replaceable(
            folder, WRITER, hint="choose another output folder or move this one away"
        )
    except safe_write.NotOursError as exc:
        raise CheckpointError(f"{exc}; nothing was written") from None


@contextlib.contextmanager
def _quiet_progress():
    """save_pretrained's progress bar (one shard) off: it would bury a one-line error."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_safetensors(model: torch.nn.Module, folder: str | os.PathLike) -> Path:
    """``save_pretrained`` (config.json + model.safetensors) into a temporary folder, then rename.

    An existing ``folder`` is replaced only when it is empty or nbzoo's earlier output; the
    temporary folder is removed whatever happens (a full disk leaves nothing behind, and is
    reported as an OSError whichever library's write met it)."""
    from safetensors import SafetensorError

    folder = Path(folder)
    check_output(folder)
    try:
        with safe_write.new_folder(folder, WRITER) as tmp, _quiet_progress():
            model.save_pretrained(tmp, safe_serialization=True)
    except SafetensorError as exc:  # safetensors' Rust writer: a full disk, a too large file
        raise OSError(str(exc)) from None
    except safe_write.NotOursError as exc:  # it appeared while saving
        raise CheckpointError(f"{exc}; nothing was written") from None
    return folder


def convert_to_safetensors(
    checkpoint: str | os.PathLike, folder: str | os.PathLike, **kwargs: Any
) -> Converted:
    check_output(Path(folder))  # before the conversion's work, not after
    converted = convert(checkpoint, **kwargs)
    save_safetensors(converted.model, folder)
    return converted


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """``python -m nbzoo.convert_fairseq model.pt OUT_DIR [--task masked-lm] [--num-labels N]``"""
    parser = argparse.ArgumentParser(
        description="fairseq RoBERTa model.pt → transformers safetensors"
    )
    parser.add_argument("checkpoint")
    parser.add_argument("output_dir")
    parser.add_argument("--task", choices=TASKS, default="sequence-classification")
    parser.add_argument("--num-labels", type=_at_least_one, default=None)
    parser.add_argument("--head", default=None, help="classification head name in the checkpoint")

    def one_line_error(message: str) -> None:  # argparse's usage block hides the one line
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)

    parser.error = one_line_error  # type: ignore[method-assign]
    args = parser.parse_args(argv)
    try:
        converted = convert_to_safetensors(
            args.checkpoint,
            args.output_dir,
            task=args.task,
            num_labels=args.num_labels,
            head_name=args.head,
        )
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only folder: nothing half-written is left
        print(f"error: cannot write {args.output_dir}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_dir} ({type(converted.model).__name__})")
    if converted.initialized_keys:
        print(
            f"freshly initialised (not in the checkpoint): {', '.join(converted.initialized_keys)}"
        )
    if converted.placeholders:
        print(f"ignored fairseq objects: {', '.join(converted.placeholders)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
