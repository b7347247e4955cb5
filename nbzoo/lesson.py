"""What every notebook does after it has trained and measured, each in one call from a cell: check
that the demo learnt, write the results record, show this run's figures beside what a model that
learnt nothing scores (and the seed's, labelled as the reference they are), and a summary.

A results record is written only for a run that succeeded: a demo whose learning check failed
writes nothing (its previous record stays), since a record says "this is what the notebook gives".
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbzoo import fidelity, launch, metrics, report
from nbzoo.metrics import BASELINES
from nbzoo.verdicts import Estimate

# The preset whose notebook stops when it did not learn: the demo is built to learn (a learnable
# task, enough steps); a full preset rehearsed on random stand-in weights for two steps is not.
CHECKED_PRESETS = ("demo",)
# How rarely a model that learnt nothing passes a learning check: the one-sided normal tail beyond
# nbzoo.metrics.LEARNING_SIGMAS standard errors
CHANCE = 0.5 * math.erfc(metrics.LEARNING_SIGMAS / math.sqrt(2))


@dataclass(frozen=True)
class Check:
    """One metric against what a model that learnt nothing scores (its *baseline*)."""

    metric: str
    value: float
    baseline: Estimate  # value and standard error of the baseline on this evaluation set
    higher_is_better: bool = True  # False for a perplexity or a loss

    @property
    def needed(self) -> float:
        """What a model that learnt nothing reaches by chance with probability below
        :data:`CHANCE` (the one-sided normal tail of :data:`nbzoo.metrics.LEARNING_SIGMAS`
        standard errors, 2.9e-7). An accuracy's count of right answers is binomial, so there it
        is the exact binomial quantile: on a small or lopsided evaluation set the normal margin
        would ask for more than 100 %, or for less than chance allows. Other figures (a
        correlation, a perplexity) take the baseline's standard error: baseline ± 5 of them."""
        base = self.baseline
        if base.kind == "proportion" and self.higher_is_better:
            from scipy.stats import binom

            # binom.isf: the largest count that chance exceeds with probability <= CHANCE
            return float(binom.isf(CHANCE, base.n, base.value) + 1) / base.n
        margin = metrics.LEARNING_SIGMAS * base.standard_error
        return base.value + (margin if self.higher_is_better else -margin)

    @property
    def learnt(self) -> bool:
        if not math.isfinite(self.value):
            return False
        if self.baseline.kind == "proportion" and self.higher_is_better:
            # counts, not floats: 0.612 of 500 is 306 right answers
            return round(self.value * self.baseline.n) >= round(self.needed * self.baseline.n)
        return self.value > self.needed if self.higher_is_better else self.value < self.needed

    def row(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "this run": self.value,
            "a model that learnt nothing": f"{self.baseline.value:.4f} ({self.baseline.name})",
            "needed to count as learnt": self.needed,
            "learnt": self.learnt,
        }


@dataclass
class Checks:
    """A notebook's learning checks. ``required`` (the demo preset) makes a failed check stop the
    notebook (the cell's ``assert``) and keeps :func:`record` from writing."""

    checks: list[Check]
    required: bool = True

    @property
    def passed(self) -> bool:
        return all(c.learnt for c in self.checks)

    @property
    def failures(self) -> str:
        missed = [c for c in self.checks if not c.learnt]
        return "the model did not learn: " + "; ".join(
            f"{c.metric} {c.value:.4f} is not {'above' if c.higher_is_better else 'below'} "
            f"{c.needed:.4f}, which a model that learnt nothing ({c.baseline.name}, "
            f"{c.baseline.value:.4f}) does not pass by chance"
            + (
                f" (beyond 100 %: {c.baseline.n} items cannot show it, use a larger evaluation set)"
                if c.baseline.kind == "proportion" and c.needed > 1
                else ""
            )
            for c in missed
        )

    def table(self):
        import pandas as pd

        return pd.DataFrame([c.row() for c in self.checks]).set_index("metric")

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()

    def __repr__(self) -> str:
        return self.table().to_string()


def learning_checks(cfg: Mapping[str, Any], *checks: Check) -> Checks:
    """The checks of one run; required under the demo preset."""
    return Checks(list(checks), required=cfg.get("preset") in CHECKED_PRESETS)


@dataclass
class Results:
    """This run's figures as the notebook shows them, and where they were recorded."""

    table: Any  # pandas DataFrame
    path: Path | None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def _repr_html_(self) -> str:
        where = f"Recorded in <code>{html.escape(str(self.path))}</code>. " if self.path else ""
        return f"{self.table._repr_html_()}<p>{where}{html.escape(self.note)}</p>"

    def __repr__(self) -> str:
        where = f"Recorded in {self.path}. " if self.path else ""
        return f"{self.table.to_string()}\n{where}{self.note}"


def record(
    stem: str,
    cfg: Mapping[str, Any],
    rt,
    scores: Mapping[str, float],
    *,
    checks: Checks | None = None,
    samples_per_second: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Results:
    """Write ``results/<stem>.json`` for a run that succeeded and return the table to show.

    Refuses (raises, writes nothing) when ``checks`` are required and failed. The table holds this
    run's figures, the learnt-nothing baseline of each checked metric, and -- labelled with the
    seed's hardware and data -- the seed's figure where it has one: a reference, which the demo (a
    tiny model on generated data) is not meant to reach."""
    if checks is not None and checks.required and not checks.passed:
        raise RuntimeError(f"{stem}: no results recorded: {checks.failures}")
    reference = fidelity.reference(stem)
    recorded_rt = launch.recorded_runtime(rt, cfg)
    learning = {c.metric: c for c in checks.checks} if checks else {}
    path = metrics.write_results(
        stem,
        preset=cfg["preset"],
        rt=recorded_rt,
        metrics=scores,
        reference=reference,
        samples_per_second=samples_per_second,
        output_dir=cfg.get("output_dir"),
        extra={
            **(extra or {}),
            "learnt": {m: c.learnt for m, c in learning.items()},
            BASELINES: {
                m: {
                    "value": c.baseline.value,
                    "standard_error": c.baseline.standard_error,
                    "what": c.baseline.name,
                    "higher_is_better": c.higher_is_better,
                }
                for m, c in learning.items()
            },
        },
    )
    saved = json.loads(path.read_text(encoding="utf-8"))
    table = report.metrics_table([saved]).drop(columns=["notebook", "preset"]).set_index("metric")
    notes = []
    if samples_per_second is not None:
        run = report.runs_table([saved]).iloc[0]
        speed = f"Training throughput: {samples_per_second:.4g} samples/s ({run['device']}, "
        speed += f"{run['processes']} process(es), {run['precision']})"
        seed = run["seed's samples/s (its setting)"]
        notes.append(speed + (f"; the seed: {seed}." if seed != report.MISSING else "."))
    if cfg["preset"] == "demo":
        notes.append(
            "The demo trains a tiny model on generated data: its figures show that the pipeline "
            "learns, measured against a model that learnt nothing. The seed's column is the real "
            "model on the real data, a reference the demo is not meant to reach."
        )
    return Results(table, path, " ".join(notes))


def summary(lines: Iterable[str]):
    """A Summary cell's output: the bullets, each computed from this run's outputs."""
    from IPython.display import Markdown

    return Markdown("\n".join(f"* {line}" for line in lines if line))
