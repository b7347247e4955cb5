"""The results overview (notebooks/00_results.ipynb and ``nbzoo results``): every ``results/*.json``.

Each run is shown against what a model that learnt nothing scores on the same evaluation set (the
baseline its notebook recorded: majority class, no correlation, most frequent token, unigram model),
never against the seed: a demo trains a tiny model on generated data, and the seed's figure comes
from the real model on the real data and hardware. The seed's figure appears only in a column of
its own, labelled with that setting, as the reference it is. Throughput is set beside the seed's only
for a run of the seed's recipe on an accelerator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from nbzoo.metrics import BASELINES

MISSING = "—"  # a figure nobody reported (a metric the seed does not give, a run without speed)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _shown(value: Any) -> Any:
    number = _number(value)
    if number is None:
        return MISSING
    return "not computed" if math.isnan(number) else number


def comparable_speed(rec: Mapping[str, Any]) -> bool:
    """A run's throughput stands beside the seed's only for the seed's recipe on an accelerator."""
    return rec.get("preset") in ("full", "full_8p", "perf") and rec.get("device") != "cpu"


def runs_table(records: Sequence[Mapping[str, Any]]):
    """One row per results file: where and how it ran, and its throughput."""
    import pandas as pd

    rows = []
    for rec in records:
        ref = rec.get("reference") or {}
        rows.append(
            {
                "notebook": rec["notebook"],
                "preset": rec.get("preset", MISSING),
                "device": f"{rec.get('device')} ({rec.get('device_name', '?')})",
                "processes": rec.get("devices", 1),
                "precision": rec.get("precision"),
                "samples/s": _shown(rec.get("samples_per_second")),
                "seed's samples/s (its setting)": (
                    f"{ref.get('samples_per_second')} ({ref.get('setting', '')})"
                    if comparable_speed(rec) and ref.get("samples_per_second") is not None
                    else MISSING
                ),
                "finished": rec.get("finished_at", ""),
            }
        )
    return pd.DataFrame(rows, columns=[*rows[0]] if rows else ["notebook"])


def metrics_table(records: Sequence[Mapping[str, Any]]):
    """One row per (notebook, metric): this run, what a model that learnt nothing scores, and the
    seed's figure as a labelled reference (the seed's setting in its own column)."""
    import pandas as pd

    rows = []
    for rec in records:
        ref = rec.get("reference") or {}
        baselines = (rec.get("extra") or {}).get(BASELINES, {})
        for name, value in rec["metrics"].items():
            base = baselines.get(name)
            seed = (ref.get("metrics") or {}).get(name)
            rows.append(
                {
                    "notebook": rec["notebook"],
                    "preset": rec.get("preset", MISSING),
                    "metric": name,
                    "this run": _shown(value),
                    "a model that learnt nothing": (
                        f"{base['value']:.4g} ({base['what']})" if base else MISSING
                    ),
                    "seed, for reference": _shown(seed),
                    "the seed's setting": ref.get("setting", MISSING) if seed is not None else "",
                }
            )
    columns = ["notebook", "preset", "metric", "this run", "a model that learnt nothing"]
    return pd.DataFrame(rows, columns=[*columns, "seed, for reference", "the seed's setting"])


def margins(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, float]]:
    """(label, margin) for every recorded baseline: how many of the baseline's standard errors the
    run is better than a model that learnt nothing (positive: better)."""
    found = []
    for rec in records:
        for name, base in ((rec.get("extra") or {}).get(BASELINES) or {}).items():
            value = _number(rec["metrics"].get(name))
            se = _number(base.get("standard_error"))
            if value is None or not se or math.isnan(value):
                continue
            sign = 1.0 if base.get("higher_is_better", True) else -1.0
            label = f"{rec['notebook'][:2]} {name} ({rec.get('preset')})"
            found.append((label, sign * (value - base["value"]) / se))
    return found


def plot_margins(records: Sequence[Mapping[str, Any]], needed: float):
    """How clearly each run learnt: its distance from a model that learnt nothing, in standard
    errors of that baseline, one bar per metric; ``needed`` (the learning check) marked."""
    from matplotlib.figure import Figure

    found = margins(records)
    if not found:
        fig = Figure(figsize=(6, 1.2))
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "no results with a recorded baseline yet: run `make demo`", ha="center")
        return fig
    labels, values = zip(*found, strict=True)
    fig = Figure(figsize=(7, 0.45 * len(found) + 1.4), layout="constrained")
    ax = fig.subplots()
    shown = [max(v, 0.5) for v in values]  # a log axis: a run at or below the baseline sits at 0.5
    ax.barh(labels, shown, color=["#4a90d9" if v >= needed else "#d9534f" for v in values])
    ax.axvline(needed, color="k", linestyle="--", linewidth=1, label=f"learning check ({needed:g})")
    for y, v in enumerate(values):
        ax.annotate(f"{v:.0f}", (max(v, 0.5), y), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=8)  # fmt: skip
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("better than a model that learnt nothing, in its standard errors (log scale)")
    ax.set_ylabel("notebook, metric (preset)")
    ax.legend(loc="lower right")
    return fig
