"""The one training loop every notebook uses.

Why our own small loop and not HF Trainer or accelerate: the notebooks train HF models, a
second-order optimizer (THOR) that needs its own hooks, and models on three device kinds; they
need *exact* resume (same data order, RNG state and optimizer state mid-epoch) and a loop short
enough to read in a tutorial. The Trainer's internals change between transformers releases (the
seeds replaced trainer.py by hand for that reason); a 200-line loop over plain torch does not.

What it does: AMP through the Runtime (autocast, a dynamic loss scale for fp16, and for apex's O2
an fp16 model over fp32 master weights, :mod:`nbzoo.amp`), gradient accumulation (the global batch
of an optimizer step is ``batch_size × world_size × grad_accum``, its loss the mean over the whole
of it: see :func:`step_shares`), gradient clipping, evaluation each epoch (and every ``eval_every`` steps), atomic checkpoints
(model weights as safetensors, the rest with torch.save) with exact resume, a ``tqdm.auto``
progress bar, loss history and samples/s. Under torchrun (``WORLD_SIZE>1``) it wraps the model in
DistributedDataParallel and shards every epoch's permutation across ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch.utils.data import default_collate

from nbzoo import progress, safe_write, weights
from nbzoo.amp import MasterWeights
from nbzoo.device import Runtime

Batch = dict[str, Any]
Callback = Callable[[int, float, "TrainState"], None]
# A loss: one mean, or a mean per term (``{"mlm": ..., "nsp": ...}``) when the terms average over
# different things (masked tokens, sentences); and what each mean is over, counted in a batch.
Loss = torch.Tensor | Mapping[str, torch.Tensor]
Counts = float | Mapping[str, float]


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32  # per device, per micro-batch
    max_steps: int | None = None  # stop after this many optimizer steps in total
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    max_grad_norm: float | None = None
    eval_every: int | None = None  # optimizer steps; evaluation also runs at every epoch end
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int | None = (
        None  # optimizer steps; a checkpoint is also written at every epoch end
    )
    resume: bool = True  # continue from checkpoint_dir/last when it exists and run_id matches
    run_id: str = ""  # identity of the run (e.g. a hash of its config): a checkpoint of another run is not resumed
    log_every: int = 10
    seed: int = 0
    desc: str = "train"
    # Under torchrun: collate the whole global micro-batch on every rank and keep this rank's rows
    # (rank::world_size), so that a collator drawing random masks draws them as one process with
    # the global batch would.
    collate_global_batch: bool = False
    # Under torchrun: tell DistributedDataParallel the graph is the same every step (its
    # static_graph), for a model whose backward re-enters autograd (reversible layers) or whose
    # forward leaves a parameter unused -- both of which DDP otherwise refuses.
    ddp_static_graph: bool = False


@dataclass
class TrainState:
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    step: int = 0  # optimizer steps taken
    samples: int = 0
    train_seconds: float = 0.0
    run_id: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)


class Diverged(FloatingPointError):
    """The training loss (or the weights) became NaN or infinite: the run stops there, before
    that step is evaluated or checkpointed, so that nothing downstream reports or resumes it."""


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    evals: list[dict[str, float]]
    steps: int
    samples: int
    train_seconds: float
    resumed_from_step: int | None

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds > 0 else float("nan")

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else float("nan")


def config_hash(*parts: Any) -> str:
    """A short stable hash of a run's configuration, for ``TrainConfig.run_id``."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def epoch_order(n: int, seed: int, epoch: int, world_size: int = 1) -> list[int]:
    """An epoch's seeded permutation of ``n`` samples, padded as DistributedSampler pads it (its
    first samples repeated) to a multiple of ``world_size``, so that every rank gets as many."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if world_size > 1:
        per_rank = math.ceil(n / world_size)
        order = (order * world_size)[: per_rank * world_size]
    return order


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """This rank's micro-batches for one epoch: :func:`epoch_order` sharded like
    DistributedSampler (rank r takes every world_size-th sample from the r-th)."""
    order = epoch_order(n, seed, epoch, world_size)[rank::world_size]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def steps_per_epoch(samples: int, batch_size: int, world_size: int = 1, grad_accum: int = 1) -> int:
    """Optimizer steps in one epoch of ``samples`` (what :func:`fit` takes with
    :func:`epoch_batches`): ⌈samples / (batch_size × world_size × grad_accum)⌉, for the
    learning-rate schedules, which count optimizer steps."""
    return math.ceil(samples / (batch_size * world_size * grad_accum))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [
            torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            *np.random.get_state()[2:],
        ],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINTS = ("last", "previous", ".old")  # newest first; ".old": the layout before "previous"
WRITER = "nbzoo.train (training checkpoints)"


def checkpoint_folder(folder: str | os.PathLike) -> safe_write.Owned:
    """``folder`` as nbzoo's to write checkpoints in (nbzoo.safe_write): new, empty or marked; a
    folder holding files nbzoo did not write is refused before any training."""
    return safe_write.claim(
        folder,
        WRITER,
        what="checkpoint_dir",
        hint="name an empty or new checkpoint_dir, or move this folder away",
    )


def save_checkpoint(
    folder: str | os.PathLike,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    scaler,
    state: TrainState,
) -> Path:
    """Write ``folder/last`` atomically (a temporary folder, then renames), keeping the one
    before as ``folder/previous`` to fall back on if ``last`` is ever found broken. A save that
    fails (a full disk) removes its temporary folder and leaves both untouched. Only nbzoo's own
    checkpoints are replaced (nbzoo.safe_write)."""
    root = checkpoint_folder(folder)
    root.clean_dead_temporaries()
    with root.folder("next") as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict(),
                "rng": _rng_state(),
                "state": asdict(state),
            },
            tmp / "trainer_state.pt",
        )
    # at every moment at least one complete checkpoint exists under a name find_checkpoint reads
    if root.path("last").exists():
        root.rename("last", "previous")
    root.rename("next", "last")
    root.remove(".old")
    return root.path("last")


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when its files read back whole: the
    safetensors header must cover the file exactly, and every member of ``trainer_state.pt``
    (a zip archive) must match its CRC."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    weights, trainer = path / "model.safetensors", path / "trainer_state.pt"
    for f in (weights, trainer):
        if not f.is_file():
            return f"{f.name} is missing"
    try:
        with safe_open(str(weights), "pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as exc:
        return f"{weights.name} is unreadable ({exc})"
    try:
        with zipfile.ZipFile(trainer) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"{trainer.name} is unreadable ({exc})"
    if bad is not None:
        return f"{trainer.name} is corrupt (member {bad} fails its CRC)"
    return None


def find_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest intact checkpoint: ``last``, else ``previous`` (or ``.old``, from a save that
    died between renames). A broken one (truncated weights or trainer state) is named on
    stdout and moved aside to ``broken-<name>-<time>`` -- never deleted -- so that the run
    resumes from the one before instead of failing on every rerun."""
    folder = Path(folder)
    for name in CHECKPOINTS:
        path = folder / name
        if not path.is_dir():
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        set_aside(path, problem)
    return None


