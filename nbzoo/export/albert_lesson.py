"""Notebook 02's lesson, one call per cell: the machine the timings were taken on, the benchmark
at one shape as a table, a figure and sentences, why the fused graph is faster or slower on this
CPU, whether the int8 model can be trusted (with the uncertainty its sentence count leaves), the
correctness checks, the results record and the summary.

Every comparison sentence comes from :mod:`nbzoo.verdicts`; the int8 agreement is judged with a
Clopper-Pearson bound (:func:`nbzoo.metrics.proportion_bounds`), exact at every size the notebook runs.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nbzoo import cpus, lesson, metrics, verdicts
from nbzoo.export import albert, quantize
from nbzoo.export import onnx as onnx_export
from nbzoo.export import profile as ort_profile

STAGES = {
    albert.TORCH: "PyTorch eager",
    "onnx": "plain ONNX",
    "onnx_sim": "simplified ONNX",
    "onnx_opt": "optimized ONNX (fused)",
    "onnx_int8": "int8 ONNX",
}
FUSED_GRAPHS = ("onnx", "onnx_sim", "onnx_opt")
# The targets of the int8 model: it agrees with PyTorch's fp32 predictions on at least this share
# of the sentences, judged at this confidence (one-sided).
INT8_AGREEMENT = 0.99
CONFIDENCE = 0.999
# ONNX computes what PyTorch computes: float32 rounding moves a logit by about 1e-6.
MAX_LOGIT_DIFF = 1e-4
MAX_ACCURACY_GAP = 0.002
# Fewer rounds than this give no interquartile range worth the name (one round: a point), and
# "faster" would rest on nothing: below it, no comparison is worded.
MIN_ROUNDS = 5


def label(stage: str) -> str:
    return STAGES.get(stage, stage)


# --- the machine ----------------------------------------------------------------------------------


def cpu_name() -> str:
    import platform

    return cpus.cpuinfo()[0] or platform.processor() or platform.machine()


def machine(threads: int, bench: albert.Benchmark | None = None):
    """What the timings depend on: the CPU, the cores this process may use, the threads,
    the int8 instructions and which of them ONNX Runtime's int8 kernels use, and the load
    (runnable processes, averaged over a minute) before and after the benchmark."""
    import pandas as pd

    isa = quantize.int8_instruction_sets()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows = {
        "CPU": cpu_name(),
        "cores this process may use": cores,
        "threads (PyTorch and ONNX Runtime each)": threads,
        "int8 instructions found": isa["described"],
        "ONNX Runtime's int8 matrix products use": isa["ort_int8_kernel"],
        "int8 weights": "8-bit"
        if isa["int8_dot_product"]
        else "7-bit (reduce_range: no int8 dot-product instruction, so 16-bit sums must not overflow)",
    }
    if bench is not None:
        rows["load average (1 min) before / after the benchmark"] = (
            f"{bench.load_before[0]:.2f} / {bench.load_after[0]:.2f} on {cores} core(s)"
        )
    else:
        rows["load average (1 min) now"] = f"{os.getloadavg()[0]:.2f} on {cores} core(s)"
    return pd.Series(rows, name="").to_frame()


def load_sentence(bench: albert.Benchmark) -> str:
    """What the load average says about the timings: above the number of usable cores, other
    processes waited for a core too, and every timing includes some of their turns."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = max(bench.load_before[0], bench.load_after[0])
    if bench.rounds < MIN_ROUNDS:
        return (
            f"{_rounds(bench.rounds)} give no spread to judge a difference by: the models are "
            f"not compared (set bench_rounds to {MIN_ROUNDS} or more)."
        )
    if load < 0.5 * cores:
        return (
            f"The machine was nearly idle (load {load:.2f} on {cores} core(s)): the spread is "
            "the frameworks' own."
        )
    return (
        f"The machine was busy (load up to {load:.2f} on {cores} core(s)): every model waited its "
        "turn for a core now and then, which widens the spread; the alternating rounds make the "
        "waits fall on every model alike, so the order holds where the ranges do not overlap."
    )


