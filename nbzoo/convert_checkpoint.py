"""Google / MLPerf BERT checkpoints (TensorFlow 1) and MindSpore's BERT ``.ckpt`` -> a transformers
``BertForPreTraining`` folder, without TensorFlow or MindSpore::

    python -m nbzoo.convert_checkpoint SRC OUT_DIR --config bert_config.json

``SRC`` is a TensorFlow 1 checkpoint prefix (``model.ckpt-28252`` for ``model.ckpt-28252.index``
and ``model.ckpt-28252.data-00000-of-00001``; the ``.index`` path works too) or a MindSpore
``.ckpt`` with the parameter names of MindSpore's BERT model zoo. ``--config`` is Google's
``bert_config.json`` (the MLPerf download's). ``OUT_DIR`` receives ``model.safetensors``,
``config.json`` and :data:`RECORD` (what was converted and skipped), in a folder nbzoo marks as
its own (:mod:`nbzoo.safe_write`), so that a later conversion may replace it.

Every weight of the configured ``BertForPreTraining`` must be in ``SRC`` as float32 with the shape
the configuration gives (TensorFlow's kernels transposed from ``[in, out]``); the decoder is tied to
the word embeddings as transformers ties it. Everything else -- optimizer slots (``.../adam_m``,
``.../adam_v``, MindSpore's ``moments.*``, THOR's ``matrix_A_inv`` ...), ``global_step`` -- is
skipped and reported. The checks run on the index before any tensor is read; then the tensors are
read, converted and written one at a time.

**Writing safetensors.** The ``safetensors`` library writes a whole dict of tensors at once
(``save_file`` serializes every tensor before writing), which would hold BERT-Large (1.3 GB) in
memory twice. So each converted tensor is written alone with ``safetensors.numpy.save_file`` into a
temporary folder, and the parts are then assembled into one ``model.safetensors``: the header (the
parts' own entries, offsets shifted) and the parts' data bytes, copied. The result is checked by
opening it with ``safe_open``. OUT_DIR is written through a temporary folder beside it and renamed
into place: a failure leaves nothing at OUT_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nbzoo import safe_write
from nbzoo.checkpoint_formats import FormatError, ms_ckpt, tf_bundle
from nbzoo.checkpoint_formats.bert_names import TIED, Sizes, Weight, bert_weights
from nbzoo.checkpoint_formats.bert_names import weight_name_pattern as weight_pattern

RECORD = "nbzoo-conversion.json"
OUTPUT_FILES = {"model.safetensors", "config.json", RECORD}
# Google's bert_config.json keys (google-research/bert modeling.BertConfig)
SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)
FLOAT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range")
DEFAULTS = {"max_position_embeddings": 512, "type_vocab_size": 16, "hidden_act": "gelu"}
# Google's modeling.get_activation names -> transformers' ACT2FN. Google's (and MLPerf's) ``gelu``
# is the tanh approximation (modeling.gelu), which transformers calls gelu_new; its "gelu" is erf's.
ACTIVATIONS = {"gelu": "gelu_new", "relu": "relu", "tanh": "tanh", "linear": "linear"}
TF_SLOT_SEPARATOR = "/"


class ConversionError(FormatError):
    pass


@dataclass
class Skipped:
    """The source's tensors that are not weights of the model."""

    optimizer_state: dict[str, list[str]] = field(default_factory=dict)  # by slot / prefix
    global_step: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)


@dataclass
class Result:
    out_dir: Path
    source_format: str
    converted: list[str]
    transposed: list[str]
    skipped: Skipped = field(default_factory=Skipped)
    ignored_config_keys: list[str] = field(default_factory=list)
    bytes_written: int = 0


# --- the configuration ----------------------------------------------------------------------


def read_bert_config(path: str | os.PathLike) -> dict[str, Any]:
    """Google's ``bert_config.json``, checked: the sizes positive integers, the rest known."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{path}: --config not found (Google's bert_config.json)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: not a JSON bert_config.json ({exc})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: a bert_config.json is a JSON object")
    config = {**DEFAULTS, **config}
    for key in SIZE_KEYS:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConversionError(f"{path}: {key} must be a positive integer; got {value!r}")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise ConversionError(
            f"{path}: hidden_size {config['hidden_size']} is not a multiple of "
            f"num_attention_heads {config['num_attention_heads']}"
        )
    for key in FLOAT_KEYS:
        if key in config and (
            isinstance(config[key], bool) or not isinstance(config[key], (int, float))
        ):
            raise ConversionError(f"{path}: {key} must be a number; got {config[key]!r}")
    if config["hidden_act"] not in ACTIVATIONS:
        raise ConversionError(
            f"{path}: hidden_act {config['hidden_act']!r} is none of Google's "
            f"{', '.join(ACTIVATIONS)}"
        )
    return config


def sizes(config: dict[str, Any]) -> Sizes:
    return Sizes(**{k: config[k] for k in Sizes.__dataclass_fields__})


def hf_config(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """transformers' ``config.json`` for ``BertForPreTraining`` from Google's keys, and the keys
    of Google's file it has no place for."""
    known = set(SIZE_KEYS) | set(FLOAT_KEYS) | {"hidden_act"}
    out = {
        "architectures": ["BertForPreTraining"],
        "model_type": "bert",
        **{k: config[k] for k in SIZE_KEYS},
        **{k: config[k] for k in FLOAT_KEYS if k in config},
        "hidden_act": ACTIVATIONS[config["hidden_act"]],
        "layer_norm_eps": 1e-12,  # modeling.layer_norm's epsilon (MindSpore's LayerNorm: 1e-7)
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
    }
    return out, sorted(set(config) - known - set(DEFAULTS))


