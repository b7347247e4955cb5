"""nbzoo.report: the overview sets each run beside what a model that learnt nothing scores, the
seed's figure only as a labelled reference, and works with any subset of results."""

from __future__ import annotations

import pytest

from nbzoo import metrics, report
from nbzoo.device import Runtime


@pytest.fixture
def two_runs(isolated_results, monkeypatch):
    monkeypatch.setattr("nbzoo.device.accelerator_name", lambda rt: f"a {rt.kind} device")
    metrics.write_results(
        "01_albert_glue",
        preset="demo",
        rt=Runtime(kind="cpu", precision="fp32"),
        metrics={"sst2_accuracy": 0.81, "stsb_pearson": float("nan")},
        reference={
            "source": "seeds/002_albert.md",
            "setting": "1 x V100",
            "metrics": {"sst2_accuracy": 0.927},
            "samples_per_second": 517,
        },
        samples_per_second=1400.0,
        extra={
            metrics.BASELINES: {
                "sst2_accuracy": {"value": 0.5, "standard_error": 0.02, "what": "majority class"}
            }
        },
    )
    metrics.write_results(
        "05_longformer_mlm",
        preset="full",
        rt=Runtime(kind="cuda", precision="bf16"),
        metrics={"perplexity": 12.5},
        reference={
            "source": "seeds/001_longformer.md",
            "setting": "8 x GPU",
            "metrics": {"perplexity": 3.0527},
            "samples_per_second": 213.03,
        },
        samples_per_second=190.0,
        extra={
            metrics.BASELINES: {
                "perplexity": {
                    "value": 60.0,
                    "standard_error": 2.0,
                    "what": "unigram model",
                    "higher_is_better": False,
                }
            }
        },
    )
    return metrics.read_results()


def test_a_cpu_demos_speed_never_stands_beside_the_seeds(two_runs):
    table = report.runs_table(two_runs).set_index("notebook")
    assert table.loc["01_albert_glue", "samples/s"] == 1400.0
    assert table.loc["01_albert_glue", "seed's samples/s (its setting)"] == report.MISSING
    assert table.loc["05_longformer_mlm", "seed's samples/s (its setting)"] == "213.03 (8 x GPU)"


def test_metrics_stand_beside_their_baseline_and_the_seed_is_a_labelled_reference(two_runs):
    table = report.metrics_table(two_runs).set_index("metric")
    assert table.loc["sst2_accuracy", "a model that learnt nothing"] == "0.5 (majority class)"
    assert table.loc["sst2_accuracy", "seed, for reference"] == 0.927
    assert table.loc["sst2_accuracy", "the seed's setting"] == "1 x V100"
    assert table.loc["stsb_pearson", "this run"] == "not computed"
    assert table.loc["stsb_pearson", "seed, for reference"] == report.MISSING


def test_margins_count_standard_errors_better_than_learning_nothing(two_runs):
    found = dict(report.margins(two_runs))
    assert found["01 sst2_accuracy (demo)"] == pytest.approx((0.81 - 0.5) / 0.02)
    assert found["05 perplexity (full)"] == pytest.approx((60.0 - 12.5) / 2.0)  # lower is better
    fig = report.plot_margins(two_runs, needed=5)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == list(found)


def test_no_results_yet_gives_a_message_not_an_error(isolated_results):
    records = metrics.read_results()
    assert records == []
    assert report.runs_table(records).empty and report.metrics_table(records).empty
    fig = report.plot_margins(records, needed=5)
    assert "no results" in fig.axes[0].texts[0].get_text()


def test_a_record_without_a_preset_is_shown_not_a_traceback(isolated_results):
    metrics.write_results(
        "01_albert_glue", preset="demo", rt=Runtime(kind="cpu", precision="fp32"),
        metrics={"sst2_accuracy": 0.8}, reference={},
    )  # fmt: skip
    (record,) = metrics.read_results()
    del record["preset"]
    assert report.metrics_table([record]).loc[0, "preset"] == report.MISSING
    assert report.runs_table([record]).loc[0, "preset"] == report.MISSING