# --- the benchmark at one shape -----------------------------------------------------------------


def estimates(bench: albert.Benchmark) -> dict[str, verdicts.Estimate]:
    return {
        name: verdicts.timing(label(name), sps, unit="samples/s")
        for name, sps in bench.samples_per_second.items()
    }


def shape(bench: albert.Benchmark) -> str:
    threads = f"{bench.threads} CPU thread" + ("s" if bench.threads != 1 else "")
    return f"seq {bench.seq_len} × batch {bench.batch_size}, {threads}"


def benchmark_table(bench: albert.Benchmark):
    """One row per model: samples/s (median and IQR over the rounds), the speed against PyTorch
    (the median of the per-round ratios, with their IQR) and the verdict against PyTorch."""
    import pandas as pd

    found = estimates(bench)
    base = found[albert.TORCH]
    rows = []
    for name, estimate in found.items():
        q1, q3 = estimate.quartiles
        row = {
            "model": label(name),
            "samples/s (median)": round(estimate.value),
            "samples/s IQR": f"{q1:.0f}–{q3:.0f}",
            "× PyTorch (median of rounds)": "",
            "× PyTorch IQR": "",
            "against PyTorch": "",
        }
        if name != albert.TORCH:
            ratios = bench.ratios(name)
            r1, r3 = np.percentile(ratios, [25, 75])
            row |= {
                "× PyTorch (median of rounds)": round(float(np.median(ratios)), 2),
                "× PyTorch IQR": f"{r1:.2f}–{r3:.2f}",
                "against PyTorch": _short(verdicts.compare(estimate, base), estimate.name)
                if bench.rounds >= MIN_ROUNDS
                else f"not compared ({_rounds(bench.rounds)})",
            }
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def _rounds(n: int) -> str:
    return f"{n} round" + ("s" if n != 1 else "")


def _short(verdict: verdicts.Verdict, name: str) -> str:
    if not verdict.significant:
        return "no clear difference"
    return "faster" if verdict.leader == name else "slower"


def benchmark_verdicts(bench: albert.Benchmark) -> list[verdicts.Verdict]:
    """The comparisons the lesson makes at this shape: each graph stage against the one before
    it, and the fastest ONNX model against PyTorch (none under :data:`MIN_ROUNDS` rounds)."""
    if bench.rounds < MIN_ROUNDS:
        return []
    found = estimates(bench)
    pairs = [("onnx", albert.TORCH), ("onnx_sim", "onnx"), ("onnx_opt", "onnx")]
    pairs += [("onnx_int8", "onnx_opt")]
    onnx = [n for n in found if n != albert.TORCH]
    fastest = max(onnx, key=lambda n: found[n].value) if onnx else None
    if fastest and fastest != "onnx":
        pairs.append((fastest, albert.TORCH))
    what = f"samples/s at {shape(bench)}"
    return [
        verdicts.compare(found[a], found[b], what=what)
        for a, b in pairs
        if a in found and b in found
    ]


def benchmark_figure(bench: albert.Benchmark):
    """The samples/s of every round, one box per model (the box is the IQR, the line in it the
    median), PyTorch's median as a dashed line."""
    import matplotlib.pyplot as plt

    names = list(bench.samples_per_second)
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(names) + 1.4))
    ax.boxplot(
        [bench.samples_per_second[n] for n in names][::-1],
        orientation="horizontal",
        widths=0.55,
        medianprops={"color": "black"},
    )
    ax.set_yticks(range(1, len(names) + 1), [label(n) for n in names][::-1])
    torch_median = float(np.median(bench.samples_per_second[albert.TORCH]))
    ax.axvline(torch_median, color="tab:red", linestyle="--", label="PyTorch eager, median")
    ax.set(
        xlabel="throughput (samples/s, higher is faster)",
        ylabel="model",
        title=f"{shape(bench)}: {bench.rounds} alternating rounds",
    )
    ax.set_xlim(left=0)
    # below the axes: inside, it would sit on some model's box or outlier
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), frameon=False, fontsize="small")
    fig.tight_layout()
    return fig


