"""BERT pretraining (masked LM + next-sentence prediction) on MLPerf shards, and the optimizer
comparison of notebook 06: THOR, its first-order counterpart (momentum SGD, same schedules) and AdamW,
each tuned on a grid of the same size, all from the same initialisation and data order.

The loss is MLPerf's: the encoder output is gathered at ``masked_lm_positions`` before the MLM head
(the head never sees the ~85% of positions that carry no label), the masked-LM loss is the
``masked_lm_weights``-weighted mean, plus the NSP cross-entropy. The model is transformers'
``BertForPreTraining``; its decoder shares the word-embedding matrix (THOR handles the pair).

The verbs: :func:`prepare_data`, :func:`build_model`, :func:`train` (the grid, in this process or,
for ``devices > 1``, on every rank under torchrun through :mod:`nbzoo.launch`; rank 0 writes the
runs) and :func:`evaluate_checkpoint` (``mode = "eval"``, the seed's ``pretrain_eval.py``).
``init_checkpoint`` (the seed's ``load_checkpoint_path``) gives every run its starting weights.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from itertools import chain, count, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import BertConfig, BertForPreTraining
from transformers.initialization import no_init_weights

from nbzoo import device as nbdevice
from nbzoo import fidelity, launch, length_grouping, packing, paths, progress
from nbzoo.data import mlperf
from nbzoo.device import Runtime
from nbzoo.optim.thor import THOR, PolySchedule
from nbzoo.train import TrainConfig, config_hash, epoch_batches, fit, global_mean

STEM = "06_bert_thor"
OPTIMIZERS = ("thor", "sgd", "adamw")
# The seed's figures (seeds/003_bert_thor.md, kept in nbzoo/seeds.toml): BERT-Large, MLPerf v0.7,
# THOR on 8 Ascend 910, batch 12 each -- MLM accuracy at its evaluation steps, and ms per step.
_SEED_REFERENCE = fidelity.reference(STEM)
SEED_ACCURACY = {
    int(name.split("@")[1]): value
    for name, value in _SEED_REFERENCE["metrics"].items()
    if name.startswith("mlm_accuracy_thor@")
}
SEED_MS_PER_STEP = float(_SEED_REFERENCE["ms_per_step"])

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


def pretraining_loss(model: BertForPreTraining, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """MLPerf's loss: weighted masked-LM cross-entropy + next-sentence cross-entropy."""
    scores, nsp = forward_heads(model, batch)
    weights = batch["masked_lm_weights"].float()
    per_token = nn.functional.cross_entropy(
        scores.float().flatten(0, 1), batch["masked_lm_ids"].flatten(), reduction="none"
    )
    mlm = global_mean((per_token * weights.flatten()).sum(), weights.sum() + 1e-5)
    return mlm + nn.functional.cross_entropy(nsp.float(), batch["next_sentence_labels"].flatten())