# --- the sources ----------------------------------------------------------------------------


class _Source:
    """A checkpoint's tensors by name (``entries``: each with ``shape`` and ``dtype_name``), the
    file holding each, and their values one at a time."""

    format: str
    name_field: str  # the Weight field that names tensors in this format
    path: Path
    entries: dict[str, Any]

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> str:
        return self.entries[name].dtype_name

    def file_of(self, name: str) -> Path:
        return self.path

    def check(self, name: str) -> None:
        """Whatever can be checked of one tensor before any is read."""

    def read(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def slot_of(self, name: str, weights: set[str]) -> str | None:
        """The optimizer-state kind of a tensor that is not a weight, if it is one."""
        raise NotImplementedError


class _TF1(_Source):
    format, name_field = "TensorFlow 1 checkpoint", "google"

    def __init__(self, src):
        self.bundle = tf_bundle.Bundle(src)
        self.path = self.bundle.prefix
        self.entries = self.bundle.entries

    def file_of(self, name):
        entry = self.entries[name]
        return self.bundle.index if entry.partitioned else self.bundle.shard_path(entry.shard_id)

    def check(self, name):
        entry = self.entries[name]
        if entry.partitioned:
            raise ConversionError(
                f"{self.bundle.index}: tensor {name} is a partitioned variable, not read here"
            )
        self.bundle.check_extent(entry)

    def read(self, name):
        return self.bundle.read(self.entries[name])

    def slot_of(self, name, weights):
        """``bert/.../kernel/adam_m`` -> ``adam_m`` (Google's optimizers name slots so)."""
        parent, _, slot = name.rpartition(TF_SLOT_SEPARATOR)
        return slot if parent in weights or weight_pattern("google").fullmatch(parent) else None


class _MindSpore(_Source):
    format, name_field = "MindSpore checkpoint", "mindspore"

    def __init__(self, src):
        self.ckpt = ms_ckpt.Checkpoint(src)
        self.path = self.ckpt.path
        self.entries = self.ckpt.entries

    def read(self, name):
        return self.ckpt.read(self.entries[name])

    def close(self):
        self.ckpt.close()

    def slot_of(self, name, weights):
        """``moments.<weight>`` (MindSpore's optimizers clone parameters under a prefix) and
        ``<cell>.matrix_A_inv`` style state (bert_thor's THOR layers) -> the prefix or suffix."""
        pattern = weight_pattern("mindspore")
        prefix, _, rest = name.partition(".")
        if rest in weights or pattern.fullmatch(rest):
            return prefix
        cell, _, attr = name.rpartition(".")
        owned = (f"{cell}.{p}" for p in ("weight", "embedding_table"))
        if any(w in weights or pattern.fullmatch(w) for w in owned):
            return attr
        return None


def open_source(src: str | os.PathLike) -> _Source:
    """A TF1 prefix (or its ``.index`` / a data shard) or a MindSpore ``.ckpt`` file."""
    if tf_bundle.is_bundle(src):
        return _TF1(src)
    path = Path(src)
    if path.is_file():
        return _MindSpore(path)
    if path.is_dir():
        prefixes = sorted(str(p)[: -len(".index")] for p in path.glob("*.index"))
        hint = f"; its TensorFlow checkpoint prefixes: {', '.join(prefixes)}" if prefixes else ""
        raise ConversionError(f"{path}: a folder; SRC is a checkpoint prefix or file{hint}")
    raise ConversionError(
        f"{path}: no such checkpoint -- neither a TensorFlow 1 prefix ({path}.index not found) "
        "nor a MindSpore .ckpt file"
    )


# --- the plan: every check before any tensor is read ----------------------------------------


def plan(source: _Source, weights: list[Weight], config_path: Path, config: dict) -> dict:
    """The source name of each weight, checked against the configuration; the skipped names."""
    present = source.names()
    by_name = {getattr(w, source.name_field): w for w in weights}
    pattern = weight_pattern(source.name_field)
    missing = [name for name in by_name if name not in set(present)]
    if missing:
        stray = [n for n in present if n not in by_name and pattern.fullmatch(n)]
        raise ConversionError(
            f"{source.path}: no tensor {missing[0]} ({by_name[missing[0]].hf} of transformers)"
            f"{f' nor {len(missing) - 1} more of the configuration' if len(missing) > 1 else ''}"
            f"{_config_hint(config_path, config, stray)}"
        )
    for name in present:
        if name not in by_name and pattern.fullmatch(name):
            raise ConversionError(
                f"{source.path}: tensor {name} is a weight of a larger model than "
                f"{config_path} describes (num_hidden_layers {config['num_hidden_layers']})"
            )
    for name, weight in by_name.items():
        expected = weight.tf_shape if source.name_field == "google" else weight.shape
        shape = tuple(source.shape(name))
        if shape != expected:
            layout = " (TensorFlow's [in, out])" if weight.tf_transposed and shape else ""
            raise ConversionError(
                f"{source.file_of(name)}: tensor {name} has shape {list(shape)}; {config_path} "
                f"gives {list(expected)}{layout} ({_sizes_text(config)})"
            )
        if source.dtype(name) != "float32":
            raise ConversionError(
                f"{source.file_of(name)}: tensor {name} is {source.dtype(name)}; "
                "BertForPreTraining's weights are float32"
            )
        source.check(name)
    skipped = Skipped()
    weight_names = set(by_name)
    for name in present:
        if name == "global_step":
            skipped.global_step.append(name)
        elif name not in weight_names:
            slot = source.slot_of(name, weight_names)
            if slot:
                skipped.optimizer_state.setdefault(slot, []).append(name)
            else:
                skipped.other.append(name)
    return {"by_name": by_name, "skipped": skipped}


def _sizes_text(config: dict) -> str:
    return ", ".join(f"{k} {config[k]}" for k in SIZE_KEYS if k != "num_attention_heads")


def _config_hint(config_path: Path, config: dict, stray: list[str]) -> str:
    if stray:
        return f"; it holds {stray[0]}: is {config_path} this checkpoint's configuration?"
    return ""


# --- the output folder ----------------------------------------------------------------------


WRITER = "nbzoo.convert_checkpoint"
OUT_HINT = "choose another OUT_DIR or move it away"


def check_output(out_dir: Path) -> None:
    """OUT_DIR may be absent, empty, or an earlier conversion (nbzoo's marked folder,
    :mod:`nbzoo.safe_write`); anything else is the user's and is left alone."""
    try:
        safe_write.check_replaceable(out_dir, WRITER, what="OUT_DIR", hint=OUT_HINT)
    except safe_write.NotOursError as exc:
        raise ConversionError(str(exc)) from None


# --- writing --------------------------------------------------------------------------------


def write_part(folder: Path, index: int, name: str, array: np.ndarray) -> Path:
    from safetensors.numpy import save_file

    part = folder / f"{index:05d}.safetensors"
    save_file({name: np.ascontiguousarray(array)}, str(part))
    return part


def _part_header(part: Path) -> tuple[dict, int]:
    with open(part, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def assemble(parts: list[Path], dest: Path) -> int:
    """One safetensors file from one-tensor files written by the library, in their order; each
    part is deleted once copied. Returns the file's size."""
    entries, spans, offset = {}, [], 0
    for part in parts:
        header, data_start = _part_header(part)
        for name, info in header.items():
            begin, end = info["data_offsets"]
            entries[name] = {**info, "data_offsets": [offset, offset + end - begin]}
            spans.append((part, data_start + begin, end - begin))
            offset += end - begin
    text = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":"))
    header = text.encode("utf-8")
    header += b" " * (-len(header) % 8)  # data 8-byte aligned, as the library writes it
    with open(dest, "wb") as out:
        out.write(len(header).to_bytes(8, "little"))
        out.write(header)
        for part, start, size in spans:
            with open(part, "rb") as f:
                f.seek(start)
                copied = _copy(f, out, size)
            if copied != size:
                raise ConversionError(f"{part}: {copied} of {size} bytes copied")
            part.unlink()
    return dest.stat().st_size