# --- why the fused graph is faster or slower here --------------------------------------------------


@dataclass
class FusionCosts:
    table: Any  # DataFrame: per graph, kernels per batch and CPU ms per batch at both shapes
    kernels: Any  # DataFrame: per operator type, ms per batch at the large shape (profiled)
    sentences: list[str] = field(default_factory=list)


def _cpu_ms_per_call(session, feeds, calls: int) -> float:
    """Median CPU time of one call (this process, every thread): a neighbour that takes the
    core away does not inflate it, as it does wall time."""
    session.run(None, feeds)
    times = []
    for _ in range(calls):
        tick = time.process_time()
        session.run(None, feeds)
        times.append((time.process_time() - tick) * 1000.0)
    return float(np.median(times))


def runtime_kernels(path: str | os.PathLike, threads: int = 1) -> int:
    """Nodes of the graph ONNX Runtime actually runs (after its own load-time fusions)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="nbzoo-ort-") as folder:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # the note that the saved graph is CPU-specific
        options.optimized_model_filepath = str(Path(folder) / "runtime.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return len(onnx.load(options.optimized_model_filepath).graph.node)


def fusion_costs(
    paths: Mapping[str, str | os.PathLike],
    small: Mapping[str, np.ndarray],
    large: Mapping[str, np.ndarray],
    threads: int = 1,
    small_calls: int = 200,
    large_calls: int = 8,
) -> FusionCosts:
    """The plain, simplified and optimized graphs on one short sentence (``small``) and on a
    large batch (``large``): kernels per batch, CPU time per batch, and at the large shape
    ONNX Runtime's profile per operator type (each kernel at its fastest of ``large_calls``
    runs)."""
    import onnxruntime as ort
    import pandas as pd

    graphs = [g for g in FUSED_GRAPHS if g in paths]
    small_shape = "seq {} × batch {}".format(*reversed(small["input_ids"].shape))
    large_shape = "seq {} × batch {}".format(*reversed(large["input_ids"].shape))
    rows, profiles = {}, {}
    for name in graphs:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(
            str(paths[name]), options, providers=["CPUExecutionProvider"]
        )
        rows[label(name)] = {
            "kernels per batch": runtime_kernels(paths[name], threads),
            f"CPU ms per batch, {small_shape}": _cpu_ms_per_call(session, dict(small), small_calls),
            f"CPU ms per batch, {large_shape}": _cpu_ms_per_call(session, dict(large), large_calls),
        }
        profiles[name] = ort_profile.profile(paths[name], large, runs=large_calls, threads=threads)
    table = pd.DataFrame(rows).T
    kernels = pd.DataFrame({label(n): pd.Series(p.op_ms) for n, p in profiles.items()}).fillna(0.0)
    kernels = kernels.loc[kernels.max(axis=1).sort_values(ascending=False).index].head(8)
    return FusionCosts(table, kernels.round(2), _fusion_sentences(table, profiles, small_shape))


def _fusion_sentences(table, profiles, small_shape: str) -> list[str]:
    found = []
    plain, opt = label("onnx"), label("onnx_opt")
    if plain in table.index and opt in table.index:
        small_col = f"CPU ms per batch, {small_shape}"
        ratio = table.loc[plain, small_col] / table.loc[opt, small_col]
        found.append(
            f"On one sentence ({small_shape}) the optimized graph needs "
            f"{table.loc[opt, small_col]:.3f} ms of CPU against {table.loc[plain, small_col]:.3f} "
            f"for the plain one ({ratio:.1f}×): it runs {table.loc[opt, 'kernels per batch']:.0f} "
            f"kernels instead of {table.loc[plain, 'kernels per batch']:.0f}, and with this little "
            "work in each, what a kernel costs to start is most of the time."
        )
    skip = [n for n in ("onnx_opt", "onnx_sim") if "SkipLayerNormalization" in profiles[n].op_ms]
    base = profiles.get("onnx")
    if skip and base is not None and "LayerNormalization" in base.op_ms:
        name, p = skip[0], profiles[skip[0]]
        found.append(
            f"On the large batch, the {label(name)} graph's "
            f"{p.op_calls['SkipLayerNormalization']} SkipLayerNormalization kernels (residual Add "
            f"and LayerNorm in one) take {p.op_ms['SkipLayerNormalization']:.1f} ms per batch; the "
            f"plain graph's {base.op_calls['LayerNormalization']} LayerNormalization kernels take "
            f"{base.op_ms['LayerNormalization']:.1f} ms, its residual Adds a fraction of a "
            "millisecond each."
        )
    return found


# --- int8 against fp32 -----------------------------------------------------------------------------


def sentences_needed(threshold: float = INT8_AGREEMENT, confidence: float = CONFIDENCE) -> int:
    """The fewest sentences on which a model that agrees on every one is *shown* to agree on at
    least ``threshold`` of all sentences: threshold ** n <= 1 - confidence."""
    return math.ceil(math.log(1.0 - confidence) / math.log(threshold))


@dataclass
class Int8Verdict:
    agree: int
    n: int
    bounds: tuple[float, float]
    accuracy: verdicts.Verdict  # int8 against PyTorch, paired on the same sentences
    sizes: Any  # DataFrame: file and weight sizes of the fp32 and int8 graphs
    threshold: float = INT8_AGREEMENT
    confidence: float = CONFIDENCE

    @property
    def agreement(self) -> float:
        return self.agree / self.n

    @property
    def shown_below(self) -> bool:
        """The sentences show that fewer than ``threshold`` agree: the int8 model is rejected."""
        return self.bounds[1] < self.threshold

    @property
    def shown_above(self) -> bool:
        return self.bounds[0] >= self.threshold

    @property
    def accuracy_lost(self) -> bool:
        return self.accuracy.significant and self.accuracy.leader == label(albert.TORCH)

    @property
    def accepted(self) -> bool:
        return not self.shown_below and not self.accuracy_lost

    @property
    def failures(self) -> str:
        return "; ".join(self.lines()) if not self.accepted else ""

    def lines(self) -> list[str]:
        lo, hi = self.bounds
        share = f"{self.threshold:.0%}"
        level = f"{self.confidence:.1%} confidence"
        said = (
            f"the int8 model agrees with PyTorch on {self.agree} of {self.n} sentences "
            f"({self.agreement:.1%}; between {lo:.1%} and {hi:.1%} of all sentences at {level}): "
        )
        if self.shown_above:
            said += f"shown to agree on at least {share}"
        elif self.shown_below:
            said += f"shown to agree on fewer than {share}"
        else:
            said += (
                f"too few sentences to tell whether it agrees on {share} (showing it takes at "
                f"least {sentences_needed(self.threshold, self.confidence)} with none changed), "
                f"and no sign that it agrees on less"
            )
        return [said, f"accuracy: {self.accuracy.text}"]


def int8_verdict(
    table, labels: np.ndarray, seq: int, batch: int, paths: Mapping[str, str | os.PathLike]
) -> Int8Verdict:
    """The int8 model against PyTorch at one point of the sweep: agreement with its bounds, and
    the two accuracies compared paired (the same sentences scored by both)."""
    import pandas as pd

    at = table[(table.seq == seq) & (table.batch == batch)].set_index("stage")
    torch_pred = np.asarray(at.loc[albert.TORCH, "predictions"])
    int8_pred = np.asarray(at.loc["onnx_int8", "predictions"])
    labels = np.asarray(labels)
    accuracy = verdicts.compare(
        verdicts.proportion_of_items(label("onnx_int8"), int8_pred == labels),
        verdicts.proportion_of_items(label(albert.TORCH), torch_pred == labels),
        what=f"accuracy on {len(labels)} dev sentences",
    )
    agree = int((int8_pred == torch_pred).sum())
    sizes = pd.DataFrame(
        {
            label(name): {
                "file (KiB)": Path(paths[name]).stat().st_size / 1024,
                "weights (KiB)": onnx_export.weight_bytes(paths[name]) / 1024,
            }
            for name in ("onnx", "onnx_opt", "onnx_int8")
            if name in paths
        }
    ).T.round(1)
    return Int8Verdict(
        agree,
        len(labels),
        metrics.proportion_bounds(agree, len(labels), CONFIDENCE),
        accuracy,
        sizes,
    )


# --- the checks, the record, the summary -------------------------------------------------------


def scores(table, seq: int, batch: int) -> dict[str, float]:
    """This run's figures at the longest sequence length and largest batch of the sweep, the
    largest logit difference over the whole sweep, and the ``.om``'s where it ran."""
    at = table[(table.seq == seq) & (table.batch == batch)].set_index("stage")
    found = {
        "accuracy_torch": at.loc[albert.TORCH, "accuracy"],
        "accuracy_onnx": at.loc["onnx_opt", "accuracy"],
        "accuracy_int8": at.loc["onnx_int8", "accuracy"],
        "int8_agreement": at.loc["onnx_int8", "agreement with PyTorch"],
        "max_abs_logit_diff": table[table.stage.isin(FUSED_GRAPHS)][
            "max |Δlogit| vs PyTorch"
        ].max(),
    }
    om = table[table.stage == "om"]
    if len(om):
        found["accuracy_om"] = om.sort_values("seq").iloc[-1]["accuracy"]
        found["om_max_abs_logit_diff"] = om["max |Δlogit| vs PyTorch"].max()
    return {k: float(v) for k, v in found.items()}


