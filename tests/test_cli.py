import ast
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import nbformat
import papermill
import pytest

from nbzoo import cli, run_outputs
from tests.conftest import probe_project

NOTEBOOKS = cli.available_notebooks()


def nbzoo(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "nbzoo.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=None if env is None else {**os.environ, **env},
    )


def one_line_error(proc, code=2):
    """The one line nbzoo wrote (the kernel's own start-up warnings, [IPKernelApp] ..., aside)."""
    lines = [x for x in proc.stderr.strip().splitlines() if not x.startswith("[IPKernelApp]")]
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["run", "01_albert_glue", "--preset", "nope"],
            "unknown preset 'nope' for 01_albert_glue; choose one of: demo, full, full_8p, full_8p_on_1, perf",
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
        (
            ["run", "01_albert_glue", "-p", "epochs=-1"],
            "parameter epochs must be >= 1 (nbzoo/presets/domains.toml), got -1",
        ),
        (["run", "01_albert_glue", "-p", "epochs=1.5"], "parameter epochs expects int, got '1.5'"),
        (["run", "01_albert_glue", "-p", "batch_size=0"], "parameter batch_size must be >= 1"),
        (["run", "01_albert_glue", "-p", "task=mrpc"], "task must be one of sst2, stsb, both"),
        (["run", "01_albert_glue", "--kernel", "nope"], "no Jupyter kernel named 'nope'"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(args, message):
    proc = nbzoo(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("nbzoo: error: ") and message in lines[0]


def test_run_outside_the_checkout_says_where_it_looked_for_notebooks(tmp_path, monkeypatch):
    monkeypatch.delenv("NBZOO_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cli.UsageError, match=f"no notebooks in {tmp_path / 'notebooks'}: run nbzoo "
                       "inside its checkout .* or set NBZOO_ROOT"):  # fmt: skip
        cli.find_notebook("01_albert_glue")


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
    assert cli.find_notebook("01").name == "01_albert_glue.ipynb"
    assert cli.find_notebook("notebooks/01_albert_glue.ipynb").name == "01_albert_glue.ipynb"


def test_run_injects_only_what_differs_from_the_notebook():
    path = cli.find_notebook("01_albert_glue")
    assert cli.run_parameters(path, "demo", []) == {}  # `make notebooks`: no injected cell
    assert cli.run_parameters(path, "full", []) == {"preset": "full"}
    assert cli.run_parameters(path, "demo", ["epochs=2"]) == {"epochs": 2}


def parameters_cell_knobs(path):
    """Every name the parameters cell assigns, read with ast (independently of papermill), with
    its annotation's source where it has one."""
    nb = nbformat.read(path, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    knobs = {}
    for node in ast.parse(cell.source).body:
        if isinstance(node, ast.AnnAssign):
            knobs[node.target.id] = ast.unparse(node.annotation)
        elif isinstance(node, ast.Assign):
            knobs.update({t.id: None for t in node.targets if isinstance(t, ast.Name)})
    return knobs


@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_papermill_help_notebook_lists_every_knob_of_the_parameters_cell(stem):
    path = cli.notebooks_dir() / f"{stem}.ipynb"
    proc = subprocess.run(
        [sys.executable, "-m", "papermill", "--help-notebook", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    listed = dict(re.findall(r"^  (\w+): (.+?) \(default", proc.stdout, re.MULTILINE))
    knobs = parameters_cell_knobs(path)
    missed = [k for k in knobs if k not in listed]
    assert not missed, (
        f"papermill does not read {missed}: one line per knob, `name: Optional[int] = None  # help`"
        " (not `int | None`), no '=' in the comment"
    )
    assert list(listed) == list(knobs)
    for name, annotation in knobs.items():
        assert annotation is None or listed[name] == annotation, (name, listed[name])


@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_plain_papermill_warns_of_no_knob_of_the_cell(stem, tmp_path, caplog):
    """`papermill in.ipynb out.ipynb -p KNOB VALUE` for every knob: no "unknown parameter"
    (prepare_only: papermill parameterizes the notebook without a kernel)."""
    path = cli.notebooks_dir() / f"{stem}.ipynb"
    knobs = parameters_cell_knobs(path)
    with caplog.at_level(logging.WARNING, logger="papermill"):
        papermill.execute_notebook(
            str(path), str(tmp_path / "out.ipynb"), parameters=dict.fromkeys(knobs, 1),
            prepare_only=True, kernel_name="python3",
        )  # fmt: skip
    assert [r.getMessage() for r in caplog.records if "unknown parameter" in r.getMessage()] == []


def test_a_bad_kernel_keeps_the_previous_notebook(tmp_path):
    previous = tmp_path / "prev" / "01_albert_glue.ipynb"
    previous.parent.mkdir()
    previous.write_text("the previous run")
    proc = nbzoo("run", "01_albert_glue", "--kernel", "nope", "--output-dir", str(previous.parent))
    assert "no Jupyter kernel named 'nope'" in one_line_error(proc)
    assert previous.read_text() == "the previous run"
    assert sorted(p.name for p in previous.parent.iterdir()) == ["01_albert_glue.ipynb"]


def test_an_output_dir_that_is_a_file_or_below_one_is_a_usage_error(tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    for folder, why in ((afile, "is a file, not a folder"), (afile / "sub", "cannot be written")):
        proc = nbzoo("run", "01_albert_glue", "--output-dir", str(folder))
        assert why in one_line_error(proc)
    assert afile.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_an_unwritable_output_dir_is_a_usage_error(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o500)
    proc = nbzoo("run", "01_albert_glue", "--output-dir", str(folder))
    assert "cannot be written: Permission denied" in one_line_error(proc)


PROBE = "fail: bool = False"  # the probe notebook's one knob


@pytest.mark.slow
def test_a_run_that_fails_keeps_the_previous_notebook_and_one_that_succeeds_replaces_it(tmp_path):
    env = probe_project(
        tmp_path, "assert not fail, 'failed on purpose\\nmore'\nprint('ran')", PROBE
    )
    out = tmp_path / "out"
    assert nbzoo("run", "01_probe", "--output-dir", str(out), env=env).returncode == 0
    previous = (out / "01_probe.ipynb").read_bytes()
    proc = nbzoo("run", "01_probe", "--output-dir", str(out), "-p", "fail=true", env=env)
    assert "AssertionError: failed on purpose ..." in one_line_error(proc, code=1)
    assert (out / "01_probe.ipynb").read_bytes() == previous
    failed = nbformat.read(out / "01_probe.failed.ipynb", as_version=4)
    assert any(o.get("ename") == "AssertionError" for o in failed.cells[-1].outputs)
    (tmp_path / "notebooks" / "01_probe.failed.ipynb").write_text("{}")  # as in `make notebooks`
    assert "01_probe.failed" not in nbzoo("list", env=env).stdout  # not taken for a tutorial

    proc = nbzoo("run", "01_probe", "--output-dir", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    executed = json.loads((out / "01_probe.ipynb").read_text())
    assert "ran" in "".join(executed["cells"][-1]["outputs"][0]["text"])
    assert (out / "01_probe.ipynb").read_bytes() != previous
    made = [".nbzoo-owned", "01_probe.failed.ipynb", "01_probe.ipynb"]  # out/: made, so marked
    assert sorted(p.name for p in out.iterdir()) == made


def test_a_notebook_of_the_users_where_the_run_would_go_is_refused_before_the_run(tmp_path):
    env = probe_project(tmp_path, "print('ran')", PROBE)
    source = nbformat.read(tmp_path / "notebooks" / "01_probe.ipynb", as_version=4)
    edited = nbformat.from_dict(source)
    edited.cells.append(nbformat.v4.new_markdown_cell("my own notes"))
    for name, mine in (("01_probe.ipynb", "my notebook"), ("01_probe.failed.ipynb", edited)):
        out = tmp_path / f"out-{name}"
        out.mkdir()
        (out / name).write_text(mine if isinstance(mine, str) else nbformat.writes(mine))
        before = (out / name).read_bytes()
        proc = nbzoo("run", "01_probe", "--output-dir", str(out), env=env)
        line = one_line_error(proc)
        assert f"{name} exists and is not an earlier run of 01_probe.ipynb" in line, line
        assert "move it away or name another --output-dir" in line
        assert (out / name).read_bytes() == before and [p.name for p in out.iterdir()] == [name]


def test_an_unedited_run_of_an_older_version_of_the_notebook_is_replaced_an_edited_one_kept(
    tmp_path,
):
    notebook = cli.find_notebook("01_albert_glue")
    older = nbformat.read(notebook, as_version=4)
    older.cells[0].source += "\n(an older version of the lesson)"
    (tmp_path / "older.ipynb").write_bytes(run_outputs.stamped(nbformat.writes(older).encode()))
    recognise = run_outputs.earlier_run_of(notebook)
    assert recognise(tmp_path / "older.ipynb")
    edited = nbformat.read(tmp_path / "older.ipynb", as_version=4)
    edited.cells[1].source += "\nmy own line"
    nbformat.write(edited, tmp_path / "edited.ipynb")
    assert not recognise(tmp_path / "edited.ipynb")
    (tmp_path / "junk.ipynb").write_text("{}")
    assert not recognise(tmp_path / "junk.ipynb") and recognise(notebook)


@pytest.mark.slow
def test_a_kernel_that_dies_ends_in_one_line_and_keeps_the_cells_it_ran(tmp_path):
    code = "print('before')\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)"
    env = probe_project(tmp_path, code, PROBE)
    out = tmp_path / "out"
    proc = nbzoo("run", "01_probe", "--output-dir", str(out), env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("nbzoo: the notebook's kernel died (killed by the system"), last
    assert last.endswith(str(out / "01_probe.failed.ipynb"))
    assert sorted(p.name for p in out.iterdir()) == [".nbzoo-owned", "01_probe.failed.ipynb"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_silences_papermills_echo_of_the_kernel_it_shuts_down(signum, capsys):
    """Ctrl-C (or kill) reaches nbzoo run and its kernel at once; whichever the shutdown races, the
    stop ends in nbzoo's one line, without papermill's "Kernel died" or asyncio's unretrieved
    DeadKernelError. SIGINT as a terminal delivers it, whatever this test process inherited (a
    background job, such as CI's `bash .ci/run &`, inherits SIGINT ignored)."""
    from nbzoo import lifeline

    echoes = [logging.getLogger(name) for name in ("papermill", "asyncio")]
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with lifeline.signals_as_interrupt(on_stop=cli.quiet_shutdown):
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signum)
                time.sleep(5)
        for logger in echoes:
            logger.error("Kernel died while waiting for execute reply.")
        assert "Kernel died" not in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGINT, inherited)
        for logger in echoes:
            logger.disabled = False


@pytest.mark.slow
def test_ctrl_c_during_a_run_ends_in_one_line_and_writes_nothing(tmp_path):
    env = probe_project(tmp_path, "import time\ntime.sleep(60)", PROBE)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(tmp_path / "notebooks" / "01_probe.ipynb", out / "01_probe.ipynb")  # a run of it
    previous = (out / "01_probe.ipynb").read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbzoo.cli", "run", "01_probe", "--output-dir", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        start_new_session=True,  # its own process group, as a terminal's foreground job
        # and Ctrl-C's default action, as a terminal gives it (a background job of a script, such as
        # `make test &`, inherits SIGINT ignored)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not list(out.glob(".01_probe.running-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # the kernel is up and in the sleeping cell
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, stderr = proc.communicate(timeout=60)
    proc.stderr = stderr
    assert one_line_error(proc, code=cli.EXIT_INTERRUPTED).startswith("nbzoo: interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["01_probe.ipynb"]
    assert (out / "01_probe.ipynb").read_bytes() == previous
