"""THOR's preconditioner, layer by layer, to look at and to play with (notebook 06).

``spectra`` is what :func:`nbzoo.optim.thor_spectra.layer_spectra` read from a THOR optimizer
(a training run keeps it as ``Run.preconditioner``)::

    from nbzoo import preconditioner_view
    preconditioner_view.table(spectra)                 # every layer: how much is curvature, how much damping
    preconditioner_view.explorer(spectra, layer="0.intermediate.dense")   # a dropdown of layers
    preconditioner_view.plot_layer(spectra, 3)         # the static figure alone

The explorer shows, as :mod:`nbzoo.widgets`' views do, a static PNG of its first layer (what a
reader without a kernel sees) and below it the live widget: a dropdown of the layers and, for the
chosen one, the damped eigenvalues of its two factors next to the damping, and where the layer
stands among all layers.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np

from nbzoo.optim.thor_spectra import share_above_damping, step_scale_range


def short_name(layer: str) -> str:
    """A layer's module name without the wrappers' prefixes, the encoder layer as its number:
    ``bert_pretraining.bert.encoder.layer.0.intermediate.dense`` -> ``0.intermediate.dense``."""
    name = layer.removeprefix("bert_pretraining.").removeprefix("bert.")
    return name.replace("encoder.layer.", "", 1) if name.startswith("encoder.layer.") else name


def _index(spectra: Sequence[dict[str, Any]], layer: int | str) -> int:
    if isinstance(layer, int):
        if not 0 <= layer < len(spectra):
            raise IndexError(f"layer {layer}: THOR preconditions layers 0..{len(spectra) - 1}")
        return layer
    names = [short_name(s["layer"]) for s in spectra]
    for i, s in enumerate(spectra):
        if layer in (s["layer"], names[i]):
            return i
    raise KeyError(f"no THOR layer {layer!r}; the layers are {', '.join(names)}")


def default_layer(spectra: Sequence[dict[str, Any]]) -> int:
    """The first encoder layer's feed-forward input (``intermediate``), the first layer where the
    model has none."""
    names = [s["layer"] for s in spectra]
    return next((i for i, n in enumerate(names) if "intermediate" in n), 0)


def table(spectra: Sequence[dict[str, Any]]):
    """Per layer: kind, the factors' sizes, the share of each factor's eigen-directions above the
    damping √λ (where the curvature, not the damping, sets the step), and how unevenly the
    preconditioner scales the gradient's directions (1 for plain SGD)."""
    import pandas as pd

    if not spectra:
        return pd.DataFrame(columns=["layer", "kind"]).set_index("layer")
    rows = []
    for s in spectra:
        root = s["root_damping"]
        rows.append(
            {
                "layer": short_name(s["layer"]),
                "kind": s["kind"] + (" (shared weight)" if s["shared_with"] else ""),
                "A size": s["a_dim"],
                "G size": s["g_dim"],
                "A: share above √λ": share_above_damping(s["a_eigenvalues"], root),
                "G: share above √λ": share_above_damping(s["g_eigenvalues"], root),
                "largest / smallest step scale": step_scale_range(s),
            }
        )
    return pd.DataFrame(rows).set_index("layer")


def describe(spectra: Sequence[dict[str, Any]]) -> str:
    """All layers in a sentence: on which side of the layers the damping rather than the curvature
    sets THOR's step ("" without layers)."""
    if not spectra:
        return ""
    root = spectra[0]["root_damping"]
    shares = {
        side: [share_above_damping(s[f"{side}_eigenvalues"], s["root_damping"]) for s in spectra]
        for side in ("a", "g")
    }
    flat = {side: sum(x == 0 for x in v) for side, v in shares.items()}
    n = len(spectra)
    return (
        f"THOR's preconditioner after step {spectra[0]['step']} (√λ = {root:.3g}): in {flat['g']} "
        f"of {n} layers not one eigenvalue of G (output gradients) stands above √λ, in "
        f"{flat['a']} of {n} not one of A (inputs); on average {np.mean(shares['g']):.0%} of G's "
        f"eigenvalues and {np.mean(shares['a']):.0%} of A's stand above it. Where none does, the "
        "damping, not the curvature, sets the step along that side."
    )


def summary(s: dict[str, Any]) -> str:
    """One layer in a sentence."""
    root = s["root_damping"]
    a, g = np.asarray(s["a_eigenvalues"]), np.asarray(s["g_eigenvalues"])
    shared = (
        f", its weight shared with {short_name(s['shared_with'][0])}" if s["shared_with"] else ""
    )
    return (
        f"{short_name(s['layer'])} ({s['kind']}{shared}), after step {s['step']}: √λ = {root:.3g}; "
        f"A (inputs, {s['a_dim']}): {int((a > root).sum())} of {len(a)} eigenvalues above √λ "
        f"(largest {a.max():.3g}), G (output gradients, {s['g_dim']}): {int((g > root).sum())} of "
        f"{len(g)} (largest {g.max():.3g}); THOR scales the gradient's directions by factors up to "
        f"{step_scale_range(s):.3g}× apart."
    )