def packed_pretraining_loss(model: BertForPreTraining, batch: dict[str, torch.Tensor]):
    """:func:`pretraining_loss` of a batch from ``packing.MLPerfPackedCollator``: the samples
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
    return mlm + nn.functional.cross_entropy(nsp.float(), batch["next_sentence_labels"])


class PretrainingModel(nn.Module):
    """``BertForPreTraining`` whose forward takes an MLPerf batch and returns MLPerf's loss, so that
    the training loop (and DistributedDataParallel, which must see the forward) calls it directly."""

    def __init__(self, bert: BertForPreTraining):
        super().__init__()
        self.bert_pretraining = bert

    def forward(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if packing.is_packed(batch):
            return {"loss": packed_pretraining_loss(self.bert_pretraining, batch)}
        return {"loss": pretraining_loss(self.bert_pretraining, batch)}


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Sequence, rt: Runtime, batch_size: int = 256
) -> dict[str, float]:
    """Masked-LM accuracy (weighted, as MLPerf's eval), masked-LM loss and NSP accuracy."""
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
        hits += float(((scores.argmax(-1) == ids).float() * w).sum())
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


def baseline_accuracy(arrays: dict[str, np.ndarray]) -> tuple[float, int]:
    """Accuracy of always predicting the most frequent masked token (and that token's id)."""
    w = arrays["masked_lm_weights"] > 0
    ids = arrays["masked_lm_ids"][w]
    counts = np.bincount(ids)
    return float(counts.max() / len(ids)), int(counts.argmax())


def steps_to_target(evals: list[dict[str, float]], target: float) -> int | None:
    """The first evaluated step whose masked-LM accuracy is at or above ``target``."""
    for e in evals:
        if e["mlm_accuracy"] >= target:
            return int(e["step"])
    return None


# --- optimizers ------------------------------------------------------------------------------------


def make_optimizer(kind: str, model: nn.Module, lr: float, damping: float | None, cfg: Any):
    """(optimizer, scheduler) for one grid point. All three decay the learning rate with
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


def checkpoint_file(path: str | Path) -> Path:
    """The safetensors file of ``init_checkpoint``: the file itself, or a folder's
    model.safetensors."""
    path = paths.resolve(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.exists() or file.suffix != ".safetensors":
        raise FileNotFoundError(
            f"{file}: init_checkpoint must be a .safetensors file of BertForPreTraining weights or "
            "a folder holding model.safetensors (a run's checkpoint_dir/<run>/last); "
            "MindSpore .ckpt files are not read"
        )
    return file


@torch.no_grad()
def load_checkpoint(path: str | Path, model: BertForPreTraining) -> None:
    """Read BertForPreTraining weights into ``model`` in place, one tensor at a time (never a second
    copy of the whole model), from a safetensors file or a folder holding model.safetensors:
    transformers' ``save_pretrained`` layout or a training checkpoint of this notebook
    (``checkpoint_dir/<run>/last``). The decoder shares the word embeddings, so a file without it
    is complete. Every weight of ``model`` must be in the file (checked from the header before
    anything is read). MindSpore's ``.ckpt`` (the seed's format) is not read: convert it first."""
    from safetensors import safe_open

    file = checkpoint_file(path)
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


def train_one(
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
    tc = TrainConfig(
        epochs=max(1, math.ceil(cfg.max_steps * cfg.batch_size * rt.world_size / len(train_data))),
        batch_size=cfg.batch_size,
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
            cfg.get("init_checkpoint", ""),
            # packed runs see other batches (length: another order): not resumed across modes;
            # an unpacked run keeps the id it had before the knob existed
            *([f"packing={how}"] if (how := packing_for(kind, cfg)) != "off" else []),
        ),
    )

    def eval_fn(m):
        return evaluate(m, eval_data, rt, cfg.eval_batch_size)

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
                batch_plan=batch_plan_for(kind, cfg, train_data),
            )
    finally:
        if isinstance(opt, THOR):
            opt.remove_hooks()
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
    )


_INIT_EVAL: dict[str, dict[str, float]] = {}


def evaluate_init(cfg: Any, rt: Runtime, eval_data: Sequence, model: nn.Module) -> dict[str, float]:
    """Evaluation of the shared initial weights, held by ``model`` before its first step (computed
    once per initialisation)."""
    key = config_hash(cfg.model_config, cfg.seed, cfg.get("init_checkpoint", ""), len(eval_data))
    if key not in _INIT_EVAL:
        _INIT_EVAL[key] = evaluate(model, eval_data, rt, cfg.eval_batch_size)
    return _INIT_EVAL[key]


def grid_points(grid: dict[str, list[dict[str, float]]]) -> list[tuple[str, float, float | None]]:
    """(optimizer, lr, damping) for every grid point; THOR's points carry a damping."""
    points = []
    for kind, settings in grid.items():
        if kind not in OPTIMIZERS:
            raise ValueError(f"grid optimizer must be one of {', '.join(OPTIMIZERS)}; got {kind!r}")
        for s in settings:
            damping = s.get("damping") if kind == "thor" else None
            if kind == "thor" and damping is None:
                raise ValueError(f"THOR grid point {s} has no damping")
            points.append((kind, float(s["lr"]), damping))
    return points


