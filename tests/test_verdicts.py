"""nbzoo.verdicts words a comparison only as strongly as the measurements' uncertainty allows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nbzoo import verdicts


def test_a_proportion_carries_its_binomial_standard_error():
    e = verdicts.proportion("THOR", 0.2, 400)
    assert e.standard_error == pytest.approx(math.sqrt(0.2 * 0.8 / 400))


def test_thor_against_sgd_on_4800_tokens_is_no_significant_difference():
    """06's old demo sentence named THOR the winner at 0.1981 against 0.1951 on ~4,800 tokens."""
    v = verdicts.compare(
        verdicts.proportion("THOR", 0.1981, 4800),
        verdicts.proportion("SGD", 0.1951, 4800),
        what="MLM accuracy",
    )
    assert not v.significant and v.leader is None
    assert v.text.startswith("no significant difference between THOR and SGD at this size")


def test_a_large_difference_is_named_with_its_size_in_standard_errors():
    v = verdicts.compare(verdicts.proportion("a", 0.30, 5000), verdicts.proportion("b", 0.25, 5000))
    assert v.significant and v.leader == "a" and v.z == pytest.approx(5.6, abs=0.1)
    assert v.text.startswith("a ahead of b by 5.6 standard errors")


def test_lower_is_better_turns_the_leader_around():
    v = verdicts.compare(
        verdicts.proportion("a", 0.30, 5000),
        verdicts.proportion("b", 0.25, 5000),
        higher_is_better=False,
    )
    assert v.leader == "b"


def test_paired_items_see_a_difference_that_separate_error_bars_hide():
    """Two models scored on the same 2,000 items, agreeing on all but 30 where b is wrong: the
    unpaired standard error (about 0.014) swamps the 0.015 difference, the paired one does not."""
    rng = np.random.default_rng(0)
    a = (rng.random(2000) < 0.6).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 1)[:30]] = 0
    unpaired = verdicts.compare(
        verdicts.proportion("a", a.mean(), a.size), verdicts.proportion("b", b.mean(), b.size)
    )
    paired = verdicts.compare(
        verdicts.proportion_of_items("a", a), verdicts.proportion_of_items("b", b)
    )
    assert not unpaired.significant and paired.significant and paired.leader == "a"


def test_a_few_items_scored_differently_are_judged_exactly_not_by_the_normal_approximation():
    """4 items right in a and wrong in b, none the other way: z = 2.0 by the normal
    approximation, but McNemar's exact test gives p = 0.125: no significant difference."""
    a = np.zeros(2000)
    a[:1000] = 1
    b = a.copy()
    b[:4] = 0
    v = verdicts.compare(verdicts.proportion_of_items("a", a), verdicts.proportion_of_items("b", b))
    assert not v.significant and "p = 0.12" in v.text and "a right on 4 items" in v.text
    b[:6] = 0  # 6 of 6 one way: p = 0.031
    v = verdicts.compare(verdicts.proportion_of_items("a", a), verdicts.proportion_of_items("b", b))
    assert v.significant and v.leader == "a"


def test_weighted_items_give_the_weighted_accuracy():
    e = verdicts.proportion_of_items("m", [1, 0, 1, 1], weights=[1, 1, 0, 2])
    assert e.value == pytest.approx(3 / 4) and e.n == 3


def test_a_correlation_uses_fishers_standard_error():
    e = verdicts.correlation("pearson", 0.5, 103)
    assert e.standard_error == pytest.approx(0.75 / 10)
    with pytest.raises(ValueError, match="at least 4 pairs"):
        verdicts.correlation("pearson", 0.5, 3)


def test_timings_differ_only_when_their_interquartile_ranges_do_not_overlap():
    fast = verdicts.timing("ONNX", [10, 11, 10.5, 10.2, 10.8])
    slow = verdicts.timing("PyTorch", [20, 21, 19.5, 20.4, 20.9])
    v = verdicts.compare(fast, slow, higher_is_better=False, what="ms per batch")
    assert v.significant and v.leader == "ONNX" and v.text.startswith("ONNX faster than PyTorch")
    noisy = verdicts.timing("PyTorch", [8, 25, 10, 18, 11])  # IQR 10–18
    assert not verdicts.compare(fast, noisy, higher_is_better=False).significant


def test_estimates_of_different_kinds_do_not_compare():
    with pytest.raises(ValueError, match="cannot compare a timing"):
        verdicts.compare(verdicts.timing("t", [1, 2]), verdicts.proportion("p", 0.5, 10))


def test_rank_orders_best_first_and_compares_neighbours():
    text = verdicts.rank(
        [
            verdicts.proportion("SGD", 0.1951, 4800),
            verdicts.proportion("AdamW", 0.1366, 4800),
            verdicts.proportion("THOR", 0.1981, 4800),
        ]
    )
    assert text.index("THOR") < text.index("SGD") < text.index("AdamW")
    assert "no significant difference between THOR and SGD" in text
    assert "SGD ahead of AdamW" in text
