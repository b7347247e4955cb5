"""Notebook 06's optimizer comparison: THOR, its first-order counterpart (momentum SGD, the same
schedules) and AdamW, each tuned on a grid of the same size, all from the same initial weights and
data order; then the figures that compare them (accuracy, steps to a common target, step cost).

One training run is :func:`nbzoo.pretraining.train`; this module runs the grid of them -- in this
process, in worker processes on a CPU, or on every rank under torchrun (:func:`run`) -- and reads
the runs.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from itertools import chain, count, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nbzoo import cpus, fidelity, launch, lifeline, metrics, paths, pretraining
from nbzoo.data import mlperf
from nbzoo.device import Runtime
from nbzoo.optim.thor import THOR
from nbzoo.pretraining import OPTIMIZERS, STEM, Run, return_freed_memory, start_from
from nbzoo.train import epoch_batches

# The seed's figures (seeds/003_bert_thor.md, kept in nbzoo/seeds.toml): BERT-Large, MLPerf v0.7,
# THOR on 8 Ascend 910, batch 12 each -- MLM accuracy at its evaluation steps, and ms per step.
_SEED_REFERENCE = fidelity.reference(STEM)
SEED_ACCURACY = {
    int(name.split("@")[1]): value
    for name, value in _SEED_REFERENCE["metrics"].items()
    if name.startswith("mlm_accuracy_thor@")
}
SEED_MS_PER_STEP = float(_SEED_REFERENCE["ms_per_step"])


def steps_to_target(evals: list[dict[str, float]], target: float) -> int | None:
    """The first evaluated step whose masked-LM accuracy is at or above ``target``."""
    for e in evals:
        if e["mlm_accuracy"] >= target:
            return int(e["step"])
    return None


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
    :func:`nbzoo.cpus.share` allows at ``cfg.threads`` threads each), one everywhere else --
    a GPU, an NPU or a torchrun job trains its grid points one after the other."""
    requested = int(cfg.get("grid_workers") or 0) if "grid_workers" in cfg else 1
    if rt.kind != "cpu" or rt.world_size > 1:
        return 1
    if requested > 0:
        return requested
    return max(1, cpus.share() // max(1, int(cfg.get("threads") or 1)))


def _worker_threads(threads: int, parent: int) -> None:  # a grid worker, on a CPU
    lifeline.die_with_parent(parent=parent)  # a kernel killed mid-grid takes its workers along
    return_freed_memory()
    if threads:
        torch.set_num_threads(threads)


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
            pretraining.train(kind, lr, damping, cfg, rt, train_data, eval_data)
            for kind, lr, damping in points
        ]
    # spawn, not fork: a forked child inherits the parent's OpenMP and autograd thread state
    context = multiprocessing.get_context("spawn")
    print(f"training {len(points)} grid points, {workers} at a time (one process each)", flush=True)
    with ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_worker_threads,
        initargs=(cfg.get("threads"), os.getpid()),
    ) as pool:
        futures = {
            pool.submit(pretraining.train, kind, lr, damping, cfg, rt, train_data, eval_data): i
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


def thor_variant_runs(
    cfg: Any, rt: Runtime, train_data: Sequence, eval_data: Sequence, variant: str
) -> list[Run]:
    """THOR's points of ``cfg.grid`` trained under ``thor_variant = variant`` (the other
    optimizers do not depend on it), from the same weights and batches as the grid."""
    other = type(cfg)({**cfg, "thor_variant": variant, "grid": {"thor": cfg.grid["thor"]}})
    return run_grid(other, rt, train_data, eval_data)


def masked_tokens_evaluated(eval_data: Sequence) -> int:
    """The masked tokens the MLM accuracy is computed over (the n of its standard error)."""
    return int((np.asarray(eval_data.arrays()["masked_lm_weights"]) > 0).sum())


def thor_variant_table(runs: dict[str, list[Run]], masked_tokens: int) -> list[dict[str, Any]]:
    """Per THOR variant, its grid's best point: final MLM accuracy with its standard error (the
    binomial one, √(p(1-p)/n) over the ``masked_tokens`` evaluated), for the notebook's table."""
    rows = []
    for variant, variant_runs in runs.items():
        best = best_runs(variant_runs)["thor"]
        p = best.final_accuracy
        rows.append(
            {
                "thor_variant": variant,
                "best grid point": best.label,
                "final MLM accuracy": p,
                "standard error": metrics.proportion_standard_error(p, masked_tokens),
                "masked tokens evaluated": masked_tokens,
            }
        )
    return rows


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


def run(
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
    record = launch.run("nbzoo.optimizer_comparison:grid_on_rank", cfg, workdir)
    return [Run(**r) for r in record["runs"]]


def grid_on_rank(cfg: Any, rt: Runtime) -> dict[str, Any]:
    """The torchrun entry point (``nbzoo.launch``): every rank trains every grid point."""
    train_data, eval_data = pretraining.load_data(cfg, rt.world_size)
    tick = time.perf_counter()
    runs = run_grid(cfg, rt, train_data, eval_data)
    return {
        "runs": [asdict(r) for r in runs],
        "world_size": rt.world_size,
        "seconds": time.perf_counter() - tick,
    }