def grid_workers(cfg: Any, rt: Runtime) -> int:
    """How many grid points train at once: ``cfg.grid_workers`` processes on a CPU (0: as many as
    :func:`nbzoo.device.cpu_share` allows at ``cfg.threads`` threads each), one everywhere else --
    a GPU, an NPU or a torchrun job trains its grid points one after the other."""
    requested = int(cfg.get("grid_workers") or 0) if "grid_workers" in cfg else 1
    if rt.kind != "cpu" or rt.world_size > 1:
        return 1
    if requested > 0:
        return requested
    return max(1, nbdevice.cpu_share() // max(1, int(cfg.get("threads") or 1)))


def _worker_threads(threads: int) -> None:  # a grid worker, on a CPU
    return_freed_memory()
    if threads:
        torch.set_num_threads(threads)


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


def run_grid(cfg: Any, rt: Runtime, train_data: Sequence, eval_data: Sequence) -> list[Run]:
    """Every grid point, from the same initial weights and data order; in grid order.

    On a CPU the points train in :func:`grid_workers` processes at once. Each run is seeded and
    single-process either way, so its result is the same as in a sequential grid (a test checks
    it); only its wall-clock is taken beside the others'."""
    if rt.kind == "cpu":
        return_freed_memory()
    points = grid_points(cfg.grid)
    workers = min(grid_workers(cfg, rt), len(points))
    if workers <= 1:
        return [
            train_one(kind, lr, damping, cfg, rt, train_data, eval_data)
            for kind, lr, damping in points
        ]
    # spawn, not fork: a forked child inherits the parent's OpenMP and autograd thread state
    context = multiprocessing.get_context("spawn")
    print(f"training {len(points)} grid points, {workers} at a time (one process each)", flush=True)
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_worker_threads, initargs=(cfg.get("threads"),)
    ) as pool:
        futures = {
            pool.submit(train_one, kind, lr, damping, cfg, rt, train_data, eval_data): i
            for i, (kind, lr, damping) in enumerate(points)
        }
        runs: list[Run | None] = [None] * len(points)
        for done, future in enumerate(as_completed(futures), 1):
            run = future.result()
            runs[futures[future]] = run
            print(
                f"[{done}/{len(points)}] {run.label}: final MLM accuracy "
                f"{run.final_accuracy:.4f} after {run.steps} steps ({run.train_seconds:.0f} s)",
                flush=True,
            )
    return [r for r in runs if r is not None]


def best_runs(runs: list[Run]) -> dict[str, Run]:
    """Per optimizer, the grid point with the highest final masked-LM accuracy."""
    best: dict[str, Run] = {}
    for r in runs:
        if r.optimizer not in best or r.final_accuracy > best[r.optimizer].final_accuracy:
            best[r.optimizer] = r
    return best


def comparison_metrics(
    best: dict[str, Run], baseline: float, paired: dict[str, float] | None = None
) -> dict[str, float]:
    """The metrics of results/06_bert_thor.json (NaN where a run or a crossing is missing).

    ``thor_step_time_ratio`` comes from :func:`paired_step_times` when given; the ratio of the two
    grid runs' medians is kept beside it as ``thor_step_time_ratio_sequential``."""
    nan = float("nan")
    m = {"baseline_accuracy": baseline}
    for kind in OPTIMIZERS:
        m[f"mlm_accuracy_{kind}"] = best[kind].final_accuracy if kind in best else nan
    if "sgd" in best:
        target = best["sgd"].final_accuracy
        m["target_accuracy"] = target
        for kind in ("thor", "sgd"):
            step = steps_to_target(best[kind].evals, target) if kind in best else None
            m[f"steps_to_target_{kind}"] = nan if step is None else float(step)
    if "thor" in best and "adamw" in best:
        sequential = sequential_step_time_ratio(best)
        m["thor_step_time_ratio"] = paired["ratio"] if paired else sequential
        if paired:
            m["thor_step_time_ratio_sequential"] = sequential
    return m


