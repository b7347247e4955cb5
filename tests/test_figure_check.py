"""The figure check that every notebook kernel of the test suite runs after each cell finds what
makes a figure unreadable, and passes a readable one."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests import figure_check  # noqa: E402


@pytest.fixture(autouse=True)
def closed_figures():
    yield
    plt.close("all")


def test_a_labelled_figure_with_a_legend_passes():
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([1, 2, 3], label="THOR")
    ax.plot([3, 2, 1], label="SGD")
    ax.set(xlabel="optimizer step", ylabel="loss")
    ax.legend()
    assert figure_check.problems(fig) == []


def test_an_unlabelled_axis_is_named():
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    ax.set_xlabel("step")
    assert figure_check.problems(fig) == ["axes 0: the y axis has tick labels but no label"]


def test_overprinted_log_scale_tick_labels_are_found():
    fig, ax = plt.subplots(figsize=(2.0, 1.5))
    ax.loglog([128, 256, 512, 1024, 2048, 4096], [1, 2, 4, 8, 16, 32])
    ax.set_xticks([128, 256, 512, 1024, 2048, 4096], ["128", "256", "512", "1024", "2048", "4096"])
    ax.set(xlabel="sequence length", ylabel="seconds")
    assert any("x tick labels" in p and "overlap" in p for p in figure_check.problems(fig))


def test_several_labelled_lines_need_a_legend():
    fig, ax = plt.subplots()
    ax.plot([1, 2], label="a")
    ax.plot([2, 1], label="b")
    ax.set(xlabel="x", ylabel="y")
    assert figure_check.problems(fig) == ["axes 0: 2 labelled series and no legend"]


def test_a_heatmap_needs_a_labelled_colour_bar():
    fig, ax = plt.subplots()
    image = ax.imshow(np.random.default_rng(0).random((8, 8)))
    ax.set(xlabel="key position", ylabel="query position")
    assert any("no colour bar" in p for p in figure_check.problems(fig))
    bar = fig.colorbar(image, ax=ax)
    assert figure_check.problems(fig) == ["axes 1: a colour bar without a label"]
    bar.set_label("attention weight")
    assert figure_check.problems(fig) == []


def test_a_kernel_cell_that_draws_an_unreadable_figure_fails_with_the_reason():
    """What the notebooks' nbval runs rely on: in a kernel of this test run (the IPython profile
    that conftest.py sets up), a cell that leaves an unlabelled figure open ends in an error
    output naming the problem, and a readable figure passes."""
    from jupyter_client.manager import start_new_kernel

    assert os.environ.get("IPYTHONDIR"), "conftest.py sets the test run's IPython profile"
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        errors = []

        def collect(msg):
            if msg["msg_type"] == "error":
                errors.append(f"{msg['content']['ename']}: {msg['content']['evalue']}")

        kc.execute_interactive("import matplotlib.pyplot as plt", output_hook=collect, timeout=60)
        cell = "fig, ax = plt.subplots(); ax.plot([1, 2]); ax.set_xlabel('step')"
        kc.execute_interactive(cell, output_hook=collect, timeout=60)
        assert errors == ["FigureProblem: unreadable figure:\nfigure 1: axes 0: the y axis has "
                          "tick labels but no label"], errors  # fmt: skip
        errors.clear()
        cell = "fig, ax = plt.subplots(); ax.plot([1, 2]); ax.set(xlabel='step', ylabel='loss')"
        kc.execute_interactive(cell, output_hook=collect, timeout=60)
        assert errors == []
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