def _copy(src, dst, size: int, chunk: int = 16 << 20) -> int:
    done = 0
    while done < size:
        block = src.read(min(chunk, size - done))
        if not block:
            break
        dst.write(block)
        done += len(block)
    return done


def _verify(file: Path, expected: dict[str, tuple[int, ...]]) -> None:
    from safetensors import safe_open

    with safe_open(str(file), framework="numpy") as f:
        keys = set(f.keys())
        if keys != set(expected):
            raise ConversionError(f"{file}: written with keys {sorted(keys ^ set(expected))[:3]}")
        for name, shape in expected.items():
            sl = f.get_slice(name)
            if tuple(sl.get_shape()) != shape or sl.get_dtype() != "F32":
                raise ConversionError(
                    f"{file}: {name} written as {sl.get_dtype()} {sl.get_shape()}"
                )


def convert(src: str | os.PathLike, out_dir: str | os.PathLike, config_path: str | os.PathLike,
            log=print) -> Result:  # fmt: skip
    """Convert ``src`` into ``out_dir`` (see the module's docstring)."""
    out_dir, config_path = Path(out_dir), Path(config_path)
    check_output(out_dir)
    config = read_bert_config(config_path)
    config_json, ignored = hf_config(config)
    weights = bert_weights(sizes(config))
    source = open_source(src)
    try:
        log(f"reading the {source.format} {source.path} ({len(source.names())} tensors)")
        planned = plan(source, weights, config_path, config)
        result = Result(out_dir, source.format, [], [], planned["skipped"], ignored)
        try:
            with safe_write.new_folder(out_dir, WRITER, what="OUT_DIR", hint=OUT_HINT) as tmp:
                parts_dir = tmp / "parts"
                parts_dir.mkdir()
                parts = []
                for i, (name, weight) in enumerate(planned["by_name"].items()):
                    array = source.read(name)
                    if source.name_field == "google" and weight.tf_transposed:
                        array = array.T
                        result.transposed.append(name)
                    parts.append(write_part(parts_dir, i, weight.hf, array))
                    result.converted.append(name)
                    del array
                model_file = tmp / "model.safetensors"
                result.bytes_written = assemble(parts, model_file)
                parts_dir.rmdir()
                _verify(model_file, {w.hf: w.shape for w in weights})
                (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
                (tmp / RECORD).write_text(
                    json.dumps(_record(src, config_path, result), indent=2) + "\n"
                )
        except safe_write.NotOursError as exc:  # OUT_DIR changed while converting
            raise ConversionError(str(exc)) from None
    finally:
        source.close()
    return result


def _record(src, config_path: Path, result: Result) -> dict[str, Any]:
    return {
        "written_by": "nbzoo.convert_checkpoint",
        "source": os.fspath(src),
        "source_format": result.source_format,
        "config": os.fspath(config_path),
        "converted": result.converted,
        "transposed_from_tf_in_out": result.transposed,
        "tied": TIED,
        "skipped": asdict(result.skipped),
        "ignored_config_keys": result.ignored_config_keys,
    }


def summary(result: Result) -> list[str]:
    """The command's report: what was converted, and every skipped tensor, counted and listed
    (optimizer state by kind -- one entry per weight -- the others by name)."""
    transposed = len(result.transposed)
    size = result.bytes_written
    lines = [
        f"converted {len(result.converted)} tensors"
        + (f" ({transposed} kernels transposed from TensorFlow's [in, out])" if transposed else "")
        + f" into {result.out_dir / 'model.safetensors'} "
        + (f"({size / 1e6:.1f} MB)" if size >= 1e6 else f"({size:,} bytes)")
        + " and config.json; the decoder is tied to the word embeddings",
    ]
    state = result.skipped.optimizer_state
    if state:
        counts = ", ".join(f"{slot} {len(names)}" for slot, names in state.items())
        lines.append(f"skipped {sum(map(len, state.values()))} optimizer state tensors ({counts}):")
        lines += [f"  {slot}: {', '.join(names)}" for slot, names in state.items()]
    if result.skipped.global_step:
        lines.append("skipped global_step")
    if result.skipped.other:
        lines.append(
            f"skipped {len(result.skipped.other)} other: {', '.join(result.skipped.other)}"
        )
    if result.ignored_config_keys:
        lines.append(
            f"bert_config.json keys with no place in config.json: {result.ignored_config_keys}"
        )
    lines.append(f"the record of it: {result.out_dir / RECORD}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nbzoo.convert_checkpoint",
        description="TensorFlow 1 (Google / MLPerf BERT) or MindSpore BERT checkpoint -> "
        "transformers BertForPreTraining (model.safetensors + config.json)",
    )
    parser.add_argument("src", help="TF1 checkpoint prefix (model.ckpt-28252) or MindSpore .ckpt")
    parser.add_argument("out_dir", help="the folder to write (absent, empty, or an earlier output)")
    parser.add_argument("--config", required=True, help="Google's bert_config.json")
    args = parser.parse_args(argv)
    try:
        result = convert(args.src, args.out_dir, args.config)
    except FormatError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only folder: nothing half-written is left
        print(f"error: cannot write {args.out_dir}: {exc}", file=sys.stderr)
        return 1
    for line in summary(result):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
