import subprocess
import sys

import pytest

from nbzoo import cli


def nbzoo(*args):
    return subprocess.run(
        [sys.executable, "-m", "nbzoo.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["run", "01_albert_glue", "--preset", "nope"],
            "unknown preset 'nope' for 01_albert_glue; choose one of: demo, full, perf",
        ),
        (
            ["run", "01_albert_glue", "-p", "no_such_knob=1"],
            "unknown parameter 'no_such_knob' for 01_albert_glue; choose one of: preset, device",
        ),
        (
            ["run", "01_albert_glue", "-p", "epochs=three"],
            "parameter epochs expects int, got 'three'",
        ),
        (["run", "01_albert_glue", "-p", "epochs"], "-p expects key=value"),
        (
            ["run", "no_such_notebook"],
            "unknown notebook 'no_such_notebook'; choose one of: 00_results, 01_albert_glue",
        ),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(args, message):
    proc = nbzoo(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("nbzoo: error: ") and message in lines[0]


def test_values_are_parsed_as_the_declared_type():
    assert cli.convert("epochs", "3", "Optional[int]") == 3
    assert cli.convert("lr", "1", "Optional[float]") == 1.0 and isinstance(
        cli.convert("lr", "1", "float"), float
    )
    assert cli.convert("task", "sst2", "Optional[str]") == "sst2"
    assert cli.convert("sizes", "{'train': 10}", "Optional[dict]") == {"train": 10}
    assert cli.convert("flag", "false", "bool") is False
    assert cli.convert("epochs", "None", "Optional[int]") is None
    with pytest.raises(cli.UsageError, match="expects int"):
        cli.convert("epochs", "True", "int")


def test_list_shows_notebooks_and_presets():
    proc = nbzoo("list")
    assert proc.returncode == 0 and "01_albert_glue" in proc.stdout and "demo, full" in proc.stdout


def test_notebook_names_resolve_with_or_without_their_number():
    assert cli.find_notebook("albert_glue").name == "01_albert_glue.ipynb"
    assert cli.find_notebook("notebooks/01_albert_glue.ipynb").name == "01_albert_glue.ipynb"


def test_run_injects_only_what_differs_from_the_notebook():
    path = cli.find_notebook("01_albert_glue")
    assert cli.run_parameters(path, "demo", []) == {}  # `make notebooks`: no injected cell
    assert cli.run_parameters(path, "full", []) == {"preset": "full"}
    assert cli.run_parameters(path, "demo", ["epochs=2"]) == {"epochs": 2}
