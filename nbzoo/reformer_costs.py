"""What three of Reformer's ideas save, each measured on the notebook's own model (notebook 04):

* axial position embeddings -- parameters of the position table, axial against one vector per
  position (:func:`position_parameters`, counted from the modules themselves);
* chunked feed-forward -- the most memory the feed-forward layer's tensors hold at one time, with
  the model's ``chunk_size_feed_forward`` and without chunking (:func:`feed_forward_peak`);
* reversible residual layers -- the activations autograd keeps for the backward pass against the
  number of layers, reversible against ordinary residual connections (:func:`activations_by_depth`).

The fourth idea, LSH attention, is :mod:`nbzoo.lsh`. Memory on a CPU: PyTorch keeps no allocator
statistics there, so the peak of the feed-forward is counted tensor by tensor by PyTorch's own
``MemTracker`` (``torch.distributed._tools.mem_tracker``, which follows every tensor's storage
while a block runs), and the activations kept for backward by
:func:`nbzoo.longseq.saved_activation_bytes`; both count the same bytes on every device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from nbzoo import longseq, patching

# the runtime patch that runs Reformer's layers with ordinary autograd (every layer's activations
# kept for backward), the comparison the reversible layers are measured against
ORDINARY_RESIDUAL = "reformer_plain_residual_perf"


def _config_at_length(config, seq_len: int, **changes):
    """``config``'s architecture for ``seq_len`` tokens (its own axial shape where it fits)."""
    from transformers import ReformerConfig

    values = config.to_dict()
    if math.prod(config.axial_pos_shape) != seq_len:
        values["axial_pos_shape"] = longseq.axial_factors(seq_len)
    values.update(max_position_embeddings=seq_len, **changes)
    return ReformerConfig(**values)


def position_parameters(config, seq_lengths: Sequence[int]):
    """Parameters of the position embeddings at each length: axial (two tables whose shapes
    multiply to the length, ``axial_pos_embds_dim`` wide) against one ``hidden_size`` vector per
    position. The modules are built on the meta device: counted, never allocated."""
    import pandas as pd
    from transformers.models.reformer.modeling_reformer import (
        AxialPositionEmbeddings,
        PositionEmbeddings,
    )

    rows = []
    for seq_len in seq_lengths:
        at_length = _config_at_length(config, seq_len)
        with torch.device("meta"):
            axial = AxialPositionEmbeddings(at_length)
            plain = PositionEmbeddings(at_length)
        rows.append(
            {
                "sequence length": seq_len,
                "axial shape": " × ".join(map(str, at_length.axial_pos_shape)),
                "axial": sum(p.numel() for p in axial.parameters()),
                "one vector per position": sum(p.numel() for p in plain.parameters()),
            }
        )
    table = pd.DataFrame(rows).set_index("sequence length")
    table["axial saves"] = (table["one vector per position"] / table["axial"]).map(
        lambda x: f"{x:.0f}×"
    )
    return table


def _peak_bytes(module: torch.nn.Module, inputs: torch.Tensor) -> int:
    """Most bytes held at once by the tensors ``module(inputs)`` creates (its parameters and the
    input, which exist before and after the call, not counted)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(module, inputs)
    with torch.no_grad(), tracker:
        module(inputs)
    snapshot = tracker.get_tracker_snapshot("peak")[inputs.device]
    peak = next(value for kind, value in snapshot.items() if str(kind) == "Total")
    before = sum(p.numel() * p.element_size() for p in module.parameters())
    return int(peak - before - inputs.numel() * inputs.element_size())


def feed_forward_peak(model: torch.nn.Module, seq_lengths: Sequence[int], chunk: int | None = None):
    """Peak memory of the first layer's feed-forward on one sequence of each length, without
    chunking and in chunks of ``chunk`` positions (default: the model's own
    ``chunk_size_feed_forward``). Chunking changes no number: the feed-forward treats every
    position alone; it only keeps the ``feed_forward_size``-wide intermediate of ``chunk``
    positions alive instead of the whole sequence's."""
    import pandas as pd

    feed_forward = next(
        m for m in model.modules() if type(m).__name__ == "ChunkReformerFeedForward"
    )
    chunk = chunk or model.config.chunk_size_feed_forward
    if not chunk:
        raise ValueError(
            "the model does not chunk its feed-forward (chunk_size_feed_forward = 0 in "
            "model_config): pass chunk=..."
        )
    kept = feed_forward.chunk_size_feed_forward
    device = next(model.parameters()).device
    rows = []
    try:
        for seq_len in seq_lengths:
            x = torch.randn(1, seq_len, model.config.hidden_size, device=device)
            row = {"sequence length": seq_len}
            for name, size in (("whole sequence", 0), (f"chunks of {chunk}", chunk)):
                feed_forward.chunk_size_feed_forward = size
                row[name] = _peak_bytes(feed_forward, x) / 2**20
            rows.append(row)
    finally:
        feed_forward.chunk_size_feed_forward = kept
    return pd.DataFrame(rows).set_index("sequence length")


