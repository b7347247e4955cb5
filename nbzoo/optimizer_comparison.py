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

from nbzoo import cpus, fidelity, launch, lesson, lifeline, metrics, paths, pretraining, verdicts
from nbzoo.data import mlperf
from nbzoo.device import Runtime
from nbzoo.optim.thor import THOR
from nbzoo.pretraining import OPTIMIZERS, STEM, Run, return_freed_memory, start_from
from nbzoo.train import epoch_batches
from nbzoo.verdicts import Estimate, Verdict

# The seed's figures (seeds/003_bert_thor.md, kept in nbzoo/seeds.toml): BERT-Large, MLPerf v0.7,
# THOR on 8 Ascend 910, batch 12 each -- MLM accuracy at its evaluation steps, and ms per step.
_SEED_REFERENCE = fidelity.reference(STEM)
SEED_ACCURACY = {
    int(name.split("@")[1]): value
    for name, value in _SEED_REFERENCE["metrics"].items()
    if name.startswith("mlm_accuracy_thor@")
}
SEED_MS_PER_STEP = float(_SEED_REFERENCE["ms_per_step"])
NAMES = {"thor": "THOR", "sgd": "SGD", "adamw": "AdamW"}


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
    best: dict[str, Run],
    baseline: float,
    paired: dict[str, Any] | None = None,
    frequency: int | None = None,
) -> dict[str, float]:
    """The metrics of results/06_bert_thor.json (NaN where a run or a crossing is missing).

    ``thor_step_time_ratio``: THOR's step time over AdamW's, as the notebook's summary states it --
    the two taking turns (:func:`paired_step_times`), the median of the mean step over each
    refresh period of ``frequency`` steps (the whole cost, inversions included) where the paired
    timing spans two periods, else the median step. The median step's ratio is kept as
    ``thor_step_time_ratio_each_step``, the ratio of the two grid runs' medians as
    ``thor_step_time_ratio_sequential``."""
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
            m["thor_step_time_ratio_each_step"] = paired["ratio"]
            timed = step_time_samples(paired, {}, frequency) if frequency else {}
            if periods := timed.get("alternating, per refresh period"):
                m["thor_step_time_ratio"] = float(
                    np.median(periods["thor"]) / np.median(periods["adamw"])
                )
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
        # every timed step, ms, the first ones included: THOR's period is in their order
        "thor_step_ms": [1e3 * t for t in times["thor"]],
        "adamw_step_ms": [1e3 * t for t in times["adamw"]],
        "skipped": skip,
    }


def seed_step_metrics(run: Run) -> dict[str, float]:
    """THOR's accuracy at the seed's evaluation steps (1000 / 2000 / 3000), where this run has them."""
    at = {int(e["step"]): e["mlm_accuracy"] for e in run.evals}
    return {f"mlm_accuracy_thor@{s}": at[s] for s in SEED_ACCURACY if s in at}


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


# --- what the measurements say, with their uncertainty ---------------------------------------------


def masked_tokens(arrays: dict[str, np.ndarray]) -> int:
    """The masked tokens an accuracy on the evaluation set is measured on."""
    return int((arrays["masked_lm_weights"] > 0).sum())


def grid_table(runs: list[Run], best: dict[str, Run]):
    """One row per grid point: its setting, final accuracy, whether it is its optimizer's tuned
    run, its median step time and training seconds."""
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "optimizer": r.optimizer,
                "lr": r.lr,
                "damping": r.damping,
                "final mlm accuracy": r.final_accuracy,
                "tuned (best of its grid)": best.get(r.optimizer) is r,
                "median ms / step": 1e3 * r.median_step_seconds() if r.history else math.nan,
                "train seconds": r.train_seconds,
            }
            for r in runs
        ]
    )


def accuracy_estimates(best: dict[str, Run], arrays: dict[str, np.ndarray]) -> dict[str, Estimate]:
    """Per optimizer, its tuned run's final masked-LM accuracy as the items it is made of: each
    masked token of the evaluation set right or wrong. All runs are evaluated on the same tokens,
    so :func:`nbzoo.verdicts.compare` compares them paired."""
    return {
        kind: verdicts.proportion_of_items(
            NAMES[kind], pretraining.masked_token_hits(run.predictions, arrays)
        )
        for kind, run in best.items()
        if run.predictions
    }