def plot_layer(spectra: Sequence[dict[str, Any]], layer: int | str = 0):
    """Left: the chosen layer's damped eigenvalues (eigenvalue + √λ, largest first) of ``A`` and
    ``G`` on a log scale, with √λ, the floor the damping sets: THOR divides the gradient along each
    pair of directions by the product of one A and one G value. Right: every layer's share of
    eigenvalues above √λ, the chosen one marked. A matplotlib ``Figure`` not registered with
    pyplot (shown only where displayed)."""
    from matplotlib.figure import Figure

    i = _index(spectra, layer)
    s = spectra[i]
    root = s["root_damping"]
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
    for key, label, color in (("a", "A: layer inputs", "C1"), ("g", "G: output gradients", "C4")):
        values = np.asarray(s[f"{key}_eigenvalues"]) + root
        left.plot(np.arange(1, len(values) + 1), values, marker=".", color=color, label=label)
    left.axhline(root, color="gray", ls="--", lw=1, label=f"damping √λ = {root:.3g}")
    left.set_yscale("log")
    left.set(xlabel="eigen-direction (largest eigenvalue first)", ylabel="eigenvalue + √λ")
    left.set_title(short_name(s["layer"]), fontsize=10)
    left.legend(fontsize=8)
    x = np.arange(len(spectra))
    for key, label, color, marker in (("a", "A", "C1", "o"), ("g", "G", "C4", "s")):
        shares = [share_above_damping(t[f"{key}_eigenvalues"], t["root_damping"]) for t in spectra]
        right.plot(x, shares, ls="none", marker=marker, color=color, label=label, ms=5)
    right.axvspan(i - 0.5, i + 0.5, color="gray", alpha=0.25, label="this layer")
    right.set(xlabel="layer (model order, as in the dropdown)", ylabel="share of eigenvalues > √λ")
    right.set(ylim=(-0.05, 1.05), title="every layer: curvature (1) or damping (0)")
    right.legend(fontsize=8)
    return fig


class PreconditionerExplorer:
    """A dropdown of THOR's layers over :func:`plot_layer`; ``.static`` is the PNG of the first
    view, ``.widget`` the live one."""

    def __init__(self, spectra: Sequence[dict[str, Any]], layer: int | str | None = None) -> None:
        import ipywidgets as w

        from nbzoo.widgets import figure_png

        if not spectra:
            raise ValueError(
                "no THOR layers to show: the run had no THOR optimizer, or THOR had not gathered "
                "its statistics yet"
            )
        self.spectra, self._png = list(spectra), figure_png
        first = default_layer(self.spectra) if layer is None else _index(self.spectra, layer)
        self.static = figure_png(plot_layer(self.spectra, first))
        options = [(f"{i}: {short_name(s['layer'])}", i) for i, s in enumerate(self.spectra)]
        self.layer = w.Dropdown(options=options, value=first, description="layer")
        self.image = w.Image(value=self.static, format="png")
        self.status = w.HTML(html.escape(summary(self.spectra[first])))
        self.widget = w.VBox([self.layer, self.status, self.image])
        self.widget.add_class("nbzoo-preconditioner")
        self.layer.observe(lambda change: self.update(change["new"]), names="value")

    def update(self, i: int) -> None:
        try:
            self.image.value = self._png(plot_layer(self.spectra, i))
            self.status.value = html.escape(summary(self.spectra[i]))
        except Exception as exc:  # shown to the reader, not swallowed
            self.status.value = (
                f'<pre class="nbzoo-error" style="color:#b00">{html.escape(type(exc).__name__)}: '
                f"{html.escape(str(exc))}</pre>"
            )

    def _ipython_display_(self) -> None:
        from IPython.display import Image, display

        first = self.spectra[self.layer.value]
        caption = f"Static view (the live explorer follows): {summary(first)}"
        display(
            {"text/plain": caption, "text/html": f"<p><i>{html.escape(caption)}</i></p>"}, raw=True
        )
        display(Image(data=self.static, format="png"))
        display(self.widget)


def explorer(
    spectra: Sequence[dict[str, Any]], layer: int | str | None = None
) -> PreconditionerExplorer:
    """See :class:`PreconditionerExplorer`. Make it the last expression of a cell to show it."""
    return PreconditionerExplorer(spectra, layer)
