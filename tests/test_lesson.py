"""nbzoo.lesson: a demo that did not learn records nothing; the table sets the run beside what a
model that learnt nothing scores, and the seed's figure only as a labelled reference."""

from __future__ import annotations

import json

import pytest

from nbzoo import device, lesson, verdicts
from nbzoo.presets import Config


@pytest.fixture
def rt():
    return device.setup("cpu", "fp32", 0)


def demo_cfg(tmp_path, preset="demo"):
    return Config(preset=preset, output_dir=str(tmp_path / "results"), devices=1, nnodes=1)


def sst2_check(value):
    return lesson.Check("sst2_accuracy", value, verdicts.proportion("majority class", 0.5, 500))


def test_an_accuracy_must_beat_what_chance_gives_the_majority_class_one_time_in_3_million():
    """The count of right answers is binomial: the exact quantile, close to the normal margin of
    5 standard errors (0.612) where that approximation holds."""
    check = sst2_check(0.614)
    assert check.needed == pytest.approx(0.614) and lesson.CHANCE == pytest.approx(2.87e-7, 0.01)
    assert check.learnt and not sst2_check(0.612).learnt and not sst2_check(float("nan")).learnt
    assert 0.5 + 5 * (0.25 / 500) ** 0.5 == pytest.approx(0.612, abs=1e-3)


def test_a_lopsided_small_set_cannot_show_learning_and_says_so():
    """A majority class of 90 % on 64 items: even 64 right answers happen by chance more often
    than one time in 3 million, so no run can pass; the check says why instead of asking for
    109 % (the normal margin)."""
    check = lesson.Check("accuracy", 1.0, verdicts.proportion("majority class", 0.9, 64))
    assert check.needed > 1 and not check.learnt
    assert "64 items cannot show it" in lesson.Checks([check]).failures


def test_a_demo_that_did_not_learn_records_nothing_and_says_why(tmp_path, rt):
    cfg = demo_cfg(tmp_path)
    checks = lesson.learning_checks(cfg, sst2_check(0.52))
    assert checks.required and not checks.passed
    assert "sst2_accuracy 0.5200 is not above" in checks.failures
    with pytest.raises(RuntimeError, match="no results recorded"):
        lesson.record("01_albert_glue", cfg, rt, {"sst2_accuracy": 0.52}, checks=checks)
    assert not (tmp_path / "results").exists()


def test_a_full_preset_records_its_checks_without_stopping(tmp_path, rt):
    """A full preset rehearsed on random stand-in weights does not learn in two steps; its
    record says so instead of the run stopping."""
    cfg = demo_cfg(tmp_path, preset="full")
    checks = lesson.learning_checks(cfg, sst2_check(0.5))
    assert not checks.required
    shown = lesson.record("01_albert_glue", cfg, rt, {"sst2_accuracy": 0.5}, checks=checks)
    record = json.loads(shown.path.read_text())
    assert record["extra"]["learnt"] == {"sst2_accuracy": False}


def test_the_results_table_labels_the_seed_as_a_reference_and_keeps_cpu_speed_alone(tmp_path, rt):
    cfg = demo_cfg(tmp_path)
    checks = lesson.learning_checks(cfg, sst2_check(0.9))
    shown = lesson.record(
        "01_albert_glue", cfg, rt, {"sst2_accuracy": 0.9}, checks=checks, samples_per_second=2000
    )
    row = shown.table.loc["sst2_accuracy"]
    assert row["this run"] == 0.9 and row["seed, for reference"] == 0.927
    assert "V100" in row["the seed's setting"]
    assert row["a model that learnt nothing"] == "0.5 (majority class)"
    assert "Training throughput: 2000 samples/s (cpu" in shown.note
    assert "the seed:" not in shown.note  # a CPU demo's speed never beside a V100's
    assert "not meant to reach" in shown.note
    assert json.loads(shown.path.read_text())["metrics"] == {"sst2_accuracy": 0.9}


def test_a_summary_is_markdown_bullets_of_what_ran():
    text = lesson.summary(["one", "", "two"]).data
    assert text == "* one\n* two"


def test_a_lower_is_better_metric_must_fall_below_its_baseline():
    unigram = verdicts.Estimate("unigram model", 64.0, "proportion", 1000, standard_error=1.0)
    assert lesson.Check("perplexity", 31.0, unigram, higher_is_better=False).learnt
    assert not lesson.Check("perplexity", 61.0, unigram, higher_is_better=False).learnt
    assert (
        "not below 59.0000"
        in lesson.Checks(
            [lesson.Check("perplexity", 61.0, unigram, higher_is_better=False)]
        ).failures
    )


def test_the_record_keeps_each_checked_metrics_baseline(tmp_path, rt):
    cfg = demo_cfg(tmp_path)
    checks = lesson.learning_checks(cfg, sst2_check(0.9))
    shown = lesson.record("01_albert_glue", cfg, rt, {"sst2_accuracy": 0.9}, checks=checks)
    baseline = json.loads(shown.path.read_text())["extra"]["baselines"]["sst2_accuracy"]
    assert baseline["value"] == 0.5 and baseline["what"] == "majority class"
    assert baseline["higher_is_better"] is True