def accuracy_verdicts(estimates: dict[str, Estimate]) -> list[Verdict]:
    """THOR against SGD, THOR against AdamW, SGD against AdamW: each pair that ran, paired."""
    pairs = [("thor", "sgd"), ("thor", "adamw"), ("sgd", "adamw")]
    return [
        verdicts.compare(estimates[a], estimates[b], what="masked-LM accuracy")
        for a, b in pairs
        if a in estimates and b in estimates
    ]


def frequent_token_shares(runs: dict[str, Run], frequent_id: int) -> dict[str, float]:
    """The share of each run's final predictions that are the most frequent masked token: how far
    it has moved from predicting the token frequencies alone."""
    return {k: float(np.mean(np.asarray(r.predictions) == frequent_id)) for k, r in runs.items()}


def unigram_entropy(arrays: dict[str, np.ndarray]) -> float:
    """The entropy (nats) of the masked tokens' frequencies on the evaluation set: the masked-LM
    loss of a model that knows how often each token occurs and nothing else."""
    ids = arrays["masked_lm_ids"][arrays["masked_lm_weights"] > 0]
    counts = np.bincount(ids)
    frequencies = counts[counts > 0] / len(ids)
    return float(-(frequencies * np.log(frequencies)).sum())


def constant_prediction(run: Run, arrays: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """Where ``run`` predicts one and the same token at every masked position: which token, whether
    it is the most frequent one, its final masked-LM loss beside the entropy of the token
    frequencies (the loss of a model that knows only how often each token occurs), and its
    training loss's peak; None for a run whose predictions vary."""
    predicted = np.unique(run.predictions)
    if len(predicted) != 1 or not run.evals:
        return None
    counts = np.bincount(arrays["masked_lm_ids"][arrays["masked_lm_weights"] > 0])
    losses = [h["loss"] for h in run.history]
    peak = int(np.nanargmax(losses)) if losses and not run.diverged else None
    return {
        "run": run.label,
        "token": int(predicted[0]),
        "most_frequent": int(predicted[0]) == int(counts.argmax()),
        "positions": len(run.predictions),
        "mlm_loss": float(run.evals[-1]["mlm_loss"]),
        "unigram_entropy": unigram_entropy(arrays),
        "diverged": run.diverged,
        "first_loss": losses[0] if losses else math.nan,
        "peak_loss": losses[peak] if peak is not None else math.nan,
        "peak_step": run.history[peak]["step"] if peak is not None else None,
    }


def describe_constant_prediction(c: dict[str, Any]) -> str:
    """:func:`constant_prediction` in a sentence."""
    token = f"token {c['token']}" + (
        ", the most frequent masked token," if c["most_frequent"] else ""
    )
    text = (
        f"{c['run']} predicts {token} at all {c['positions']:,} masked positions: its accuracy is "
        f"what always guessing that token scores. Its masked-LM loss, {c['mlm_loss']:.3f}, stands "
        f"beside {c['unigram_entropy']:.3f}, the loss of a model that knows only how often each "
        "token occurs: it learnt the token frequencies and nothing of the context."
    )
    if c["diverged"]:
        return text + " Its training loss became infinite or NaN: the run diverged."
    if c["peak_loss"] > c["first_loss"]:
        text += (
            f" Its training loss stayed finite (no divergence) but jumped to {c['peak_loss']:.2f} "
            f"at step {c['peak_step']}, above the {c['first_loss']:.2f} it started from, and at this "
            "learning rate it settled on the frequencies."
        )
    return text


def reach(best: dict[str, Run], arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Steps to SGD's final accuracy (the target), for THOR and SGD: the first evaluated step at or
    above it, and the first from which the accuracy is never again significantly below it. Each
    evaluation is compared with the target unpaired (only the final evaluation keeps its tokens):
    the second step says how soon a run is within the noise of the target, which is what a step
    count read off noisy curves can carry."""
    if "sgd" not in best or not best["sgd"].evals:
        return {}
    n = masked_tokens(arrays)
    target = verdicts.proportion("the target", best["sgd"].final_accuracy, n)
    found = {}
    for kind in ("thor", "sgd"):
        if kind not in best:
            continue
        evals = best[kind].evals
        below = [
            verdicts.compare(target, verdicts.proportion(NAMES[kind], e["mlm_accuracy"], n)).leader
            == target.name
            for e in evals
        ]
        settled = next((int(e["step"]) for i, e in enumerate(evals) if not any(below[i:])), None)
        found[kind] = {
            "target": target.value,
            "at_or_above": steps_to_target(evals, target.value),
            "within_noise_from": settled,
            "eval_every": int(evals[-1]["step"] - evals[-2]["step"]) if len(evals) > 1 else None,
        }
    return found


def describe_reach(reached: dict[str, dict[str, Any]]) -> str:
    """:func:`reach` in a sentence ("" where SGD did not run)."""
    if not reached:
        return ""

    def step(x):
        return "never" if x is None else f"step {x}"

    first = next(iter(reached.values()))
    parts = [
        f"{NAMES[k]} first at or above it at {step(r['at_or_above'])}, never again significantly "
        f"below it from {step(r['within_noise_from'])}"
        for k, r in reached.items()
    ]
    return (
        f"Steps to SGD's final accuracy ({first['target']:.4f}): "
        + "; ".join(parts)
        + f" (an evaluation every {first['eval_every']} steps)."
    )


def along_the_way(best: dict[str, Run], arrays: dict[str, np.ndarray], a="thor", b="sgd"):
    """At every evaluated step (after the first) both runs share, the verdict of ``a`` against
    ``b`` (unpaired: only the final evaluation keeps its tokens): {leader or "neither": count}."""
    if a not in best or b not in best:
        return {}
    n = masked_tokens(arrays)
    theirs = {e["step"]: e["mlm_accuracy"] for e in best[b].evals}
    counts = {NAMES[a]: 0, NAMES[b]: 0, "neither": 0}
    for e in best[a].evals:
        if e["step"] > 0 and e["step"] in theirs:
            verdict = verdicts.compare(
                verdicts.proportion(NAMES[a], e["mlm_accuracy"], n),
                verdicts.proportion(NAMES[b], theirs[e["step"]], n),
            )
            counts[verdict.leader or "neither"] += 1
    return counts


def period_means(step_ms: Sequence[float], period: int, skip_periods: int = 1) -> list[float]:
    """The mean step time over each whole period of ``period`` steps -- THOR's refresh period, so
    that each mean holds one inversion and its share of statistics steps --, leaving out the first
    ``skip_periods`` (their first steps allocate memory)."""
    x = np.asarray(step_ms, dtype=float)
    return [
        float(x[i * period : (i + 1) * period].mean())
        for i in range(skip_periods, len(x) // period)
    ]


def step_time_samples(
    paired: dict[str, Any] | None, best: dict[str, Run], frequency: int
) -> dict[str, dict[str, list[float]]]:
    """THOR's and AdamW's step times in ms, measured two ways: ``alternating``
    (:func:`paired_step_times`: the two take turns on the same batches, so a drift in the machine's
    speed hits both alike) and ``separate grid runs`` (each in its own run, at another time,
    beside whatever else ran then). Each as ``each step`` (THOR's median is an ordinary step; its
    statistics and inversion steps sit in the upper tail) and ``per refresh period`` (the mean
    step over each period of ``frequency`` steps: the whole cost, statistics and inversion
    included). {how: {"thor": [...], "adamw": [...]}}, for what was measured."""
    sources = {}
    if paired and paired.get("thor_step_ms"):
        skip = paired.get("skipped", 0)
        sources["alternating"] = ({k: paired[f"{k}_step_ms"] for k in ("thor", "adamw")}, skip)
    if all(k in best and best[k].history for k in ("thor", "adamw")):
        grid = {k: [1e3 * h["seconds"] for h in best[k].history] for k in ("thor", "adamw")}
        sources["separate grid runs"] = (grid, 1)
    found: dict[str, dict[str, list[float]]] = {}
    for how, (ms, skip) in sources.items():
        found[f"{how}, each step"] = {k: list(v[skip:]) for k, v in ms.items()}
        if min(len(v) for v in ms.values()) >= 2 * frequency:
            found[f"{how}, per refresh period"] = {
                k: period_means(v, frequency) for k, v in ms.items()
            }
    return found


def step_times(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Estimate]]:
    """:func:`step_time_samples` as :func:`nbzoo.verdicts.timing` estimates (median and IQR)."""
    return {
        how: {k: verdicts.timing(NAMES[k], v) for k, v in by_kind.items()}
        for how, by_kind in samples.items()
    }


def step_time_verdicts(times: dict[str, dict[str, Estimate]]) -> dict[str, Verdict]:
    """THOR against AdamW (shorter is better) for each way of timing in :func:`step_times`."""
    return {
        how: verdicts.compare(t["thor"], t["adamw"], higher_is_better=False)
        for how, t in times.items()
    }


def step_time_table(times: dict[str, dict[str, Estimate]]):
    """measurement | THOR | AdamW (median and IQR, ms) | THOR / AdamW (ratio of the medians)."""
    import pandas as pd

    if not times:
        return pd.DataFrame(columns=["measured"]).set_index("measured")
    return pd.DataFrame(
        [
            {
                "measured": how,
                "THOR, ms (IQR)": str(t["thor"]),
                "AdamW, ms (IQR)": str(t["adamw"]),
                "THOR / AdamW": round(t["thor"].value / t["adamw"].value, 3),
                "repeats": t["thor"].n,
            }
            for how, t in times.items()
        ]
    ).set_index("measured")


def learning_checks(cfg: Any, best: dict[str, Run], arrays: dict[str, np.ndarray]):
    """Each tuned run's final masked-LM accuracy against always predicting the most frequent
    masked token, with that baseline's binomial standard error on the evaluation set's masked
    tokens (required under the demo preset)."""
    baseline, _ = pretraining.baseline_accuracy(arrays)
    base = verdicts.proportion("most frequent token", baseline, masked_tokens(arrays))
    return lesson.learning_checks(
        cfg,
        *(
            lesson.Check(f"mlm_accuracy_{kind}", best[kind].final_accuracy, base)
            for kind in OPTIMIZERS
            if kind in best
        ),
    )


def samples_per_second(best: dict[str, Run], cfg: Any, rt: Runtime) -> float | None:
    """The tuned THOR run's training throughput (samples of every process per second)."""
    run = best.get("thor")
    if run is None or not run.train_seconds:
        return None
    world = launch.recorded_runtime(rt, cfg).world_size
    return run.steps * cfg.batch_size * world / run.train_seconds


def record_extra(
    cfg: Any,
    runs: list[Run],
    best: dict[str, Run],
    paired: dict[str, Any] | None,
    arrays: dict[str, np.ndarray],
) -> dict[str, Any]:
    """What results/06_bert_thor.json keeps beside the metrics: the grid, the paired accuracy
    verdicts, the step times with their spread, THOR's cost breakdown, and the run's setting."""
    estimates = accuracy_estimates(best, arrays)
    times = step_times(step_time_samples(paired, best, cfg.frequency))
    return {
        "grid": grid_table(runs, best).to_dict("records"),
        "masked_tokens": masked_tokens(arrays),
        "accuracy": {
            k: {"value": e.value, "standard_error": e.standard_error} for k, e in estimates.items()
        },
        "accuracy_verdicts": [v.text for v in accuracy_verdicts(estimates)],
        "reach_target": reach(best, arrays),
        "step_times_ms": {
            how: {
                k: {"median": e.value, "q1": e.quartiles[0], "q3": e.quartiles[1], "n": e.n}
                for k, e in t.items()
            }
            for how, t in times.items()
        },
        "step_time_verdicts": {how: v.text for how, v in step_time_verdicts(times).items()},
        "thor_cost_ms_per_step": thor_cost_breakdown(best["thor"]) if "thor" in best else {},
        "model_config": cfg.model_config,
        "max_steps": cfg.max_steps,
        "mode": cfg.mode,
        "init_checkpoint": cfg.init_checkpoint,
    }
