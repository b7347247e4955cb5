"""nbzoo.report: the results overview works with any subset of results, gaps included."""

from __future__ import annotations

import math

import pytest

from nbzoo import metrics, report
from nbzoo.device import Runtime


@pytest.fixture
def two_runs(isolated_results):
    rt = Runtime(kind="cpu", precision="fp32")
    metrics.write_results(
        "01_albert_glue",
        preset="demo",
        rt=rt,
        metrics={"sst2_accuracy": 0.81, "stsb_pearson": float("nan")},
        reference={
            "source": "seeds/002_albert.md",
            "setting": "1 x V100",
            "metrics": {"sst2_accuracy": 0.927},
            "samples_per_second": 517,
        },
        samples_per_second=1400.0,
    )
    metrics.write_results(
        "05_longformer_mlm",
        preset="full",
        rt=Runtime(kind="cpu", precision="bf16"),
        metrics={"perplexity": 12.5},
        reference={"source": "seeds/001_longformer.md", "metrics": {"perplexity": 3.0527}},
    )
    return metrics.read_results()


def test_runs_table_has_device_precision_preset_and_throughputs(two_runs):
    table = report.runs_table(two_runs).set_index("notebook")
    assert table.loc["01_albert_glue", "preset"] == "demo"
    assert table.loc["05_longformer_mlm", "precision"] == "bf16"
    assert table.loc["01_albert_glue", "device"].startswith("cpu (")
    assert table.loc["01_albert_glue", "samples/s"] == 1400.0
    assert table.loc["01_albert_glue", "seed samples/s"] == 517
    assert table.loc["05_longformer_mlm", "samples/s"] is None or math.isnan(
        table.loc["05_longformer_mlm", "samples/s"]
    )


def _texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_metric_charts_put_each_figure_next_to_the_seeds(two_runs):
    fig = report.plot_metrics(two_runs)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 3 and any("sst2_accuracy" in t for t in titles)
    sst2 = next(ax for ax in fig.axes if "sst2_accuracy" in ax.get_title())
    heights = [p.get_height() for p in sst2.patches]
    assert heights == pytest.approx([0.81, 0.927])
    assert "0.81" in _texts(fig) and "0.927" in _texts(fig)
    # a NaN metric and a figure the seed does not report are labelled gaps, not zero bars
    pearson = next(ax for ax in fig.axes if "stsb_pearson" in ax.get_title())
    assert [t.get_text() for t in pearson.texts] == ["NaN", "not reported"]
    assert not any(p.get_visible() for p in pearson.patches)


def test_throughput_chart_is_log_scale_with_gaps(two_runs):
    fig = report.plot_throughput(two_runs)
    albert, longformer = [ax for ax in fig.axes if ax.get_title()]
    assert albert.get_yscale() == "log"
    assert [p.get_height() for p in albert.patches] == pytest.approx([1400.0, 517.0])
    assert [t.get_text() for t in longformer.texts] == ["not reported", "not reported"]


def test_no_results_yet_gives_a_message_not_an_error(isolated_results):
    records = metrics.read_results()
    assert records == []
    assert report.runs_table(records).empty
    assert "no results yet" in _texts(report.plot_metrics(records))[0]
    assert "no results yet" in _texts(report.plot_throughput(records))[0]
