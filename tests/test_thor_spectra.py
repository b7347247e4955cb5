"""THOR's preconditioner as numbers (nbzoo.optim.thor_spectra) and as a view with a dropdown of layers
(nbzoo.preconditioner_view): the eigenvalues are those of the factors THOR inverts, padding left out;
the explorer has a static twin and redraws for another layer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nbzoo import preconditioner_view
from nbzoo.optim import thor_spectra
from nbzoo.optim.thor import THOR
from tests import figure_check
from tests.test_thor import (
    DAMPING,
    B,
    H,
    TinyLM,
    _batch,
    _blockdiag_mask,
    _one_step,
    _second_moment,
    _with_ones,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _descending_eigenvalues(matrix: torch.Tensor) -> list[float]:
    return sorted(torch.linalg.eigvalsh(matrix).clamp(min=0).tolist(), reverse=True)


def test_a_linear_layers_spectra_are_the_eigenvalues_of_its_blocked_factors_without_padding():
    torch.manual_seed(3)
    model = TinyLM(tied=False, hidden=7).double()  # proj: 5 × (7+1), blocks of 4: 5 → 4+1 padded
    _, _, opt = _one_step(model, block_size=4)
    spectra = {s["layer"]: s for s in thor_spectra.layer_spectra(opt)}
    proj = spectra["proj"]
    a = _second_moment(_with_ones(torch.tanh(model.saved["y"]).detach()), 1.0)
    g = _second_moment(model.saved["z"].grad, B**2)  # B² / N, as THOR scales G
    assert (proj["kind"], proj["a_dim"], proj["g_dim"]) == ("linear", 8, H)
    np.testing.assert_allclose(
        proj["a_eigenvalues"], _descending_eigenvalues(a * _blockdiag_mask(8, 4)), atol=1e-10
    )
    np.testing.assert_allclose(
        proj["g_eigenvalues"], _descending_eigenvalues(g * _blockdiag_mask(H, 4)), atol=1e-12
    )
    assert len(proj["g_eigenvalues"]) == H  # the padded coordinates of the last block left out
    assert proj["root_damping"] == pytest.approx(math.sqrt(DAMPING)) and proj["step"] == 1


def test_an_embeddings_a_is_its_token_counts_per_sequence_and_a_shared_weight_names_its_partner():
    torch.manual_seed(0)
    model = TinyLM(tied=True).double()
    _, _, opt = _one_step(model)
    spectra = {s["layer"]: s for s in thor_spectra.layer_spectra(opt)}
    ids, _ = _batch()
    counts = torch.bincount(ids.reshape(-1), minlength=model.emb.num_embeddings) / ids.shape[0]
    np.testing.assert_allclose(
        spectra["emb"]["a_eigenvalues"], sorted(counts.tolist(), reverse=True)
    )
    assert spectra["emb"]["shared_with"] == ["dec"] and spectra["dec"]["shared_with"] == ["emb"]


def test_the_sgd_counterpart_and_a_layer_without_statistics_have_no_spectra():
    model = TinyLM()
    assert thor_spectra.layer_spectra(THOR(model, precondition=False)) == []
    fresh = THOR(TinyLM())
    assert thor_spectra.layer_spectra(fresh) == []  # no statistics gathered yet
    fresh.remove_hooks()


def test_a_large_factor_keeps_evenly_spaced_ranks_from_the_largest_to_the_smallest(monkeypatch):
    torch.manual_seed(3)
    model = TinyLM(tied=False, hidden=7).double()
    _, _, opt = _one_step(model)
    whole = {s["layer"]: s for s in thor_spectra.layer_spectra(opt)}["lin"]["g_eigenvalues"]
    monkeypatch.setattr(thor_spectra, "MAX_EIGENVALUES", 3)
    kept = {s["layer"]: s for s in thor_spectra.layer_spectra(opt)}["lin"]["g_eigenvalues"]
    assert len(whole) == 7 and kept == [whole[0], whole[3], whole[6]]


def _layer(name, a, g, root=0.1, kind="linear"):
    return {
        "layer": name,
        "kind": kind,
        "shared_with": [],
        "a_dim": len(a),
        "g_dim": len(g),
        "a_eigenvalues": a,
        "g_eigenvalues": g,
        "root_damping": root,
        "step": 300,
    }


SPECTRA = [
    _layer("bert_pretraining.bert.embeddings.word_embeddings", [2.0, 0.5, 0.0], [1e-4, 0.0], kind="embedding"),
    _layer("bert_pretraining.bert.encoder.layer.0.intermediate.dense", [4.0, 0.3, 0.05, 0.01], [1e-3, 1e-5]),
    _layer("bert_pretraining.cls.seq_relationship", [0.2, 0.0], [0.5, 0.0]),
]  # fmt: skip


def test_shares_above_the_damping_and_the_spread_of_step_scales():
    assert thor_spectra.share_above_damping([4.0, 0.3, 0.05, 0.01], 0.1) == 0.5
    intermediate = SPECTRA[1]
    assert thor_spectra.step_scale_range(intermediate) == pytest.approx(
        (4.1 * 0.101) / (0.11 * 0.10001)
    )
    table = preconditioner_view.table(SPECTRA)
    assert list(table.index) == [
        "embeddings.word_embeddings",
        "0.intermediate.dense",
        "cls.seq_relationship",
    ]
    assert table["G: share above √λ"].tolist() == [0.0, 0.0, 0.5]
    assert preconditioner_view.table([]).empty
    said = preconditioner_view.describe(SPECTRA)
    assert "in 2 of 3 layers not one eigenvalue of G (output gradients) stands above √λ" in said
    assert "in 0 of 3 not one of A (inputs)" in said
    assert preconditioner_view.describe([]) == ""


def test_the_explorer_shows_a_static_figure_and_redraws_for_the_layer_picked():
    explorer = preconditioner_view.explorer(SPECTRA)
    assert explorer.layer.value == 1  # the first feed-forward input by default
    assert explorer.static.startswith(b"\x89PNG") and explorer.image.value == explorer.static
    assert "0.intermediate.dense" in explorer.status.value
    explorer.layer.value = 2
    assert explorer.image.value != explorer.static
    assert (
        "cls.seq_relationship" in explorer.status.value
        and "nbzoo-error" not in explorer.status.value
    )
    assert "nbzoo-preconditioner" in explorer.widget._dom_classes
    assert preconditioner_view.explorer(SPECTRA, layer="cls.seq_relationship").layer.value == 2
    with pytest.raises(KeyError, match="no THOR layer 'pooler'"):
        preconditioner_view.explorer(SPECTRA, layer="pooler")
    with pytest.raises(ValueError, match="no THOR layers to show"):
        preconditioner_view.explorer([])


def test_the_layer_figure_is_readable():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for i in range(len(SPECTRA)):
        fig = preconditioner_view.plot_layer(SPECTRA, i)
        FigureCanvasAgg(fig)
        assert figure_check.problems(fig) == []
