"""What THOR's preconditioner does to each layer, as numbers a reader can plot: the eigenvalues of
every layer's two Kronecker factors, ``A`` (the layer's inputs) and ``G`` (the gradients of its
outputs), and the damping ``√λ`` added to each.

THOR's step for a layer is ``(G + √λ I)⁻¹ ∇W (A + √λ I)⁻¹``. In the eigenbasis of the factors that
divides the gradient's component along the directions (i, j) by ``(gᵢ + √λ)(aⱼ + √λ)``: where an
eigenvalue stands well above ``√λ`` the step shrinks in proportion to the curvature, and where it
sits below, the damping takes over and the step is plain gradient descent scaled by ``1 / √λ``.
:func:`layer_spectra` reads this from a :class:`~nbzoo.optim.thor.THOR` optimizer as it stands
(the running averages of the factors, the damping of its current step).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from nbzoo.optim.thor import THOR

# eigenvalues kept per factor (evenly spaced ranks of the sorted spectrum, both ends included):
# BERT-Large's decoder G alone has 30522
MAX_EIGENVALUES = 256


def factor_eigenvalues(factor) -> np.ndarray:
    """The eigenvalues of a factor (a ``_Factor`` of THOR: diagonal, or diagonal blocks whose
    zero padding is left out), sorted from the largest down."""
    value = factor.value.detach().to("cpu", torch.float64)
    if factor.diagonal:
        found = value.numpy()
    else:
        blocks = list(value.unbind(0))
        pad = factor.nb * factor.b - factor.dim
        if pad:
            blocks[-1] = blocks[-1][: factor.b - pad, : factor.b - pad]
        found = np.concatenate([torch.linalg.eigvalsh(b).numpy() for b in blocks])
    found = np.sort(np.clip(found, 0.0, None))[::-1]  # PSD: rounding below zero is zero
    if len(found) > MAX_EIGENVALUES:
        found = found[np.linspace(0, len(found) - 1, MAX_EIGENVALUES).round().astype(int)]
    return found


def layer_spectra(opt: THOR) -> list[dict[str, Any]]:
    """Per layer THOR preconditions (each use of a shared weight on its own): its name and kind,
    the eigenvalues of ``A`` (inputs; an embedding's is diagonal: token counts per sequence) and
    ``G`` (output gradients), their dimensions, and ``root_damping`` = √λ at the optimizer's
    current step. Layers whose factors have not been gathered yet are left out. Plain lists and
    numbers (they travel from worker processes and torchrun ranks)."""
    if not opt.precondition:
        return []
    root = math.sqrt(opt.damping_schedule(opt.steps))
    found = []
    for group in opt.groups:
        for use in group.uses:
            if not (use.row.initialized and use.col.initialized):
                continue
            a, g = (use.col, use.row) if use.kind == "linear" else (use.row, use.col)
            found.append(
                {
                    "layer": use.name,
                    "kind": use.kind,
                    "shared_with": [u.name for u in group.uses if u is not use],
                    "a_dim": a.dim,
                    "g_dim": g.dim,
                    "a_eigenvalues": factor_eigenvalues(a).tolist(),
                    "g_eigenvalues": factor_eigenvalues(g).tolist(),
                    "root_damping": root,
                    "step": opt.steps,
                }
            )
    return found


def step_scale_range(layer: dict[str, Any]) -> float:
    """How unevenly THOR scales the directions of a layer's gradient: the largest over the smallest
    of ``1 / ((gᵢ + √λ)(aⱼ + √λ))``. Plain SGD scales every direction alike: 1."""
    root = layer["root_damping"]
    a, g = np.asarray(layer["a_eigenvalues"]), np.asarray(layer["g_eigenvalues"])
    return float((a.max() + root) * (g.max() + root) / ((a.min() + root) * (g.min() + root)))


def share_above_damping(eigenvalues, root_damping: float) -> float:
    """The share of a factor's eigen-directions whose eigenvalue exceeds the damping √λ: where THOR
    uses curvature rather than the damping."""
    values = np.asarray(eigenvalues)
    return float((values > root_damping).mean()) if len(values) else math.nan
