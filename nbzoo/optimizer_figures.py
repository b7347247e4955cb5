"""Notebook 06's figures of the optimizer comparison: accuracy curves with their standard-error
bands, the training loss beside what the token frequencies alone give, and the step times with
their spread, measured two ways. Each returns a pyplot figure (shown by the cell that draws it)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from nbzoo.pretraining import Run
from nbzoo.verdicts import SIGNIFICANT

COLORS = {"thor": "C3", "sgd": "C0", "adamw": "C2"}


def _horizontal_boxes() -> dict[str, object]:
    """boxplot's keyword for horizontal boxes: ``orientation`` from matplotlib 3.10, which
    deprecates the older ``vert`` (pyproject admits matplotlib 3.8)."""
    import matplotlib

    major, minor = (int(x) for x in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}


NAMES = {"thor": "THOR", "sgd": "SGD", "adamw": "AdamW"}


def accuracy_curves(runs: list[Run], best: Mapping[str, Run], baseline: float, masked: int):
    """Masked-LM accuracy against optimizer steps and against training wall-clock: each
    optimizer's tuned run bold, with a band of ±2 binomial standard errors on ``masked`` tokens;
    its other settings faint; the most-frequent-token baseline dashed."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for r in runs:
        tuned = best.get(r.optimizer) is r
        acc = np.array([e["mlm_accuracy"] for e in r.evals])
        style = {
            "color": COLORS[r.optimizer],
            "alpha": 1.0 if tuned else 0.3,
            "lw": 2 if tuned else 1,
        }
        for ax, x in zip(axes, ([e["step"] for e in r.evals], r.eval_seconds()), strict=True):
            ax.plot(x, acc, label=r.label if tuned and ax is axes[0] else None, **style)
            if tuned:
                band = SIGNIFICANT * np.sqrt(acc * (1 - acc) / masked)
                ax.fill_between(
                    x, acc - band, acc + band, color=COLORS[r.optimizer], alpha=0.15, lw=0
                )
    for ax in axes:
        ax.axhline(baseline, color="gray", ls="--", lw=1)
    axes[0].plot([], [], color="gray", ls="--", lw=1, label="always the most frequent token")
    axes[0].fill_between([], [], [], color="gray", alpha=0.15, label="±2 standard errors")
    axes[0].set(xlabel="optimizer step", ylabel="masked-LM accuracy (evaluation set)")
    axes[0].set_title("accuracy against steps")
    axes[1].set(
        xlabel="training wall-clock (s, evaluation excluded)", title="accuracy against time"
    )
    axes[0].legend(title="tuned runs (faint: other settings)", fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def loss_curves(best: Mapping[str, Run], unigram_entropy: float):
    """Each tuned run's training loss (masked LM + next sentence, mean of 10 steps) and the loss of
    a model that knows only the token frequencies and guesses the next sentence at chance."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for kind, r in best.items():
        losses = np.array([h["loss"] for h in r.history], dtype=float)
        smooth = (
            np.convolve(losses, np.ones(10) / 10, mode="valid") if len(losses) >= 10 else losses
        )
        steps = [h["step"] for h in r.history][len(losses) - len(smooth) :]
        ax.plot(steps, smooth, color=COLORS[kind], label=r.label)
    ax.axhline(unigram_entropy + math.log(2), color="gray", ls="--", lw=1,
               label="token frequencies only, next sentence at chance")  # fmt: skip
    ax.set(xlabel="optimizer step", ylabel="training loss (nats, mean of 10 steps)")
    ax.set_title("training loss (masked LM + next sentence)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def step_time_boxes(samples: Mapping[str, Mapping[str, list[float]]]):
    """Box plots of :func:`nbzoo.optimizer_comparison.step_time_samples`: a panel for every step and
    one for the mean over each refresh period, a box per optimizer and way of timing (the box spans
    the interquartile range around the median; dots: steps beyond 1.5 IQR from it)."""
    import matplotlib.pyplot as plt

    kinds = [k for k in ("each step", "per refresh period") if any(h.endswith(k) for h in samples)]
    if not kinds:
        raise ValueError("no step times to draw: THOR and AdamW were not both timed")
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 3.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        rows = [(how, opt) for how in samples if how.endswith(kind) for opt in ("adamw", "thor")]
        boxes = ax.boxplot(
            [samples[how][opt] for how, opt in rows],
            **_horizontal_boxes(),
            widths=0.6,
            patch_artist=True,
            flierprops={"ms": 3},
        )
        for patch, (_, opt) in zip(boxes["boxes"], rows, strict=True):
            patch.set(facecolor=COLORS[opt], alpha=0.35)
        labels = [f"{NAMES[opt]}, {how.split(',')[0]}" for how, opt in rows]
        ax.set_yticks(range(1, len(rows) + 1), labels, fontsize=8)
        per = " (mean over each period)" if kind != "each step" else ""
        ax.set(xlabel=f"ms per step{per}", ylabel="optimizer, how timed")
        ax.set_title(f"step time, {kind}")
    fig.tight_layout()
    return fig
