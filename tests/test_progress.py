"""nbzoo.progress: the mode chosen for each place, and the bounded line output of `lines`."""

from __future__ import annotations

import io
import os
import time

import pytest
from tqdm import std

from nbzoo import progress
from tests.conftest import run_python


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("NBZOO_PROGRESS", "NBZOO_PROGRESS_EVERY", "CI"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_explicit_mode_wins_and_a_bad_one_is_named(clean_env):
    clean_env.setenv("CI", "true")
    clean_env.setenv("NBZOO_PROGRESS", "terminal")
    assert progress.mode() == "terminal"
    clean_env.setenv("NBZOO_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="NBZOO_PROGRESS='fancy'.*widget, terminal, lines"):
        progress.mode()


def test_ci_and_a_non_terminal_get_lines(clean_env):
    clean_env.setenv("CI", "true")
    assert progress.mode() == "lines"
    clean_env.setenv("CI", "false")
    # pytest captures stderr: not a terminal, not a kernel
    assert progress.mode() == "lines"
    assert isinstance(progress.bar(total=3, disable=True), progress.LineBar)


def test_headless_sets_the_variables_only_inside_and_only_if_unset(clean_env):
    clean_env.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    with progress.headless():
        assert os.environ["NBZOO_PROGRESS"] == "lines"
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert "NBZOO_PROGRESS" not in os.environ and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    clean_env.setenv("NBZOO_PROGRESS", "widget")
    with progress.headless():
        assert os.environ["NBZOO_PROGRESS"] == "widget"
    assert os.environ["NBZOO_PROGRESS"] == "widget"


def _lines(total: int, steps: int, **kwargs) -> list[str]:
    out = io.StringIO()
    bar = progress.LineBar(total=total, file=out, desc="train", **kwargs)
    for _ in range(steps):
        bar.update(1)
        bar.set_postfix(loss="0.5", refresh=False)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    return text.splitlines()


def test_a_quick_bar_prints_one_line_when_it_closes_whatever_its_length():
    for total in (7, 378, 100_000):
        lines = _lines(total, total)
        assert len(lines) == 1, (total, lines)
        assert lines[0].startswith("train: 100%") and f"{total}/{total}" in lines[0]


def test_line_bar_prints_where_an_early_stop_left_it():
    lines = _lines(100, 37, initial=0)
    assert len(lines) == 1 and lines[0].startswith("train:  37%")


def test_a_long_bar_prints_a_line_every_so_many_seconds_and_the_last_one():
    """Long work still moves in a log: a line each ``every`` seconds, however slow the steps
    (tqdm's monitor thread would otherwise drop to a line per step), then the final one."""
    out = io.StringIO()
    bar = progress.LineBar(total=40, file=out, desc="train", every=0.05)
    assert bar.maxinterval == float("inf")
    for _ in range(40):
        time.sleep(0.005)
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert 2 <= len(lines) <= 6, lines  # 0.2 s of steps: about one line per 0.05 s, no more
    assert lines[-1].startswith("train: 100%") and not lines[0].startswith("train:   0%")


def test_terminal_mode_is_plain_tqdm(clean_env):
    clean_env.setenv("NBZOO_PROGRESS", "terminal")
    bar = progress.bar(total=3, disable=True, dynamic_ncols=True)
    assert type(bar) is std.tqdm


def test_a_kernel_gets_the_widget_unless_headless():
    """In a real IPython kernel (no frontend), ``auto`` is the widget and NBZOO_PROGRESS=lines
    (what ``progress.headless`` hands to papermill's kernel) prints plain lines to stdout."""
    pytest.importorskip("ipykernel")
    code = (
        "from ipykernel.inprocess.manager import InProcessKernelManager\n"
        "km = InProcessKernelManager(); km.start_kernel(); kc = km.client(); kc.start_channels()\n"
        "shell = km.kernel.shell\n"
        "shell.run_cell('from nbzoo import progress; import os')\n"
        "r = shell.run_cell('progress.mode()'); print('auto', r.result)\n"
        'shell.run_cell(\'os.environ["NBZOO_PROGRESS"] = "lines"\')\n'
        "r = shell.run_cell('b = progress.bar(total=5); b.fp._wrapped is __import__(\"sys\").stdout')\n"
        "print('lines', r.result)\n"
    )
    env = {"NBZOO_PROGRESS": "", "CI": ""}
    proc = run_python(code, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "auto widget" in proc.stdout and "lines True" in proc.stdout


def test_a_quick_evaluation_shows_no_bar_and_a_long_one_does(clean_env, capsys):
    clean_env.setenv("NBZOO_PROGRESS", "lines")
    assert list(progress.eval_bar(range(5), "evaluate")) == list(range(5))
    assert "evaluate" not in capsys.readouterr().err  # under NBZOO_PROGRESS_EVAL_DELAY (5 s)
    clean_env.setenv("NBZOO_PROGRESS_EVAL_DELAY", "0")
    clean_env.setenv("NBZOO_PROGRESS_EVERY", "0")  # a line at every step, as a long run's
    for _ in progress.eval_bar(range(5), "evaluate"):
        time.sleep(0.01)
    assert "evaluate:" in capsys.readouterr().err


def test_predict_shows_its_progress(clean_env, capsys):
    import torch

    from nbzoo import device, train

    clean_env.setenv("NBZOO_PROGRESS", "lines")
    clean_env.setenv("NBZOO_PROGRESS_EVAL_DELAY", "0")
    clean_env.setenv("NBZOO_PROGRESS_EVERY", "0")
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    forward = model.forward
    model.forward = lambda x: {"logits": forward(x)}
    data = [{"x": torch.ones(3), "labels": torch.tensor(1)} for _ in range(10)]
    outputs, labels = train.predict(model, data, device.setup("cpu", "fp32", 0), batch_size=4)
    assert outputs.shape == (10, 2) and labels.tolist() == [1] * 10
    assert "predict:" in capsys.readouterr().err