def sequential_step_time_ratio(best: dict[str, Run]) -> float:
    """THOR's median step time over AdamW's, from their separate grid runs."""
    return best["thor"].median_step_seconds() / best["adamw"].median_step_seconds()


def paired_step_times(
    cfg: Any, rt: Runtime, train_data: Sequence, best: dict[str, Run], steps: int | None = None
) -> dict[str, float]:
    """Median step time (forward, backward, optimizer step) of THOR and AdamW, each at its grid
    winner's setting, timed in alternation on the same batches from the same initial weights.

    The grid runs are minutes apart, and on a shared machine the speed drifts between them (the
    same THOR run measured 16.7 and 20.8 ms per median step twice in a row here), which swamps a
    ratio of medians taken from separate runs. Alternating step by step (who goes first swaps every
    step) puts both optimizers under the same conditions. ``steps`` defaults to
    ``max(100, 4 × frequency)``, so that THOR's statistics and refresh steps occur as in training."""
    steps = steps or max(100, 4 * cfg.frequency)
    contenders = []
    for kind in ("thor", "adamw"):
        model, opt, sched = start_from(kind, best[kind].lr, best[kind].damping, cfg, rt)
        contenders.append((kind, model.train(), opt, sched))
    # the batches training sees, from its first epoch on
    epochs = (epoch_batches(len(train_data), cfg.batch_size, cfg.seed, e) for e in count())
    times: dict[str, list[float]] = {"thor": [], "adamw": []}
    try:
        for i, rows in enumerate(islice(chain.from_iterable(epochs), steps)):
            batch = rt.to_device(mlperf.collate([train_data[r] for r in rows]))
            for kind, model, opt, sched in contenders[:: 1 if i % 2 == 0 else -1]:
                rt.synchronize()
                tick = time.perf_counter()
                with rt.autocast():
                    loss = model(**batch)["loss"]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if sched is not None:
                    sched.step()
                rt.synchronize()
                times[kind].append(time.perf_counter() - tick)
    finally:
        for _, _, opt, _ in contenders:
            if isinstance(opt, THOR):
                opt.remove_hooks()
    skip = min(2, steps - 1)  # the first steps allocate
    thor_ms, adamw_ms = (1e3 * float(np.median(times[k][skip:])) for k in ("thor", "adamw"))
    spread = {}  # of the steps: interquartile range, ms (THOR's refresh steps sit in its tail)
    for kind in ("thor", "adamw"):
        q3, q1 = np.percentile(times[kind][skip:], [75, 25])
        spread[f"{kind}_ms_iqr"] = 1e3 * float(q3 - q1)
    return {
        "thor_ms": thor_ms,
        "adamw_ms": adamw_ms,
        **spread,
        "ratio": thor_ms / adamw_ms,
        "steps": steps,
    }


def seed_step_metrics(run: Run) -> dict[str, float]:
    """THOR's accuracy at the seed's evaluation steps (1000 / 2000 / 3000), where this run has them."""
    at = {int(e["step"]): e["mlm_accuracy"] for e in run.evals}
    return {f"mlm_accuracy_thor@{s}": at[s] for s in SEED_ACCURACY if s in at}


