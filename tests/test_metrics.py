import json
import math

import numpy as np
import pytest

from nbzoo import device, metrics


def test_classification_and_correlation_metrics():
    assert metrics.accuracy([1, 0, 1, 1], [1, 0, 0, 1]) == 0.75
    assert metrics.f1([1, 0, 1, 1], [1, 0, 0, 1]) == pytest.approx(0.8)
    x = np.arange(10.0)
    assert metrics.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert metrics.spearman(x, x**3) == pytest.approx(1.0)
    assert metrics.pearson(x, -x) == pytest.approx(-1.0)


def test_masked_token_accuracy_scores_only_labelled_positions():
    logits = np.zeros((1, 4, 3))
    logits[0, [0, 1, 2, 3], [2, 1, 0, 0]] = 1.0  # predictions 2, 1, 0, 0
    labels = np.array([[2, -100, 1, -100]])
    assert metrics.masked_token_accuracy(logits, labels) == 0.5
    with pytest.raises(ValueError, match="no labelled"):
        metrics.masked_token_accuracy(logits, np.full((1, 4), -100))


def test_perplexity_and_mfu():
    assert metrics.perplexity(math.log(3.0)) == pytest.approx(3.0)
    assert metrics.mfu(989e12, 1.0, "NVIDIA H100 80GB HBM3") == pytest.approx(1.0)
    assert metrics.mfu(1.0, 1.0, "some cpu") is None


def test_results_record_has_the_required_fields(isolated_results):
    rt = device.Runtime(kind="cpu", precision="fp32")
    path = metrics.write_results(
        "01_albert_glue",
        preset="demo",
        rt=rt,
        metrics={"sst2_accuracy": np.float64(0.9)},
        reference={"source": "seeds/002_albert.md", "metrics": {"sst2_accuracy": 0.927}},
        samples_per_second=100.0,
    )
    record = json.loads(path.read_text())
    for key in (
        "notebook",
        "preset",
        "device",
        "precision",
        "devices",
        "metrics",
        "reference",
        "samples_per_second",
        "versions",
        "finished_at",
    ):
        assert key in record
    assert record["metrics"] == {"sst2_accuracy": 0.9} and record["versions"]["torch"]
    assert path.parent == isolated_results / "results" and not list(path.parent.glob("*.tmp"))
    assert metrics.read_results()[0]["notebook"] == "01_albert_glue"


def test_metrics_must_be_numbers(isolated_results):
    with pytest.raises(TypeError, match="flat dict of numbers"):
        metrics.write_results(
            "x",
            preset="demo",
            rt=device.Runtime("cpu", "fp32"),
            metrics={"a": "high"},
            reference={},
        )


def test_json_records_keep_objects_with_the_keys_and_name_a_broken_file(tmp_path, capsys):
    (tmp_path / "b.json").write_text(json.dumps({"notebook": "b", "metrics": {}}))
    (tmp_path / "a.json").write_text(json.dumps({"notebook": "a", "metrics": {"x": 1}}))
    (tmp_path / "other.json").write_text(json.dumps({"case": "c"}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "notes.txt").write_text("{not json")
    found = metrics.read_json_records(tmp_path, ("notebook", "metrics"))
    assert [r["notebook"] for r in found] == ["a", "b"]
    # the results table needs preset, device and precision: records without them are named
    assert metrics.read_results(tmp_path) == []
    err = capsys.readouterr().err
    assert "a.json: a record without preset, device, precision" in err and "b.json" in err


def test_a_broken_results_file_is_named_and_the_others_still_listed(tmp_path, capsys):
    from nbzoo import cli

    record = {"notebook": "01_albert_glue", "preset": "demo", "device": "cpu", "precision": "fp32"}
    record["metrics"] = {"accuracy": 0.75}
    (tmp_path / "a.json").write_text(json.dumps(record))
    (tmp_path / "broken.json").write_text('{"notebook": "x", "metrics": {\n')
    (tmp_path / "latin1.json").write_bytes('{"notebook": "é"}'.encode("latin-1"))
    (tmp_path / "dir.json").mkdir()
    found = metrics.read_json_records(tmp_path, ("notebook", "metrics"))
    assert [r["notebook"] for r in found] == ["01_albert_glue"]
    err = capsys.readouterr().err
    assert f"skipped {tmp_path / 'broken.json'}: not valid JSON at line 2, column 1" in err
    assert f"skipped {tmp_path / 'latin1.json'}: not UTF-8 text" in err
    assert f"skipped {tmp_path / 'dir.json'}: unreadable" in err
    assert cli.main(["results", "--dir", str(tmp_path)]) == 0  # a table, no traceback
    assert "01_albert_glue" in capsys.readouterr().out
