"""Comparisons worded from what was measured: two figures with their uncertainty, one sentence.

Every comparison a notebook prints comes from here, so that "ahead", "faster" or "no significant
difference" always means the same thing:

* accuracies and other proportions on ``n`` items carry the binomial standard error
  sqrt(p(1 - p) / n); a Pearson or Spearman correlation on ``n`` pairs carries Fisher's
  1 / sqrt(n - 3) on the z scale, turned back into r's scale at the estimate. Two of them differ
  *significantly* when the difference is at least :data:`SIGNIFICANT` standard errors of the
  difference (about the two-sided 95 % level). Where both were scored item by item on the same
  set (``items``), the comparison is paired: what the two got right or wrong together cancels,
  which is what makes it sharper than two separate error bars. For right / wrong items that is
  McNemar's exact test on the items they score differently.
* timings are a median with its interquartile range (IQR, the middle half of the repeats): one
  timing is *faster* than another only when the two IQRs do not overlap, a rule a reader can
  check by eye on a box plot; otherwise "no clear difference at this load".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from nbzoo import metrics

# standard errors of the difference that make a difference "significant" (two-sided ~95 %), and
# the same level as a p-value for the exact paired test: 2 (1 - Phi(2))
SIGNIFICANT = 2.0
P_SIGNIFICANT = math.erfc(SIGNIFICANT / math.sqrt(2))


@dataclass(frozen=True)
class Estimate:
    """A measured figure and its uncertainty. Build one with :func:`proportion`,
    :func:`proportion_of_items`, :func:`correlation` or :func:`timing`."""

    name: str  # what it is the figure of: "THOR", "plain ONNX", "this run"
    value: float  # the estimate: a proportion, a correlation, a median time
    kind: str  # "proportion" | "correlation" | "timing"
    n: int  # items (proportion, correlation) or repeats (timing)
    standard_error: float = math.nan  # proportions and correlations
    quartiles: tuple[float, float] = (math.nan, math.nan)  # timings: (q1, q3)
    unit: str = ""  # timings: "ms", "s", "samples/s"
    items: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        if self.kind == "timing":
            q1, q3 = self.quartiles
            return f"{_num(self.value)} {self.unit} (IQR {_num(q1)}–{_num(q3)})"
        return f"{self.value:.4f} ± {self.standard_error:.4f}"


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def proportion(name: str, value: float, n: int) -> Estimate:
    """An accuracy (or any proportion) measured on ``n`` items."""
    if n < 1:
        raise ValueError(f"{name}: a proportion needs at least one item, got n = {n}")
    se = metrics.proportion_standard_error(value, n)
    return Estimate(name, float(value), "proportion", int(n), standard_error=se)


def proportion_of_items(name: str, correct: Sequence[float], weights=None) -> Estimate:
    """An accuracy from its items: ``correct`` holds 1 / 0 per item (or a weighted share), so that
    two estimates on the same items compare paired."""
    correct = np.asarray(correct, dtype=float)
    w = np.ones_like(correct) if weights is None else np.asarray(weights, dtype=float)
    keep = w > 0
    correct, w = correct[keep], w[keep]
    value = float((correct * w).sum() / w.sum())
    estimate = proportion(name, value, int(keep.sum()))
    return Estimate(**{**estimate.__dict__, "items": correct * w / w.mean()})


def correlation(name: str, r: float, n: int) -> Estimate:
    """A Pearson or Spearman correlation on ``n`` pairs: Fisher's standard error 1 / sqrt(n - 3)
    on the z = atanh(r) scale, carried to r's scale at the estimate (dr/dz = 1 - r²)."""
    if n < 4:
        raise ValueError(f"{name}: a correlation's standard error needs at least 4 pairs, got {n}")
    se = (1.0 - r * r) / math.sqrt(n - 3)
    return Estimate(name, float(r), "correlation", int(n), standard_error=se)


def timing(name: str, samples: Sequence[float], unit: str = "ms") -> Estimate:
    """Repeated timings (or throughputs): their median and interquartile range."""
    values = np.asarray(samples, dtype=float)
    if values.size == 0:
        raise ValueError(f"{name}: no timings")
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return Estimate(name, float(median), "timing", int(values.size), quartiles=(q1, q3), unit=unit)


@dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`compare`: the sentence, and what it rests on."""

    text: str
    significant: bool
    leader: str | None  # the better one's name where the difference is significant
    z: float = math.nan  # difference in standard errors (proportions, correlations)
    ratio: float = math.nan  # a over b (timings)

    def __str__(self) -> str:
        return self.text

    def _repr_markdown_(self) -> str:
        return self.text


def compare(a: Estimate, b: Estimate, *, higher_is_better: bool = True, what: str = "") -> Verdict:
    """One sentence comparing ``a`` with ``b``. ``what`` names the figure ("MLM accuracy");
    ``higher_is_better`` is False for times and losses."""
    if a.kind != b.kind:
        raise ValueError(f"cannot compare a {a.kind} ({a.name}) with a {b.kind} ({b.name})")
    if a.kind == "timing":
        return _compare_timings(a, b, higher_is_better, what)
    diff = a.value - b.value
    se = _difference_standard_error(a, b)
    if se > 0:
        z = diff / se
    else:  # no spread at all (every item agreed): any difference is certain, none is none
        z = math.copysign(math.inf, diff) if diff else 0.0
    of = f"{what} " if what else ""
    figures = f"{of}{a.value:.4f} vs {b.value:.4f}, difference {diff:+.4f} ± {se:.4f}"
    if (discordant := _discordant(a, b)) is not None:
        return _compare_paired_hits(a, b, discordant, higher_is_better, figures, z)
    if abs(z) < SIGNIFICANT:
        return Verdict(
            f"no significant difference between {a.name} and {b.name} at this size "
            f"({figures}: {abs(z):.1f} standard errors)",
            significant=False,
            leader=None,
            z=z,
        )
    better, worse = (a, b) if (diff > 0) == higher_is_better else (b, a)
    return Verdict(
        f"{better.name} ahead of {worse.name} by {abs(z):.1f} standard errors ({figures})",
        significant=True,
        leader=better.name,
        z=z,
    )


def _discordant(a: Estimate, b: Estimate) -> tuple[int, int] | None:
    """For two right / wrong scorings of the same items: (right only in ``a``, right only in
    ``b``); None where the items are not paired hits."""
    if a.items is None or b.items is None or len(a.items) != len(b.items):
        return None
    if not (np.isin(a.items, (0.0, 1.0)).all() and np.isin(b.items, (0.0, 1.0)).all()):
        return None
    return int(((a.items == 1) & (b.items == 0)).sum()), int(
        ((a.items == 0) & (b.items == 1)).sum()
    )


def _compare_paired_hits(
    a: Estimate, b: Estimate, discordant: tuple[int, int], higher_is_better: bool, figures: str,
    z: float,
) -> Verdict:  # fmt: skip
    """McNemar's exact test: only the items the two score differently carry the difference, and
    with few of them the normal approximation is far too sure (4 of 4 one way: z = 2.0, exact
    p = 0.125). Significant at the two-sided level of :data:`SIGNIFICANT` standard errors."""
    from scipy import stats

    only_a, only_b = discordant
    differing = only_a + only_b
    p = stats.binomtest(min(only_a, only_b), differing, 0.5).pvalue if differing else 1.0
    counts = (
        f"{a.name} right on {only_a} items where {b.name} was wrong, {b.name} on {only_b} the "
        f"other way: McNemar's exact test, p = {p:.2g}; {figures}"
    )
    if p >= P_SIGNIFICANT:
        return Verdict(
            f"no significant difference between {a.name} and {b.name} at this size ({counts})",
            significant=False,
            leader=None,
            z=z,
        )
    better, worse = (a, b) if (only_a > only_b) == higher_is_better else (b, a)
    return Verdict(f"{better.name} ahead of {worse.name} ({counts})", True, better.name, z=z)


def _difference_standard_error(a: Estimate, b: Estimate) -> float:
    if a.items is not None and b.items is not None and len(a.items) == len(b.items):
        d = a.items - b.items  # paired: the same items scored twice
        return float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
    return math.hypot(a.standard_error, b.standard_error)


def _compare_timings(a: Estimate, b: Estimate, higher_is_better: bool, what: str) -> Verdict:
    ratio = a.value / b.value
    (a1, a3), (b1, b3) = a.quartiles, b.quartiles
    of = f" ({what})" if what else ""
    figures = f"{a.name} {a}, {b.name} {b}{of}"
    if a3 < b1 or b3 < a1:
        better, worse = (a, b) if (a.value > b.value) == higher_is_better else (b, a)
        word = "ahead of" if higher_is_better else "faster than"
        factor = max(ratio, 1 / ratio)
        return Verdict(
            f"{better.name} {word} {worse.name}, {factor:.2f}× by the medians: {figures}",
            significant=True,
            leader=better.name,
            ratio=ratio,
        )
    return Verdict(
        f"no clear difference between {a.name} and {b.name} at this load: the interquartile "
        f"ranges overlap ({figures})",
        significant=False,
        leader=None,
        ratio=ratio,
    )


def rank(estimates: Sequence[Estimate], *, higher_is_better: bool = True, what: str = "") -> str:
    """The estimates in order, best first, each compared with the next: a paragraph."""
    ordered = sorted(estimates, key=lambda e: e.value, reverse=higher_is_better)
    lines = [
        compare(x, y, higher_is_better=higher_is_better, what=what).text
        for x, y in zip(ordered, ordered[1:], strict=False)
    ]
    return "; ".join(lines) + "." if lines else ""
