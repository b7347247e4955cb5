"""The results overview of notebooks/00_results.ipynb: every ``results/*.json`` side by side.

Records come from :func:`nbzoo.metrics.read_results`; the per-metric table is
:func:`nbzoo.metrics.results_table` (the one ``nbzoo results`` prints). This module adds the
per-run table (device, precision, preset, throughput) and the bar charts of this project's
figures next to the seeds'. Any subset of notebooks may have results; a figure missing on
either side (no seed figure, a NaN metric) is drawn as a labelled gap, never as zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

THIS, SEED = "this run", "seed (reference)"
COLORS = {THIS: "#4a90d9", SEED: "#b0b0b0"}


def _number(value: Any) -> float | None:
    """A figure as float; None when absent (NaN stays NaN: computed, but undefined)."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def runs_table(records: Sequence[Mapping[str, Any]]):
    """One row per results file: where and how it ran, its throughput and the seed's."""
    import pandas as pd

    rows = []
    for rec in records:
        ref = rec.get("reference", {}) or {}
        rows.append(
            {
                "notebook": rec["notebook"],
                "preset": rec.get("preset"),
                "device": f"{rec.get('device')} ({rec.get('device_name', '?')})",
                "devices": rec.get("devices", 1),
                "precision": rec.get("precision"),
                "samples/s": _number(rec.get("samples_per_second")),
                "seed samples/s": _number(ref.get("samples_per_second")),
                "seed setting": ref.get("setting", ""),
                "seed source": ref.get("source", ""),
                "finished": rec.get("finished_at", ""),
            }
        )
    columns = ["notebook", "preset", "device", "devices", "precision", "samples/s"]
    columns += ["seed samples/s", "seed setting", "seed source", "finished"]
    return pd.DataFrame(rows, columns=columns)


def _run_label(rec: Mapping[str, Any]) -> str:
    return f"{rec['notebook']}\n{rec.get('preset')} · {rec.get('device')} · {rec.get('precision')}"


def _empty(fig, message: str):
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center")
    return fig


def _pair(ax, values: Mapping[str, float | None], fmt: str, log: bool = False) -> None:
    """Two bars (this run, seed) from a common baseline; a missing or NaN figure is a labelled
    gap ("not reported" / "NaN"), never a bar of height zero."""
    names = list(values)
    finite = [v for v in values.values() if v is not None and math.isfinite(v)]
    if log:
        positive = [v for v in finite if v > 0] or [1.0]
        lo, hi = min(positive) / 4, max(positive) * 4
    else:
        lo, hi = min(finite + [0.0]) * 1.25, max(finite + [0.0]) * 1.25 or 1.0
    gap = lo if log else 0.0  # height of a hidden bar (a log axis has no zero)
    heights = [v if v is not None and math.isfinite(v) else gap for v in values.values()]
    bars = ax.bar(names, heights, color=[COLORS[n] for n in names])
    for bar, name in zip(bars, names, strict=True):
        x, value = bar.get_x() + bar.get_width() / 2, values[name]
        if value is None or not math.isfinite(value):
            bar.set_visible(False)
            why = "not reported" if value is None else "NaN"
            ax.text(
                x,
                0.03,
                why,
                ha="center",
                va="bottom",
                fontsize=8,
                transform=ax.get_xaxis_transform(),
            )
            continue
        ax.annotate(
            format(value, fmt),
            (x, value),
            ha="center",
            va="bottom" if value >= 0 else "top",
            fontsize=8,
            xytext=(0, 2 if value >= 0 else -2),
            textcoords="offset points",
        )
    if log:
        ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    ax.tick_params(axis="x", labelsize=8)


def plot_metrics(records: Sequence[Mapping[str, Any]], ncols: int = 4):
    """One small chart per (notebook, metric): this run's value next to the seed's."""
    from matplotlib.figure import Figure

    panels = [
        (
            rec,
            name,
            _number(value),
            _number((rec.get("reference") or {}).get("metrics", {}).get(name)),
        )
        for rec in records
        for name, value in rec["metrics"].items()
    ]
    if not panels:
        return _empty(Figure(figsize=(6, 1.5)), "no results yet: run a notebook or `make demo`")
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(3.3 * ncols, 2.9 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax, (rec, name, value, seed) in zip(axes, panels, strict=False):
        _pair(ax, {THIS: value, SEED: seed}, ".4g")
        ax.set_title(f"{name}\n{_run_label(rec)}", fontsize=8)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    fig.suptitle("metrics: this project's runs next to the seeds' figures (grey)")
    return fig


def plot_throughput(records: Sequence[Mapping[str, Any]]):
    """samples/s of every run next to the seed's (log scale: a CPU demo and 8 NPUs differ by
    orders of magnitude, and the seed's figure is for its own model size and device)."""
    from matplotlib.figure import Figure

    if not records:
        return _empty(Figure(figsize=(6, 1.5)), "no results yet: run a notebook or `make demo`")
    ncols = min(4, len(records))
    nrows = math.ceil(len(records) / ncols)
    fig = Figure(figsize=(3.3 * ncols, 2.9 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax, rec in zip(axes, records, strict=False):
        seed = _number((rec.get("reference") or {}).get("samples_per_second"))
        _pair(ax, {THIS: _number(rec.get("samples_per_second")), SEED: seed}, ".4g", log=True)
        ax.set_title(_run_label(rec), fontsize=8)
        ax.set_ylabel("samples/s", fontsize=8)
    for ax in axes[len(records) :]:
        ax.axis("off")
    fig.suptitle("throughput (samples/s): this project's runs next to the seeds' (grey)")
    return fig