def correctness(found: Mapping[str, float], om_flow: str = "skipped"):
    """The exported models compute what PyTorch computes (fp32): the checks, and whether each
    holds. The notebook stops when one does not."""
    import pandas as pd

    gap = abs(found["accuracy_onnx"] - found["accuracy_torch"])
    rows = [
        (
            "max |logit difference|, fp32 ONNX vs PyTorch",
            found["max_abs_logit_diff"],
            MAX_LOGIT_DIFF,
        ),
        ("|accuracy_onnx − accuracy_torch|", gap, MAX_ACCURACY_GAP),
    ]
    if "om_max_abs_logit_diff" in found:
        rows.append(
            (
                f"max |logit difference|, .om ({om_flow}) vs PyTorch",
                found["om_max_abs_logit_diff"],
                MAX_LOGIT_DIFF,
            )
        )
    return pd.DataFrame(
        [{"check": c, "this run": v, "at most": limit, "holds": v <= limit} for c, v, limit in rows]
    ).set_index("check")


def learning_checks(cfg: Mapping[str, Any], found: Mapping[str, float], labels) -> lesson.Checks:
    """The demo's classifier beats what always answering the majority class scores."""
    majority = verdicts.proportion("majority class", metrics.majority_rate(labels), len(labels))
    return lesson.learning_checks(
        cfg, lesson.Check("accuracy_torch", found["accuracy_torch"], majority)
    )