def set_aside(path: Path, problem: str) -> None:
    """Move the broken checkpoint ``path`` aside (``broken-<name>-<time>``, never deleted) and
    say so in one line; left in place when it is not nbzoo's to move."""
    folder = path.parent
    aside = folder / f"broken-{path.name.lstrip('.')}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not path.exists() or aside.exists():  # another rank set it aside first
        return
    try:
        if not safe_write.is_marked(folder):
            raise safe_write.NotOursError(f"{folder} carries no nbzoo marker")
        safe_write.Owned(folder, WRITER).move_aside(path.name, aside.name)
        note = f"set aside as {aside}"
    except FileNotFoundError:  # another rank set it aside first
        return
    except (OSError, safe_write.NotOursError) as exc:
        note = f"left in place ({exc}) and skipped"
    print(f"checkpoint {path} is broken: {problem}; {note}", flush=True)


def read_trainer_state(path: Path) -> dict:
    """``trainer_state.pt`` of the checkpoint ``path``, loaded without running pickled code
    (``weights_only``). A pickle that load refuses (objects of other code) raises
    :class:`BrokenCheckpoint` naming the file."""
    file = path / "trainer_state.pt"
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # torch's message leads with how to load it anyway; the line that says why is the point
        why = next((line for line in lines if line.startswith("WeightsUnpickler error")), None)
        why = re.sub(r"\x1b\[[0-9;]*m", "", why or (lines[0] if lines else type(exc).__name__))
        raise BrokenCheckpoint(
            f"{file.name} holds what torch.load(weights_only=True) refuses ({why})"
        ) from None