def _model_of_depth(config, layers: int, seq_len: int):
    from transformers import ReformerForMaskedLM

    pattern = list(config.attn_layers)
    attn_layers = [pattern[i % len(pattern)] for i in range(layers)]
    return ReformerForMaskedLM(
        _config_at_length(config, seq_len, attn_layers=attn_layers, num_hidden_layers=layers)
    )


def activations_by_depth(config, depths: Sequence[int], seq_len: int, seed: int = 0):
    """Activations autograd keeps for the backward pass of one training step (batch 1,
    ``seq_len`` tokens) of this architecture at each depth (its ``attn_layers`` pattern
    repeated): reversible layers (upstream) against ordinary residual connections (the
    ``reformer_plain_residual_perf`` patch: the same arithmetic, every layer's activations
    kept)."""
    import pandas as pd

    ids = torch.randint(
        5, config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seed)
    )
    rows = []
    for layers in depths:
        torch.manual_seed(seed)
        model = _model_of_depth(config, layers, seq_len).train()
        row = {"layers": layers}
        for name, patches in (("reversible", ()), ("ordinary residual", (ORDINARY_RESIDUAL,))):
            with patching.applied(*patches):
                loss, saved = longseq.saved_activation_bytes(
                    lambda model=model: model(input_ids=ids, labels=ids).loss
                )
            loss.backward()  # frees what was kept
            row[name] = saved / 2**20
        rows.append(row)
    return pd.DataFrame(rows).set_index("layers")


def plot_memory(feed_forward, by_depth, seq_len: int):
    """Two panels: the feed-forward's peak against length (chunked or not), and the activations
    kept against depth (reversible or not)."""
    import matplotlib.pyplot as plt

    fig, (ax_f, ax_d) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    for column, marker in zip(feed_forward.columns, "os", strict=True):
        ax_f.plot(feed_forward.index, feed_forward[column], marker=marker, label=column)
    ax_f.set(
        xlabel="sequence length (tokens)",
        ylabel="peak memory (MiB)",
        title="chunked feed-forward: one layer, batch 1",
    )
    longseq.plain_log_axis(ax_f, "x", feed_forward.index)
    ax_f.legend(fontsize=8)
    for column, marker in zip(by_depth.columns, "os", strict=True):
        ax_d.plot(by_depth.index, by_depth[column], marker=marker, label=column)
    ax_d.set(
        xlabel="layers",
        ylabel="activations kept for backward (MiB)",
        title=f"reversible layers: one training step, {seq_len} tokens",
        ylim=(0, None),
    )
    ax_d.set_xticks(list(by_depth.index))
    ax_d.legend(fontsize=8)
    return fig


def summary(positions, feed_forward, by_depth, chunk: int) -> list[str]:
    """Three sentences for a notebook's summary: each idea's saving at the largest size measured.
    Bytes and parameters are counted, not timed: they are the same on every run."""
    length = positions.index.max()
    axial, plain = positions.loc[length, ["axial", "one vector per position"]]
    longest = feed_forward.index.max()
    whole, chunked = feed_forward.loc[longest, ["whole sequence", f"chunks of {chunk}"]]
    low, high = by_depth.index.min(), by_depth.index.max()
    return [
        f"Axial positions: {axial:,} position parameters instead of {plain:,} at {length} "
        f"tokens ({plain / axial:.0f}× fewer).",
        f"Chunked feed-forward: at {longest} tokens its peak memory is {chunked:.2f} MiB in "
        f"chunks of {chunk} against {whole:.2f} MiB for the whole sequence at once "
        f"({whole / chunked:.1f}× less).",
        f"Reversible layers: the activations kept for backward stay at "
        f"{by_depth.loc[high, 'reversible']:.2f} MiB from {low} to {high} layers, where "
        f"ordinary residual connections keep {by_depth.loc[low, 'ordinary residual']:.2f} to "
        f"{by_depth.loc[high, 'ordinary residual']:.2f} MiB.",
    ]