def record_extra(
    *,
    eval_seq: int,
    src,
    bench: albert.Benchmark,
    int8: Int8Verdict,
    stages,
    om_flow: str,
    tools,
    om_models: Sequence,
    skipped_seq_lengths: Sequence[int],
    runner_summary: Mapping[str, Any],
    table,
) -> dict[str, Any]:
    """What the results record keeps besides the scores: the benchmark's every round and its
    machine, the int8 verdict, the graphs, the OM flow and the sweep."""
    found = estimates(bench)
    return {
        "eval_seq_length": eval_seq,
        "checkpoint": str(src.checkpoint),
        "benchmark": bench.to_dict()
        | {
            "median_samples_per_second": {n: e.value for n, e in found.items()},
            "speedup_vs_pytorch": {
                n: float(np.median(bench.ratios(n))) for n in found if n != albert.TORCH
            },
            "cpu": cpu_name(),
        },
        "int8": {
            "agree": int8.agree,
            "n": int8.n,
            "bounds": list(int8.bounds),
            "confidence": int8.confidence,
            "accuracy_verdict": int8.accuracy.text,
            "accepted": int8.accepted,
            "sizes": int8.sizes.to_dict(orient="index"),
        },
        "int8_instruction_sets": quantize.int8_instruction_sets(),
        "om_flow": om_flow,
        "om_tools": {name: {"kind": t.kind, "path": t.path} for name, t in tools.items()},
        "om_models": [
            {
                "seq": m.seq,
                "batch": m.batch,
                "atc": m.atc.command,
                "atc_result": m.atc.message,
                "om": m.om,
            }
            for m in om_models
        ],
        "fused": stages.fused,
        "parity": stages.parity,
        "skipped_seq_lengths": list(skipped_seq_lengths),
        "runner_summary": dict(runner_summary),
        "sweep": table.drop(columns=["predictions"]).to_dict(orient="records"),
    }


