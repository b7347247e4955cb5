"""Readable figures: every axis labelled, no tick labels printed over each other, a legend where
several labelled lines share an axes, a colour bar where colour carries a value.

:func:`problems` checks one matplotlib figure. :func:`install` registers it in an IPython kernel:
after every cell, each figure still open (what the cell is about to show) is checked, and a
figure with problems raises in the cell's output -- which fails the cell under nbval, and shows
as an error output in JupyterLab. ``tests/conftest.py`` installs it in every kernel the test
suite starts (an IPython startup file), so the notebooks' nbval runs check every figure they draw.
"""

from __future__ import annotations

from itertools import combinations


def _visible_tick_labels(axis):
    labels = [*axis.get_ticklabels(minor=False), *axis.get_ticklabels(minor=True)]
    return [t for t in labels if t.get_visible() and t.get_text().strip()]


def _overlapping(labels, renderer) -> list[tuple[str, str]]:
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels]
    return [
        (a, b)
        for (a, box_a), (b, box_b) in combinations(boxes, 2)
        if box_a.width and box_b.width and box_a.overlaps(box_b)
    ]


def _is_colorbar(ax) -> bool:
    return getattr(ax, "_colorbar", None) is not None


def _mappables_with_colour_meaning(ax):
    """Images and collections whose colour encodes a value through a colormap."""
    from matplotlib.cm import ScalarMappable

    found = [im for im in ax.images if im.get_array() is not None and im.get_array().ndim == 2]
    found += [
        c for c in ax.collections if isinstance(c, ScalarMappable) and c.get_array() is not None
    ]
    return found


def problems(fig) -> list[str]:
    """What makes ``fig`` hard to read, one line each (empty: none found)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    colorbar_mappables = {
        id(ax._colorbar.mappable) for ax in fig.axes if _is_colorbar(ax) and ax.get_visible()
    }
    found = []
    for n, ax in enumerate(fig.axes):
        if not ax.get_visible() or not ax.axison:
            continue
        name = f"axes {n}" + (f" ({ax.get_title()!r})" if ax.get_title() else "")
        for axis, letter in ((ax.xaxis, "x"), (ax.yaxis, "y")):
            labels = _visible_tick_labels(axis)
            if labels and not axis.get_label_text().strip() and not _is_colorbar(ax):
                found.append(f"{name}: the {letter} axis has tick labels but no label")
            for a, b in _overlapping(labels, renderer):
                found.append(f"{name}: {letter} tick labels {a!r} and {b!r} overlap")
        if _is_colorbar(ax):
            if not (ax.get_ylabel().strip() or ax.get_xlabel().strip()):
                found.append(f"{name}: a colour bar without a label")
            continue
        labelled = [
            h
            for h in [*ax.lines, *ax.collections, *ax.patches, *ax.containers]
            if not str(h.get_label()).startswith("_") and str(h.get_label()).strip()
        ]
        if len(labelled) >= 2 and ax.get_legend() is None and not fig.legends:
            found.append(f"{name}: {len(labelled)} labelled series and no legend")
        for mappable in _mappables_with_colour_meaning(ax):
            if id(mappable) not in colorbar_mappables:
                found.append(f"{name}: colour encodes a value ({type(mappable).__name__}) "
                             "but there is no colour bar")  # fmt: skip
    return found


class FigureProblem(AssertionError):
    pass


def check_open_figures() -> None:
    """Check every open pyplot figure; raise :class:`FigureProblem` listing what was found."""
    import sys

    if "matplotlib.pyplot" not in sys.modules:
        return
    import matplotlib.pyplot as plt

    found = [
        f"figure {num}: {line}" for num in plt.get_fignums() for line in problems(plt.figure(num))
    ]
    if found:
        raise FigureProblem("unreadable figure:\n" + "\n".join(found))


def install(shell=None) -> None:
    """Check the open figures after every cell of this IPython shell (before the inline backend
    shows and closes them: the startup file registers this first)."""
    if shell is None:
        from IPython import get_ipython

        shell = get_ipython()
    if shell is not None:
        shell.events.register("post_execute", check_open_figures)