class BrokenCheckpoint(Exception):
    """A checkpoint whose files read back whole but whose trainer state cannot be loaded."""


def checkpoint_run_id(path: Path, blob: dict | None = None) -> str:
    blob = blob if blob is not None else read_trainer_state(path)
    return blob["state"].get("run_id", "")


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer, scheduler, scaler, blob: dict | None = None
) -> TrainState:
    load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
    weights.check_finite(model, path / "model.safetensors")
    blob = blob if blob is not None else read_trainer_state(path)
    optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None and blob["scheduler"] is not None:
        scheduler.load_state_dict(blob["scheduler"])
    scaler.load_state_dict(blob["scaler"])
    _set_rng_state(blob["rng"])
    return TrainState(**blob["state"])


def _resumable(folder: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint whose trainer state loads, with it; the others are set aside."""
    while (ckpt := find_checkpoint(folder)) is not None:
        try:
            return ckpt, read_trainer_state(ckpt)
        except BrokenCheckpoint as why:
            set_aside(ckpt, str(why))
            if ckpt.exists():  # left in place: not nbzoo's to move, so not resumed either
                return None
    return None


def _forward_loss(model, batch: Batch, loss_fn) -> Loss:
    if loss_fn is not None:
        return loss_fn(model, batch)
    out = model(**batch)
    loss = out["loss"] if isinstance(out, dict) else out.loss
    if loss is None:
        raise ValueError("the model returned no loss: pass labels in the batch or give loss_fn")
    return loss


def batch_rows(batch: Batch) -> int:
    """What a loss without ``loss_counts`` averages over: the batch's sentences -- one label each
    (``labels``, also in packed batches, where the rows hold several sentences), else the rows of
    its first tensor."""
    labels = batch.get("labels")
    if torch.is_tensor(labels) and labels.dim() >= 1:
        return len(labels)
    return len(next(v for v in batch.values() if torch.is_tensor(v)))


def _as_terms(value: Any, name: str) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {name: value}


def step_shares(
    counts: Sequence[Mapping[str, float]], world_size: int = 1, device: Any = "cpu"
) -> list[dict[str, float]]:
    """How much each micro-batch of an optimizer step weighs in the step's loss.

    A loss term is a mean over items (sentences, masked tokens) and the micro-batches of a step
    (this rank's, and every rank's under torchrun) hold different numbers of them: the last batch
    of an epoch is short, fairseq's --max-tokens batches vary, the masks fall where they fall. The
    step's loss is the mean over *all* the step's items, which is Σᵢ meanᵢ · nᵢ / N with N the
    items of the whole step summed over its micro-batches and ranks -- not the mean of the
    micro-batches' means. So micro-batch i's term gets the weight nᵢ / N (``counts`` give each
    micro-batch's nᵢ per term; N is summed here, over the ranks with one all-reduce). One process
    with grad_accum k and k processes with one micro-batch each, or one process with a k times
    larger batch, then take the same step (up to float rounding); with one micro-batch on one
    process every weight is exactly 1."""
    keys = list(counts[0]) if counts else []
    totals = [float(sum(c[k] for c in counts)) for k in keys]
    if world_size > 1:
        totals = sum_over_ranks(totals, device)
    return [
        {k: (float(c[k]) / total if total else 0.0) for k, total in zip(keys, totals, strict=True)}
        for c in counts
    ]


def _share_of(terms: Mapping[str, torch.Tensor], shares: Mapping[str, float]) -> torch.Tensor:
    """Σ over the terms of meanₜ · weightₜ (a term with no items in this micro-batch is left out;
    with none at all, the first term times 0, so that every rank still runs its backward)."""
    parts = [terms[k] * w for k, w in shares.items() if w]
    if not parts:
        return next(iter(terms.values())) * 0.0
    return parts[0] if len(parts) == 1 else sum(parts[1:], parts[0])


def _evaluate(model, eval_fn, state: TrainState, masters: MasterWeights | None = None) -> None:
    was_training = model.training
    model.eval()
    with torch.no_grad(), masters.fp32() if masters else contextlib.nullcontext():
        metrics = eval_fn(model)
    model.train(was_training)
    state.evals.append(
        {"step": state.step, "epoch": state.epoch, **{k: float(v) for k, v in metrics.items()}}
    )


def fit(
    model: torch.nn.Module,
    train_dataset: Sequence,
    optimizer: torch.optim.Optimizer,
    rt: Runtime,
    cfg: TrainConfig,
    collate_fn: Callable[[list], Batch] | None = None,
    scheduler: Any = None,
    eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    loss_fn: Callable[[torch.nn.Module, Batch], Loss] | None = None,
    callbacks: Iterable[Callback] = (),
    batch_plan: Callable[[int, int, int], list[list[int]]] | None = None,
    loss_counts: Callable[[Batch], Counts] | None = None,
) -> TrainResult:
    """Train ``model`` (already on ``rt.device``) and return its history.

    ``loss_fn(model, batch)`` returns the batch's loss, a mean (default: the model's own ``loss``),
    or a mean per term as a dict; ``loss_counts(batch)`` what each mean is over, counted in the
    batch (a number, or a dict with the same keys; default: :func:`batch_rows`). An optimizer step
    over several micro-batches (``grad_accum``, several ranks) weighs each by its share of those
    items (:func:`step_shares`), so that its loss is the mean over the whole global batch.

    ``scheduler`` is stepped once per optimizer step. ``callbacks`` run after every optimizer step
    as ``cb(step, loss, state)``. ``batch_plan(epoch, rank, world_size)``, when given, returns
    the rank's micro-batches (lists of indices) of an epoch in place of :func:`epoch_batches`
    (e.g. fairseq's ``--max-tokens`` batches); it must give every rank as many batches.

    Under precision O2 the model trains as fp16 copies of its parameters while ``optimizer`` steps
    on the fp32 originals (the master weights); evaluation, checkpoints and the model handed back
    hold the fp32 masters.
    """
    if batch_plan is None:

        def batch_plan(epoch: int, rank: int, world_size: int) -> list[list[int]]:
            return epoch_batches(
                len(train_dataset), cfg.batch_size, cfg.seed, epoch, rank, world_size
            )

    collate_fn = collate_fn or default_collate
    scaler = rt.grad_scaler()
    if hasattr(optimizer, "attach_grad_scaler"):
        if rt.master_weights:
            raise ValueError(
                "precision O2 is not available with THOR: THOR reads its layers' weights and "
                "gradients from the model, which O2 replaces by fp16 copies; use fp16 (O1) or bf16"
            )
        optimizer.attach_grad_scaler(scaler)  # THOR gathers G from unscaled gradients
    state, resumed_from = TrainState(run_id=cfg.run_id), None
    if cfg.checkpoint_dir is not None:
        checkpoint_folder(cfg.checkpoint_dir)  # refused here, before any training
    if (
        cfg.checkpoint_dir is not None
        and cfg.resume
        and (found := _resumable(Path(cfg.checkpoint_dir)))
    ):
        ckpt, blob = found
        if checkpoint_run_id(ckpt, blob) == cfg.run_id:
            state = load_checkpoint(ckpt, model, optimizer, scheduler, scaler, blob)
            resumed_from = state.step
            if rt.is_main:
                print(f"resuming from {ckpt} at step {state.step}", flush=True)
        elif rt.is_main:
            print(
                f"not resuming from {ckpt}: it belongs to another configuration (run_id differs)",
                flush=True,
            )

    masters = (
        MasterWeights(model, optimizer, rt.master_compute_dtype) if rt.master_weights else None
    )
    if masters:
        masters.use_fp16()
    try:
        return _train(
            model, train_dataset, optimizer, rt, cfg, collate_fn, scheduler, eval_fn, loss_fn,
            list(callbacks), scaler, state, resumed_from, masters, batch_plan, loss_counts,
        )  # fmt: skip
    finally:
        if masters:
            masters.use_masters()  # the model leaves as it came: fp32, holding the masters


def _train(
    model, train_dataset, optimizer, rt, cfg, collate_fn, scheduler, eval_fn, loss_fn,
    callbacks, scaler, state: TrainState, resumed_from, masters: MasterWeights | None,
    batch_plan: Callable[[int, int, int], list[list[int]]], loss_counts,
) -> TrainResult:  # fmt: skip
    """:func:`fit`'s loop, from a loaded (or new) state; the model already in its precision."""

    def checkpoint() -> None:
        with masters.fp32() if masters else contextlib.nullcontext():
            if (bad := weights.first_non_finite(model.state_dict().items())) is not None:
                raise Diverged(
                    f"{cfg.desc}: weight {bad[0]} holds {bad[1]} NaN or infinite values after "
                    f"step {state.step}; no checkpoint written ({cfg.checkpoint_dir} keeps its "
                    "last finite one)"
                )
            save_checkpoint(cfg.checkpoint_dir, model, optimizer, scheduler, scaler, state)

    net = model
    if rt.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=None if rt.kind == "cpu" else [rt.local_rank],
            static_graph=cfg.ddp_static_graph,
            # the gradients are views into DDP's all-reduce buckets instead of a second copy of
            # them (BERT-Large: 1.3 GB per rank); the optimizer reads .grad the same either way
            gradient_as_bucket_view=True,
        )
    batches_per_epoch = len(batch_plan(0, rt.rank, rt.world_size))
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    bar = progress.bar(
        total=total_steps,
        initial=state.step,
        desc=cfg.desc,
        disable=not rt.is_main,
        mininterval=float(os.environ.get("NBZOO_PROGRESS_INTERVAL", "0.5")),
        dynamic_ncols=True,
    )
    callbacks = list(callbacks)
    model.train()
    done = state.step >= total_steps
    while not done and state.epoch < cfg.epochs:
        batches = batch_plan(state.epoch, rt.rank, rt.world_size)
        every_rank = None
        if cfg.collate_global_batch and (rt.distributed or cfg.grad_accum > 1):
            every_rank = [batch_plan(state.epoch, r, rt.world_size) for r in range(rt.world_size)]
        tick = time.perf_counter()
        while state.batch_in_epoch < len(batches):
            # one optimizer step: the micro-batches up to the next multiple of grad_accum
            first = state.batch_in_epoch
            step = range(first, min((first // cfg.grad_accum + 1) * cfg.grad_accum, len(batches)))
            micro = _collate_step(train_dataset, batches, every_rank, step, collate_fn, rt)
            counts = [
                _as_terms(loss_counts(b) if loss_counts else batch_rows(b), "loss") for b in micro
            ]
            shares = step_shares(counts, rt.world_size, rt.device)
            step_loss = 0.0
            for n, (batch, share) in enumerate(zip(micro, shares, strict=True)):
                last = n == len(micro) - 1
                ctx = net.no_sync() if rt.distributed and not last else _nullcontext()
                with ctx:
                    with rt.autocast():
                        terms = _as_terms(_forward_loss(net, rt.to_device(batch), loss_fn), "loss")
                    part = _share_of(terms, share)
                    # DistributedDataParallel averages the ranks' gradients: times world_size,
                    # their sum is the gradient of the global batch's mean
                    scaler.scale(part * rt.world_size).backward()
                step_loss += float(part.detach())
                state.batch_in_epoch += 1
            step_samples = sum(len(batches[i]) for i in step) * rt.world_size
            if masters:
                masters.grads_to_masters()
            if cfg.max_grad_norm is not None:
                scaler.unscale_(optimizer)
                params = masters.masters if masters else model.parameters()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(optimizer)  # skipped when the unscaled gradients hold an inf or a NaN
            scaler.update()
            if masters:
                masters.masters_to_model()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            rt.synchronize()
            seconds = time.perf_counter() - tick
            state.step += 1
            state.samples += step_samples
            state.train_seconds += seconds
            if rt.distributed:  # the ranks' shares: the global batch's loss
                step_loss = sum_over_ranks([step_loss], rt.device)[0]
            if not math.isfinite(step_loss):  # the same on every rank: they all stop here
                bar.close()
                lr = optimizer.param_groups[0]["lr"]
                raise Diverged(
                    f"{cfg.desc}: the training loss is {step_loss} at step {state.step} (epoch "
                    f"{state.epoch}, learning rate {lr:g}, precision {rt.precision}): training "
                    "diverged; nothing of this step was evaluated or checkpointed. Lower the "
                    "learning rate or train in fp32."
                )
            state.history.append(
                {
                    "step": state.step,
                    "epoch": state.epoch,
                    "loss": step_loss,
                    "lr": float(optimizer.param_groups[0]["lr"]),
                    "seconds": seconds,
                }
            )
            bar.update(1)
            if state.step % cfg.log_every == 0:
                bar.set_postfix(loss=f"{step_loss:.4f}", epoch=state.epoch, refresh=False)
            for cb in callbacks:
                cb(state.step, step_loss, state)
            if eval_fn is not None and cfg.eval_every and state.step % cfg.eval_every == 0:
                _evaluate(model, eval_fn, state, masters)
            if cfg.max_steps is not None and state.step >= cfg.max_steps:
                done = True
            if (
                cfg.checkpoint_dir is not None
                and rt.is_main
                and (done or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0))
            ):
                checkpoint()
            if done:
                break
            tick = time.perf_counter()
        if done:
            break
        state.epoch += 1
        state.batch_in_epoch = 0
        if eval_fn is not None:
            _evaluate(model, eval_fn, state, masters)
        if cfg.checkpoint_dir is not None and rt.is_main:
            checkpoint()
    bar.close()
    if done and eval_fn is not None and (not state.evals or state.evals[-1]["step"] != state.step):
        _evaluate(model, eval_fn, state, masters)
    return TrainResult(
        history=state.history,
        evals=state.evals,
        steps=state.step,
        samples=state.samples,
        train_seconds=state.train_seconds,
        resumed_from_step=resumed_from,
    )


def sum_over_ranks(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """Numbers summed over the ranks of a torchrun job (the numbers themselves without one), in
    one all-reduce. ``device``: where the process group's backend reduces (nccl / hccl: the
    accelerator, in float32; gloo on a CPU: float64)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    dtype = torch.float64 if torch.device(device).type == "cpu" else torch.float32
    t = torch.tensor([float(v) for v in values], dtype=dtype, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.cpu()]


def _collate_step(
    dataset: Sequence,
    batches: list[list[int]],
    every_rank: list[list[list[int]]] | None,
    step: range,
    collate_fn: Callable[[list], Batch],
    rt: Runtime,
) -> list[Batch]:
    """This rank's micro-batches of one optimizer step, collated on the host.

    With ``every_rank`` (``TrainConfig.collate_global_batch``) the whole global batch of the step
    -- every micro-batch of every rank, in the order of the epoch's permutation -- is collated in
    one call on every rank and each keeps its own rows: a collator drawing random masks then draws
    them as one process collating the global batch would, whatever the split into ranks and
    micro-batches (rank r's micro-batch i holds rows r, r + world_size, ... of the step's i-th
    slice, as :func:`epoch_batches` shards the permutation)."""
    if every_rank is None:
        return [collate_fn([dataset[j] for j in batches[i]]) for i in step]
    world = rt.world_size
    slices = [
        [j for group in zip(*(b[i] for b in every_rank), strict=True) for j in group] for i in step
    ]
    whole = collate_fn([dataset[j] for rows in slices for j in rows])
    micro, start = [], 0
    for rows in slices:
        end = start + len(rows)
        micro.append(
            {
                k: v[start:end][rt.rank :: world].contiguous() if torch.is_tensor(v) else v
                for k, v in whole.items()
            }
        )
        start = end
    return micro


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    dataset: Sequence,
    rt: Runtime,
    batch_size: int = 64,
    collate_fn: Callable[[list], Batch] | None = None,
    output_key: str = "logits",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the model over a dataset in order; return (outputs, labels or None) as float32 / numpy."""
    collate_fn = collate_fn or default_collate
    was_training = model.training
    model.eval()
    outputs, labels = [], []
    starts = range(0, len(dataset), batch_size)
    for start in progress.eval_bar(starts, "predict", disable=not rt.is_main):
        batch = collate_fn(
            [dataset[j] for j in range(start, min(start + batch_size, len(dataset)))]
        )
        y = batch.pop("labels", None)
        with rt.autocast():
            out = model(**rt.to_device(batch))
        outputs.append(
            (out[output_key] if isinstance(out, dict) else getattr(out, output_key))
            .float()
            .cpu()
            .numpy()
        )
        if y is not None:
            labels.append(y.numpy())
    model.train(was_training)
    return np.concatenate(outputs), (np.concatenate(labels) if labels else None)


def plot_history(
    result: TrainResult,
    title: str = "training",
    smooth: int = 10,
    baselines: Mapping[str, float] | None = None,
    eval_label: str = "on the evaluation set",
):
    """Training loss per step (raw, and a moving average of ``smooth`` steps) and, where the run
    was evaluated, each evaluation metric at the steps it was evaluated, with ``baselines`` -- what
    a model that learnt nothing scores on the same set -- as dashed lines, on an axis labelled
    ``eval_label``. The loss axis spans the smoothed curve past its first 5 % of steps, so that
    the first steps do not flatten the rest."""
    import matplotlib.pyplot as plt

    evals = list(result.evals)
    ncols = 2 if evals else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 3.5), squeeze=False)
    ax = axes[0, 0]
    steps = [h["step"] for h in result.history]
    losses = np.array([h["loss"] for h in result.history])
    ax.plot(steps, losses, alpha=0.3, label="loss of each step")
    if len(losses) >= smooth > 1:
        avg = np.convolve(losses, np.ones(smooth) / smooth, mode="valid")
        ax.plot(steps[smooth - 1 :], avg, label=f"mean of {smooth} steps")
        settled = avg[len(avg) // 20 :]  # past the first steps' drop
        low, high = float(settled.min()), float(settled.max())
        ax.set_ylim(max(0.0, low - 0.1 * (high - low)), high + 0.25 * (high - low))
    ax.set(xlabel="optimizer step", ylabel="training loss", title=title)
    ax.legend()
    if evals:
        ax2 = axes[0, 1]
        keys = [k for k in evals[0] if k not in ("step", "epoch")]
        for n, key in enumerate(keys):
            colour = f"C{n}"
            ax2.plot([e["step"] for e in evals], [e[key] for e in evals], marker="o",
                     color=colour, label=key)  # fmt: skip
            if baselines and key in baselines:
                ax2.axhline(baselines[key], color=colour, linestyle="--", linewidth=1,
                            label=f"{key}: a model that learnt nothing")  # fmt: skip
        ax2.set(xlabel="optimizer step", ylabel=eval_label, title="evaluation")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig
