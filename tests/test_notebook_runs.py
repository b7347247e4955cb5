"""Notebooks run headlessly with non-default parameters (nbval runs them on their defaults)."""

import json
import math

import pytest
from papermill.exceptions import PapermillExecutionError

from nbzoo import cli


@pytest.mark.slow
def test_albert_notebook_takes_its_parameters_from_papermill(tmp_path, monkeypatch):
    monkeypatch.setenv("NBZOO_ROOT", str(cli.notebooks_dir().parent))
    out = tmp_path / "results"
    params = {
        "task": "sst2",
        "epochs": 2,
        "batch_size": 16,
        "sample_sizes": {"train": 1200, "dev": 200, "test": 10},
        "data_dir": str(tmp_path / "dataset"),
        "checkpoint_dir": str(tmp_path / "checkpoints"),
        "output_dir": str(out),
    }
    try:
        cli.execute(
            cli.find_notebook("01_albert_glue"), out / "01_albert_glue.ipynb", params, "python3"
        )
    except PapermillExecutionError as exc:
        # 150 steps on 1,200 sentences learn (sst2_accuracy well above 0.5 here); a run that stays
        # under the demo's learning check fails, and records nothing (a record says what the
        # notebook gives). Any other failure is one too.
        assert exc.ename == "AssertionError" and "did not learn" in exc.evalue, exc
        assert not (out / "01_albert_glue.json").exists()
        raise
    record = json.loads((out / "01_albert_glue.json").read_text())
    assert record["preset"] == "demo" and record["device"] == "cpu" and record["devices"] == 1
    assert set(record["metrics"]) == {"sst2_accuracy"}
    assert record["extra"]["steps"] == {
        "sst2": 2 * math.ceil(1200 / 16)
    }  # epochs and batch size took effect
    assert 0.0 <= record["metrics"]["sst2_accuracy"] <= 1.0
    assert record["reference"]["source"] == "seeds/002_albert.md"
    assert (tmp_path / "dataset" / "SST-2" / "train.tsv").exists()


def stream_lines(notebook: dict) -> list[str]:
    return [
        line
        for cell in notebook["cells"]
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream"
        for line in "".join(out["text"]).splitlines()
    ]


def test_committed_demo_run_of_01_prints_one_progress_line_per_training_run():
    """notebooks/01_albert_glue.ipynb holds the outputs of its demo run under papermill (`make
    notebooks`): two training bars of 504 steps each print one line each."""
    notebook = json.loads(cli.find_notebook("01_albert_glue").read_text(encoding="utf-8"))
    lines = stream_lines(notebook)
    progress = [line for line in lines if "it/s" in line or "s/it" in line]
    assert len(progress) == 2 and len(lines) < 100


@pytest.mark.parametrize("stem", cli.available_notebooks())
def test_notebooks_open_on_the_nbzoo_kernel(stem):
    """`make lab` registers the environment as the kernel `nbzoo`; the notebooks ask for it."""
    notebook = json.loads(cli.find_notebook(stem).read_text(encoding="utf-8"))
    assert notebook["metadata"]["kernelspec"]["name"] == "nbzoo"
