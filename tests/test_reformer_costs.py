"""What Reformer's memory ideas save, measured (nbzoo.reformer_costs, notebook 04): axial position
parameters counted from the modules, the chunked feed-forward's peak memory, and the activations
reversible layers keep against depth."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
import torch

from nbzoo import reformer_costs
from tests import figure_check
from tests.test_patches_longseq import reformer


def test_axial_positions_are_counted_from_the_modules():
    config = reformer().config  # axial shape 8 x 8, dims 16 + 16, hidden 32
    table = reformer_costs.position_parameters(config, [64, 2048])
    assert table.loc[64, "axial shape"] == "8 × 8"  # the config's own shape where it fits
    assert table.loc[64, "axial"] == 8 * 16 + 8 * 16
    assert table.loc[64, "one vector per position"] == 64 * 32
    assert table.loc[2048, "axial shape"] == "32 × 64"
    assert table.loc[2048, "axial"] == 32 * 16 + 64 * 16
    assert table.loc[2048, "one vector per position"] == 2048 * 32  # never allocated: meta


def test_chunking_the_feed_forward_lowers_its_peak_and_changes_no_number():
    model = reformer().eval()
    feed_forward = model.reformer.encoder.layers[0].feed_forward
    x = torch.randn(1, 512, 32)
    with torch.no_grad():
        whole = feed_forward(x)
        feed_forward.chunk_size_feed_forward = 16
        chunked = feed_forward(x)
        feed_forward.chunk_size_feed_forward = 0
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    table = reformer_costs.feed_forward_peak(model, [128, 512], chunk=16)
    assert list(table.columns) == ["whole sequence", "chunks of 16"]
    assert (table["chunks of 16"] < table["whole sequence"]).all()
    # without chunking, the 64-wide intermediate of every position exists at once
    assert table.loc[512, "whole sequence"] >= 512 * 64 * 4 / 2**20
    assert feed_forward.chunk_size_feed_forward == 0  # the model is left as it was


def test_a_model_that_does_not_chunk_is_measured_at_a_given_chunk_only():
    with pytest.raises(ValueError, match="chunk_size_feed_forward = 0.*chunk=..."):
        reformer_costs.feed_forward_peak(reformer(), [128])


def test_reversible_layers_keep_the_same_activations_at_any_depth():
    table = reformer_costs.activations_by_depth(reformer().config, [2, 4, 8], 64)
    reversible, ordinary = table["reversible"], table["ordinary residual"]
    assert reversible.nunique() == 1  # what the reversible function keeps: its outputs only
    assert ordinary.is_monotonic_increasing and ordinary.iloc[-1] > 2 * ordinary.iloc[0]
    assert (ordinary > reversible).all()
    fig = reformer_costs.plot_memory(
        reformer_costs.feed_forward_peak(reformer(), [128, 256, 512, 1024], chunk=16), table, 64
    )
    assert figure_check.problems(fig) == []
    lines = reformer_costs.summary(
        reformer_costs.position_parameters(reformer().config, [64]),
        reformer_costs.feed_forward_peak(reformer(), [128], chunk=16),
        table,
        16,
    )
    assert len(lines) == 3 and "from 2 to 8 layers" in lines[2]
    plt.close("all")