def om_sentence(om_flow: str, om_models: Sequence) -> str:
    """What happened to the seed's OM step on this machine, in one sentence."""
    converted = [m for m in om_models if m.om is not None]
    if om_flow == "cann":
        return (
            f"CANN's ATC converted {len(converted)} of {len(om_models)} static models to `.om` and "
            "the seed's ais_bench line ran them; the postprocess scored their outputs beside PyTorch."
        )
    if om_flow == "stand-ins":
        return (
            f"The test stand-ins of ATC and ais_bench took the seed's exact command lines and "
            f"wrapped {len(converted)} static models, which ran on ONNX Runtime on this CPU: the "
            "file layout and the scoring are the seed's, no Ascend NPU was involved."
        )
    return (
        "The OM step was skipped: ATC and ais_bench (CANN) are not on this machine. The seed's ATC "
        f"command lines for the {len(om_models)} static model(s) are printed above, ready for a "
        "machine with CANN."
    )


def summary_lines(
    *,
    found: Mapping[str, float],
    stages,
    bench: albert.Benchmark,
    int8: Int8Verdict,
    om_flow: str,
    om_models: Sequence,
    n_sentences: int,
    eval_seq: int,
) -> list[str]:
    """The Summary's bullets, from this run's outputs."""
    fused = ", ".join(f"{v} {k}" for k, v in stages.fused.items())
    found_est = estimates(bench)
    onnx = [n for n in found_est if n != albert.TORCH]
    fastest = max(onnx, key=lambda n: found_est[n].value)
    vs_torch = verdicts.compare(found_est[fastest], found_est[albert.TORCH], what="samples/s")
    opt_vs_plain = verdicts.compare(found_est["onnx_opt"], found_est["onnx"], what="samples/s")
    timings = [
        f"On this CPU at {shape(bench)}, {label(fastest)} has the highest median of the ONNX "
        f"models; against PyTorch: {vs_torch.text}.",
        f"The fused graph against the plain one: {opt_vs_plain.text}.",
    ]
    if bench.rounds < MIN_ROUNDS:
        timings = [f"The benchmark ran {_rounds(bench.rounds)}: too few to compare the models."]
    return [
        f"{n_sentences} dev sentences went into the seed's per-sample `.npy` layout; the fine-tuned "
        f"ALBERT was exported to ONNX, simplified and optimized ({fused}), and every fp32 graph "
        f"computed PyTorch's logits to within {found['max_abs_logit_diff']:.1e}.",
        *timings,
        f"int8 (seq {eval_seq}): " + "; ".join(int8.lines()) + ".",
        f"The int8 file takes {int8.sizes.loc[label('onnx_int8'), 'file (KiB)']:.0f} KiB against "
        f"{int8.sizes.loc[label('onnx_opt'), 'file (KiB)']:.0f} KiB for the fp32 graph it was "
        "quantized from (each of ALBERT's shared weights quantized once).",
        om_sentence(om_flow, om_models),
    ]
