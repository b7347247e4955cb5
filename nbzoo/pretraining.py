"""BERT pretraining (masked LM + next-sentence prediction) on MLPerf shards: notebook 06's backend.

The loss is MLPerf's: the encoder output is gathered at ``masked_lm_positions`` before the MLM head
(the head never sees the ~85% of positions that carry no label), the masked-LM loss is the
``masked_lm_weights``-weighted mean, plus the NSP cross-entropy. The model is transformers'
``BertForPreTraining``; its decoder shares the word-embedding matrix (THOR handles the pair).

The verbs: :func:`prepare_data`, :func:`build_model`, :func:`train` (one run with one optimizer
setting: THOR, momentum SGD or AdamW) and :func:`evaluate` / :func:`evaluate_checkpoint`
(``mode = "eval"``, the seed's ``pretrain_eval.py``). ``init_checkpoint`` (the seed's
``load_checkpoint_path``) gives every run its starting weights. The comparison of the three
optimizers, each tuned on a grid, is :mod:`nbzoo.optimizer_comparison`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import BertConfig, BertForPreTraining
from transformers.initialization import no_init_weights

from nbzoo import length_grouping, packing, paths, progress, weights
from nbzoo.checkpoint_formats import tf_bundle
from nbzoo.data import mlperf
from nbzoo.device import Runtime
from nbzoo.optim import thor_spectra
from nbzoo.optim.thor import THOR, VARIANTS, PolySchedule
from nbzoo.train import TrainConfig, config_hash, fit

STEM = "06_bert_thor"
OPTIMIZERS = ("thor", "sgd", "adamw")
BERT_LARGE = {
    "vocab_size": 30522,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "initializer_range": 0.02,
}


def build_model(
    model_config: dict[str, Any], seed: int, initialize: bool = True
) -> BertForPreTraining:
    """A BertForPreTraining from a config dict (``"large"`` keys default to BERT-Large).

    ``initialize=False`` skips the random initialisation (6 s for BERT-Large on one core) and leaves
    the weights' memory as it comes: only for a model whose every weight is loaded next
    (:func:`load_checkpoint` checks that the file covers them all)."""
    torch.manual_seed(seed)
    if initialize:
        return BertForPreTraining(BertConfig(**{**BERT_LARGE, **model_config}))
    with no_init_weights():
        model = BertForPreTraining(BertConfig(**{**BERT_LARGE, **model_config}))
    model.tie_weights()  # no_init_weights skips init_weights, which also ties the decoder
    return model


def _gather(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return torch.gather(hidden, 1, index)


def forward_heads(model: BertForPreTraining, batch: dict[str, torch.Tensor]):
    """MLM scores at the masked positions (B × P × V) and NSP logits (B × 2)."""
    out = model.bert(
        input_ids=batch["input_ids"],
        attention_mask=batch["input_mask"],
        token_type_ids=batch["segment_ids"],
    )
    hidden = _gather(out.last_hidden_state, batch["masked_lm_positions"])
    return model.cls.predictions(hidden), model.cls.seq_relationship(out.pooler_output)


def pretraining_terms(model: BertForPreTraining, batch: dict[str, torch.Tensor]):
    """MLPerf's two loss terms: the ``masked_lm_weights``-weighted mean masked-LM cross-entropy
    (``mlm``, over the batch's masked tokens) and the mean next-sentence cross-entropy (``nsp``,
    over its samples)."""
    scores, nsp = forward_heads(model, batch)
    weights = batch["masked_lm_weights"].float()
    per_token = nn.functional.cross_entropy(
        scores.float().flatten(0, 1), batch["masked_lm_ids"].flatten(), reduction="none"
    )
    mlm = (per_token * weights.flatten()).sum() / (weights.sum() + 1e-5)
    return {
        "mlm": mlm,
        "nsp": nn.functional.cross_entropy(nsp.float(), batch["next_sentence_labels"].flatten()),
    }


def pretraining_loss(model: BertForPreTraining, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """MLPerf's loss: weighted masked-LM cross-entropy + next-sentence cross-entropy."""
    terms = pretraining_terms(model, batch)
    return terms["mlm"] + terms["nsp"]