def threshold_checks(m: dict[str, float]) -> list[dict[str, Any]]:
    """The issue's bars for the demo preset, evaluated on the computed metrics."""

    def row(name, value, bar, passed):
        return {"check": name, "value": value, "bar": bar, "passed": bool(passed)}

    thor, base = m.get("mlm_accuracy_thor", math.nan), m.get("baseline_accuracy", math.nan)
    s_thor = m.get("steps_to_target_thor", math.nan)
    s_sgd = m.get("steps_to_target_sgd", math.nan)
    ratio = m.get("thor_step_time_ratio", math.nan)
    return [
        row("THOR learns: mlm_accuracy_thor ≥ 2 × baseline", thor, 2 * base, thor >= 2 * base),
        row(
            "preconditioning pays: steps_to_target_thor ≤ 0.6 × steps_to_target_sgd",
            s_thor,
            0.6 * s_sgd,
            s_thor <= 0.6 * s_sgd,
        ),
        row("cost: thor_step_time_ratio ≤ 1.3", ratio, 1.3, ratio <= 1.3),
    ]


def step_time_ms(run: Run) -> dict[str, float]:
    """A run's whole step in milliseconds: mean (every step) and median."""
    return {
        "whole step (ms, mean)": 1e3 * run.train_seconds / max(run.steps, 1),
        "whole step (ms, median)": 1e3 * run.median_step_seconds(),
    }


def thor_cost_breakdown(run: Run) -> dict[str, float]:
    """THOR's extra work in milliseconds per step, averaged over the run, next to the step time."""
    steps = max(run.steps, 1)
    return {
        **{f"{k} (ms/step)": 1e3 * v / steps for k, v in run.timings.items()},
        **step_time_ms(run),
    }


# --- training, in this process or on every rank under torchrun ------------------------------------


def load_data(cfg: Any, world_size: int = 1):
    """(train, eval) datasets from ``cfg.data_dir``: eval = the first ``eval_samples`` samples."""
    folder = paths.resolve(cfg.data_dir)
    in_memory = cfg.preset == "demo"
    eval_data = mlperf.eval_split(folder, cfg.eval_samples, in_memory=in_memory)
    limit = cfg.train_samples or None
    train_data = mlperf.train_split(folder, cfg.eval_samples, limit, in_memory=in_memory)
    return train_data, eval_data


def train(
    cfg: Any,
    rt: Runtime,
    train_data: Sequence,
    eval_data: Sequence,
    workdir: str | Path | None = None,
) -> list[Run]:
    """The grid: in this process, or with ``devices`` (× ``nnodes``) > 1 on every rank under
    torchrun (files in ``workdir``), returning rank 0's runs."""
    if not launch.needed(cfg, rt):
        return run_grid(cfg, rt, train_data, eval_data)
    workdir = workdir or paths.results_dir(cfg.get("output_dir")) / f"{STEM}_torchrun"
    record = launch.run("nbzoo.pretraining:grid_on_rank", cfg, workdir)
    return [Run(**r) for r in record["runs"]]


def grid_on_rank(cfg: Any, rt: Runtime) -> dict[str, Any]:
    """The torchrun entry point (``nbzoo.launch``): every rank trains every grid point."""
    train_data, eval_data = load_data(cfg, rt.world_size)
    tick = time.perf_counter()
    runs = run_grid(cfg, rt, train_data, eval_data)
    return {
        "runs": [asdict(r) for r in runs],
        "world_size": rt.world_size,
        "seconds": time.perf_counter() - tick,
    }


def prepare_data(cfg: Any) -> list[Path]:
    """Write the sample shards (``data_source = "generate"``) or check the given ones (``"local"``);
    return the shard paths in name order."""
    folder = paths.resolve(cfg.data_dir)
    if cfg.data_source == "generate":
        spec = mlperf.SampleSpec(**cfg.sample_spec)
        return mlperf.generate_sample_shards(
            folder, cfg.num_samples, cfg.samples_per_shard, spec, seed=cfg.seed
        )
    if cfg.data_source != "local":
        raise ValueError(f"data_source must be generate or local; got {cfg.data_source!r}")
    return mlperf.list_shards(folder)