def loss_counts(batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """What each term of the loss averages over (for the training loop's weighting of the
    micro-batches of a step, :func:`nbzoo.train.step_shares`): the masked-LM weights' sum and the
    samples."""
    return {
        "mlm": float(batch["masked_lm_weights"].float().sum()),
        "nsp": len(batch["next_sentence_labels"]),
    }


def loss_terms(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The training loop's ``loss_fn``: :class:`PretrainingModel`'s (or DDP's around it) terms."""
    out = model(**batch)
    return {"mlm": out["mlm"], "nsp": out["nsp"]}


def packed_pretraining_terms(model: BertForPreTraining, batch: dict[str, torch.Tensor]):
    """:func:`pretraining_terms` of a batch from ``packing.MLPerfPackedCollator``: the samples
    side by side in rows, attention block-diagonal, positions restarting per sample, NSP on each
    sample's [CLS]. The same weighted masked-LM mean and NSP mean as the padded batch's."""
    out = model.bert(
        input_ids=batch["input_ids"],
        token_type_ids=batch["segment_ids"],
        position_ids=batch["position_ids"],
        **packing.model_attention(model, batch["sequence_ids"]),
    )
    hidden = packing.gather_sequences(out.last_hidden_state, batch["masked_lm_positions"])
    scores = model.cls.predictions(hidden)
    first = packing.gather_sequences(out.last_hidden_state, batch["cls_positions"])
    nsp = model.cls.seq_relationship(model.bert.pooler(first[:, None, :]))
    weights = batch["masked_lm_weights"].float()
    per_token = nn.functional.cross_entropy(
        scores.float(), batch["masked_lm_ids"], reduction="none"
    )
    mlm = (per_token * weights).sum() / (weights.sum() + 1e-5)
    return {
        "mlm": mlm,
        "nsp": nn.functional.cross_entropy(nsp.float(), batch["next_sentence_labels"]),
    }


class PretrainingModel(nn.Module):
    """``BertForPreTraining`` whose forward takes an MLPerf batch and returns MLPerf's loss and its
    two terms, so that the training loop (and DistributedDataParallel, which must see the forward)
    calls it directly."""

    def __init__(self, bert: BertForPreTraining):
        super().__init__()
        self.bert_pretraining = bert

    def forward(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = (packed_pretraining_terms if packing.is_packed(batch) else pretraining_terms)(
            self.bert_pretraining, batch
        )
        return {"loss": terms["mlm"] + terms["nsp"], **terms}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Sequence,
    rt: Runtime,
    batch_size: int = 256,
    predictions: list[int] | None = None,
) -> dict[str, float]:
    """Masked-LM accuracy (weighted, as MLPerf's eval), masked-LM loss and NSP accuracy.

    ``predictions``, when given, receives the predicted token id at every masked position (weight
    > 0), in evaluation order: what :func:`masked_token_hits` scores item by item, so that two
    models evaluated on the same set compare paired."""
    model = getattr(model, "bert_pretraining", model)
    was_training = model.training
    model.eval()
    hits = weight = loss = nsp_hits = 0.0
    starts = range(0, len(dataset), batch_size)
    for start in progress.eval_bar(starts, "evaluate", disable=not rt.is_main):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = rt.to_device(mlperf.collate(rows))
        with rt.autocast():
            scores, nsp = forward_heads(model, batch)
        w = batch["masked_lm_weights"].float()
        ids = batch["masked_lm_ids"]
        predicted = scores.argmax(-1)
        hits += float(((predicted == ids).float() * w).sum())
        if predictions is not None:
            predictions.extend(predicted[w > 0].tolist())
        ce = nn.functional.cross_entropy(
            scores.float().flatten(0, 1), ids.flatten(), reduction="none"
        )
        loss += float((ce * w.flatten()).sum())
        weight += float(w.sum())
        nsp_hits += float((nsp.argmax(-1) == batch["next_sentence_labels"].flatten()).sum())
    model.train(was_training)
    return {
        "mlm_accuracy": hits / weight,
        "mlm_loss": loss / weight,
        "nsp_accuracy": nsp_hits / len(dataset),
    }


def masked_token_hits(predictions: Sequence[int], arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Per masked token of the evaluation set (weight > 0, in evaluation order), the weight where
    ``predictions`` (:func:`evaluate`'s, or a run's :attr:`Run.predictions`) got it right, else 0:
    the items of the masked-LM accuracy, whose weighted mean is that accuracy."""
    w = arrays["masked_lm_weights"]
    ids = arrays["masked_lm_ids"][w > 0]
    predictions = np.asarray(predictions)
    if predictions.shape != ids.shape:
        raise ValueError(
            f"{len(predictions)} predictions for the {len(ids)} masked tokens of this evaluation "
            "set: they come from another evaluation set"
        )
    return (predictions == ids).astype(float) * w[w > 0]


def baseline_accuracy(arrays: dict[str, np.ndarray]) -> tuple[float, int]:
    """Accuracy of always predicting the most frequent masked token (and that token's id)."""
    w = arrays["masked_lm_weights"] > 0
    ids = arrays["masked_lm_ids"][w]
    counts = np.bincount(ids)
    return float(counts.max() / len(ids)), int(counts.argmax())


# --- optimizers ------------------------------------------------------------------------------------


def make_optimizer(kind: str, model: nn.Module, lr: float, damping: float | None, cfg: Any):
    """(optimizer, scheduler) for one setting. All three decay the learning rate with
    MindSpore's polynomial (power 2 to 1e-6 over ``schedule_steps``); THOR also its damping
    (power 4 to 1e-6)."""
    lr_schedule = PolySchedule(lr, 1e-6, 2.0, cfg.schedule_steps)
    if kind in ("thor", "sgd"):
        opt = THOR(
            model,
            lr=lr_schedule,
            damping=PolySchedule(damping or 0.0, 1e-6, 4.0, cfg.schedule_steps),
            momentum=cfg.momentum,
            weight_decay=cfg.thor_weight_decay,
            frequency=cfg.frequency,
            stats_every=cfg.stats_every,
            stat_decay=cfg.stat_decay,
            block_size=cfg.block_size,
            trace_threshold=cfg.trace_threshold,
            clip_norm=cfg.clip_norm,
            precondition=kind == "thor",
            first_order=cfg.thor_first_order,
            layernorm=cfg.thor_layernorm,
            **thor_variant(cfg),
        )
        return opt, None
    if kind == "adamw":
        no_decay = {
            id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()
        }
        no_decay |= {id(p) for n, p in model.named_parameters() if n.endswith("bias")}
        params = list(model.parameters())
        groups = [
            {
                "params": [p for p in params if id(p) not in no_decay],
                "weight_decay": cfg.adamw_weight_decay,
            },
            {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_schedule(step) / lr)
        return opt, sched
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {kind!r}")


THOR_VARIANTS = tuple(VARIANTS)  # "mindspore" (the seed's code, THOR's default) | "nbzoo"
EVAL_SPLITS = ("in_training", "held_out")


def thor_variant(cfg: Any) -> dict[str, Any]:
    """THOR's structural choices for ``cfg.thor_variant`` (:data:`nbzoo.optim.thor.VARIANTS`):
    ``"mindspore"`` -- MindSpore's bert_thor, the seed's code: each refresh step's own statistics,
    biases first-order, the tied embedding under the embedding's factors; ``"nbzoo"`` -- running
    statistics every ``stats_every`` steps (decay ``stat_decay``), biases folded into A, the tied
    embedding as a sum of two Kronecker products."""
    name = cfg.get("thor_variant", "mindspore")
    if name not in VARIANTS:
        raise ValueError(f"thor_variant must be one of {', '.join(VARIANTS)}; got {name!r}")
    return dict(VARIANTS[name])


@dataclass
class Run:
    """One training run of the comparison."""

    optimizer: str
    lr: float
    damping: float | None
    history: list[dict[str, float]]
    evals: list[dict[str, float]]
    steps: int
    train_seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # THOR's cost breakdown
    refresh_log: list[dict[str, int]] = field(default_factory=list)
    # the last evaluation's predicted token at every masked position (masked_token_hits)
    predictions: list[int] = field(default_factory=list)
    # THOR: its factors' spectra at the end of the run (nbzoo.optim.thor_spectra)
    preconditioner: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        extra = f", damping {self.damping:g}" if self.damping is not None else ""
        return f"{self.optimizer} lr {self.lr:g}{extra}"

    @property
    def final_accuracy(self) -> float:
        return self.evals[-1]["mlm_accuracy"] if self.evals else float("nan")

    @property
    def diverged(self) -> bool:
        return not all(math.isfinite(h["loss"]) for h in self.history)

    def eval_seconds(self) -> list[float]:
        """Cumulative training wall-clock (evaluation excluded) at each evaluated step."""
        cum = np.cumsum([h["seconds"] for h in self.history])
        return [float(cum[e["step"] - 1]) if e["step"] > 0 else 0.0 for e in self.evals]

    def median_step_seconds(self, skip: int = 1) -> float:
        return float(np.median([h["seconds"] for h in self.history[skip:]]))


def initial_model(cfg: Any) -> BertForPreTraining:
    """The model every run of the comparison starts from: ``init_checkpoint`` (the seed's
    ``load_checkpoint_path``) where given, else the seeded random initialisation.

    Each run builds it anew, the same weights every time, instead of copying one kept state: a kept
    state would hold the weights a second time through the whole grid (1.3 GB for BERT-Large, on
    every rank)."""
    if cfg.get("init_checkpoint"):
        model = build_model(cfg.model_config, cfg.seed, initialize=False)
        load_checkpoint(cfg.init_checkpoint, model)
        return model
    return build_model(cfg.model_config, cfg.seed)


# Where the seed's starting point is published: MLPerf v0.7 BERT phase 2 starts from the reference
# phase-1 checkpoint, which MindSpore's model zoo converts to its .ckpt (tf2ms) for bert_thor.
PHASE1_SOURCE = (
    "MLPerf publishes the seed's starting point, the BERT phase-1 checkpoint, with the BERT input "
    "files: tf1_ckpt/model.ckpt-28252.index and .data-00000-of-00001 beside bert_config.json "
    '(mlcommons/training: retired_benchmarks/bert/README.md, "Location of the input files"; '
    "language_model/tensorflow/bert/README.md before July 2025)"
)


def convert_command(src: str, out: str | Path) -> str:
    return (
        f"python -m nbzoo.convert_checkpoint {src} {paths.shown(out)} "
        "--config DOWNLOAD/bert_config.json"
    )


def checkpoint_file(path: str | Path) -> Path:
    """The safetensors file of ``init_checkpoint``: the file itself, or a folder's
    model.safetensors. A missing one, or a TensorFlow / MindSpore checkpoint, is refused with
    where the phase-1 checkpoint is published and the command that converts it."""
    path = paths.resolve(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if file.is_file() and file.suffix == ".safetensors":
        return file
    if tf_bundle.is_bundle(path) or (path.is_file() and path.suffix == ".ckpt"):
        kind = "TensorFlow 1" if tf_bundle.is_bundle(path) else "MindSpore"
        raise ValueError(
            f"{path}: a {kind} checkpoint; init_checkpoint reads BertForPreTraining weights in "
            f"safetensors: convert it first with {convert_command(str(path), 'OUT_DIR')} and set "
            "init_checkpoint to OUT_DIR"
        )
    raise FileNotFoundError(
        f"{file}: not found. init_checkpoint is a .safetensors file of BertForPreTraining weights "
        "or a folder holding model.safetensors: a run's checkpoint_dir/<run>/last, or a converted "
        f"checkpoint. {PHASE1_SOURCE}; convert it with "
        f"{convert_command('DOWNLOAD/tf1_ckpt/model.ckpt-28252', path)}"
    )


@torch.no_grad()
def load_checkpoint(path: str | Path, model: BertForPreTraining) -> None:
    """Read BertForPreTraining weights into ``model`` in place, one tensor at a time (never a second
    copy of the whole model), from a safetensors file or a folder holding model.safetensors:
    transformers' ``save_pretrained`` layout or a training checkpoint of this notebook
    (``checkpoint_dir/<run>/last``). The decoder shares the word embeddings, so a file without it
    is complete. Every weight of ``model`` must be in the file (checked from the header before
    anything is read). TensorFlow 1 and MindSpore checkpoints (the seed's formats) are converted
    first by :mod:`nbzoo.convert_checkpoint`."""
    from safetensors import safe_open

    file = checkpoint_file(path)
    weights.read_safetensors_keys(file)  # a truncated file: named, with what is wrong
    expected = model.state_dict(keep_vars=True)  # the model's own tensors, to copy into
    with safe_open(str(file), framework="pt") as f:
        names = {k.removeprefix("bert_pretraining."): k for k in f.keys()}
        tied = {
            "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
            "cls.predictions.decoder.bias": "cls.predictions.bias",
        }
        for key, alias in tied.items():
            if key not in names and alias in names:
                names[key] = names[alias]
        missing = sorted(set(expected) - set(names))
        wrong = sorted(
            k
            for k in expected
            if k in names and tuple(f.get_slice(names[k]).get_shape()) != tuple(expected[k].shape)
        )
        if missing or wrong:
            raise ValueError(
                f"{file}: not this model_config's BertForPreTraining: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, other shapes {wrong[:5]}"
            )
        for key, tensor in expected.items():
            tensor.copy_(f.get_tensor(names[key]))
    weights.check_finite(model, file)


def evaluate_checkpoint(cfg: Any, rt: Runtime, eval_data: Sequence) -> dict[str, float]:
    """``mode = "eval"``, the seed's ``pretrain_eval.py``: masked-LM accuracy (and loss, NSP
    accuracy) of ``init_checkpoint`` on the evaluation set. On a run's last checkpoint it equals
    that run's final evaluation exactly."""
    if not cfg.get("init_checkpoint"):
        raise ValueError(
            "mode = eval needs init_checkpoint: a run's checkpoint_dir/<run>/last folder or a "
            ".safetensors file of BertForPreTraining weights"
        )
    model = initial_model(cfg)
    scores = evaluate(model.to(rt.device), eval_data, rt, cfg.eval_batch_size)
    print(f"evaluated {cfg.init_checkpoint} on {len(eval_data)} samples: {scores}")
    return scores


def start_from(
    kind: str, lr: float, damping: float | None, cfg: Any, rt: Runtime
) -> tuple[PretrainingModel, torch.optim.Optimizer, Any]:
    """(model, optimizer, scheduler) of one grid point, the model at :func:`initial_model`."""
    model = PretrainingModel(initial_model(cfg)).to(rt.device)
    opt, sched = make_optimizer(kind, model, lr, damping, cfg)
    return model, opt, sched


def packing_for(kind: str, cfg: Any) -> str:
    """The ``packing`` mode of one grid point: THOR keeps padded batches in the sampler's order,
    whatever the knob says: its curvature statistics average over every position of the batch,
    padding included, so packing would change them."""
    return "off" if kind == "thor" else packing.mode(cfg)


def collate_for(kind: str, cfg: Any):
    """MLPerf's padded batches, or the same samples packed: into rows of the shards' sequence
    length (``plain``), or each length-grouped step end to end in one row (``length``, attended
    per sample: ``nbzoo.varlen_attention``)."""
    how = packing_for(kind, cfg)
    if how == "off":
        return mlperf.collate
    return packing.MLPerfPackedCollator(one_row=how == "length")


def batch_plan_for(kind: str, cfg: Any, train_data: Sequence):
    """None (the loop's own seeded order), or with ``packing = "length"`` the same permutation
    grouped by length within windows of steps; a sample's length is read when its window is
    first reached, not the whole data up front."""
    if packing_for(kind, cfg) != "length":
        return None

    def length_of(i: int) -> int:
        return int(np.asarray(train_data[i]["input_mask"]).sum())

    return length_grouping.batch_plan(length_of, len(train_data), cfg.batch_size, cfg.seed)


def epochs_read(cfg: Any, world_size: int, samples: int) -> int:
    """Passes over the ``samples`` training samples that ``max_steps`` optimizer steps of the global
    batch (batch_size × world_size × grad_accum) take: 1 for the seed's 3000 steps of 96 of its
    9,600,000 samples (config.py's epoch_size 1)."""
    global_batch = cfg.batch_size * world_size * cfg.get("grad_accum", 1)
    return max(1, math.ceil(cfg.max_steps * global_batch / samples))


def train(
    kind: str,
    lr: float,
    damping: float | None,
    cfg: Any,
    rt: Runtime,
    train_data: Sequence,
    eval_data: Sequence,
) -> Run:
    """Train from :func:`initial_model` with one optimizer setting; evaluate every
    ``cfg.eval_every``."""
    model, opt, sched = start_from(kind, lr, damping, cfg, rt)
    # the shared starting point, for the curves: evaluated now, on the model about to train (no
    # second model beside it); computed once per initialisation
    init_scores = evaluate_init(cfg, rt, eval_data, model)
    checkpoint_dir = None
    if cfg.checkpoint_dir:
        checkpoint_dir = paths.resolve(cfg.checkpoint_dir) / f"{kind}-lr{lr:g}-d{damping or 0:g}"
    grad_accum = cfg.get("grad_accum", 1)
    tc = TrainConfig(
        epochs=epochs_read(cfg, rt.world_size, len(train_data)),
        batch_size=cfg.batch_size,
        grad_accum=grad_accum,
        max_steps=cfg.max_steps,
        eval_every=cfg.eval_every,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=cfg.checkpoint_every or None,
        log_every=10,
        seed=cfg.seed,
        desc=f"{kind} lr={lr:g}" + (f" d={damping:g}" if damping is not None else ""),
        run_id=config_hash(
            kind,
            lr,
            damping,
            cfg.model_config,
            cfg.max_steps,
            cfg.batch_size,
            rt.world_size,
            grad_accum,
            cfg.get("init_checkpoint", ""),
            # packed runs see other batches (length: another order): not resumed across modes;
            # an unpacked run keeps the id it had before the knob existed
            *([f"packing={how}"] if (how := packing_for(kind, cfg)) != "off" else []),
        ),
    )

    predictions: list[int] = []  # of the latest evaluation: the final one once fit returns

    def eval_fn(m):
        predictions.clear()
        return evaluate(m, eval_data, rt, cfg.eval_batch_size, predictions)

    attention = packing.LENGTH_ATTENTION.get(packing_for(kind, cfg))
    try:
        with packing.attention_set(model.bert_pretraining, attention, rt.kind):
            result = fit(
                model,
                train_data,
                opt,
                rt,
                tc,
                collate_fn=collate_for(kind, cfg),
                scheduler=sched,
                eval_fn=eval_fn,
                loss_fn=loss_terms,
                loss_counts=loss_counts,
                batch_plan=batch_plan_for(kind, cfg, train_data),
            )
    finally:
        if isinstance(opt, THOR):
            opt.remove_hooks()
    if not predictions:  # resumed from a finished run's checkpoint: nothing evaluated here
        evaluate(model, eval_data, rt, cfg.eval_batch_size, predictions)
    evals = result.evals
    if not evals or evals[0]["step"] != 0:  # the shared starting point, for the curves
        evals = [{"step": 0, "epoch": 0, **init_scores}] + evals
    return Run(
        optimizer=kind,
        lr=lr,
        damping=damping,
        history=result.history,
        evals=evals,
        steps=result.steps,
        train_seconds=result.train_seconds,
        timings=dict(opt.timings) if isinstance(opt, THOR) else {},
        refresh_log=list(opt.refresh_log) if isinstance(opt, THOR) else [],
        predictions=list(predictions),
        # on the rank that reports (every rank holds the same factors)
        preconditioner=thor_spectra.layer_spectra(opt)
        if isinstance(opt, THOR) and rt.is_main
        else [],
    )


_INIT_EVAL: dict[str, dict[str, float]] = {}


def evaluate_init(cfg: Any, rt: Runtime, eval_data: Sequence, model: nn.Module) -> dict[str, float]:
    """Evaluation of the shared initial weights, held by ``model`` before its first step (computed
    once per initialisation)."""
    key = config_hash(cfg.model_config, cfg.seed, cfg.get("init_checkpoint", ""), len(eval_data))
    if key not in _INIT_EVAL:
        _INIT_EVAL[key] = evaluate(model, eval_data, rt, cfg.eval_batch_size)
    return _INIT_EVAL[key]


# glibc's M_MMAP_THRESHOLD (malloc.h): allocations from this size up get their own mapping
_M_MMAP_THRESHOLD, MMAP_FROM_BYTES = -3, 1 << 20


def return_freed_memory() -> bool:
    """For a CPU run: let every tensor of 1 MiB or more come from its own memory mapping, returned to the
    system when the tensor is freed. glibc's default moves that threshold up to 32 MiB after the
    first such free, so a step's activations (BERT-Large at 512 tokens: 2.3 GB, in pieces of 1 to
    16 MB) then come from malloc's heap, which keeps them once freed: the gradients and the
    momentum that follow take new memory beside them. Measured on notebook 06's full_8p rehearsal
    (two BERT-Large ranks): without it the ranks passed 8.2 GiB each and were stopped, with it they
    peak at 5.9 GiB. Process-wide; True where it applied (glibc on Linux)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_FROM_BYTES))
    except (OSError, AttributeError):  # not glibc: its own allocator, left as it is
        return False


def load_data(cfg: Any, world_size: int = 1):
    """(train, eval) datasets from ``cfg.data_dir``: eval = the first ``eval_samples`` samples.

    ``eval_split = "in_training"`` (the seed's): training reads every sample, those first ones
    too (``train_samples`` of them from the first; 0: all) -- the seed trains on all 9,600,000
    and evaluates on the first 10,000. ``"held_out"``: training starts after them, so the
    evaluation is on samples the run never trained on."""
    split = cfg.get("eval_split", "in_training")
    if split not in EVAL_SPLITS:
        raise ValueError(f"eval_split must be one of {', '.join(EVAL_SPLITS)}; got {split!r}")
    folder = paths.resolve(cfg.data_dir)
    in_memory = cfg.preset == "demo"
    model = {**BERT_LARGE, **cfg.model_config}
    limits = mlperf.Limits(
        model["vocab_size"], model["type_vocab_size"], model["max_position_embeddings"]
    )
    eval_data = mlperf.eval_split(folder, cfg.eval_samples, in_memory, limits)
    limit = cfg.train_samples or None
    skip = cfg.eval_samples if split == "held_out" else 0
    train_data = mlperf.train_split(folder, skip, limit, in_memory, limits)
    return train_data, eval_data


def prepare_data(cfg: Any) -> list[Path]:
    """Write the sample shards (``data_source = "generate"``) or check the given ones (``"local"``);
    return the shard paths in name order. ``init_checkpoint`` is checked first: the notebook's
    first step that reads its inputs."""
    if cfg.get("init_checkpoint"):
        checkpoint_file(cfg.init_checkpoint)  # a missing start fails here, before the data work
    folder = paths.resolve(cfg.data_dir)
    if cfg.data_source == "generate":
        spec = mlperf.SampleSpec(**cfg.sample_spec)
        return mlperf.generate_sample_shards(
            folder, cfg.num_samples, cfg.samples_per_shard, spec, seed=cfg.seed
        )
    if cfg.data_source != "local":
        raise ValueError(f"data_source must be generate or local; got {cfg.data_source!r}")
    return mlperf.list_shards(folder)
