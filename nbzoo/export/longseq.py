"""ONNX export of the long-sequence masked LMs (Reformer, Longformer), on top of
:mod:`nbzoo.export.onnx`.

Neither model exports as upstream writes it: Longformer's sliding-window attention uses
``as_strided`` and sizes its global-attention tensors from the data, Reformer runs its layers
through a custom autograd Function and draws fresh random LSH rotations inside the graph.
The runtime patches in ``patches/`` remove those blockers; the functions here turn them on for
the export (and leave alone whatever the caller had turned on already).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from nbzoo import patching
from nbzoo.export import onnx as nbonnx

LONGFORMER_PATCHES = ("longformer_sliding_window", "longformer_static_global")
REFORMER_PATCHES = ("reformer_lsh_seeded", "reformer_inference_path")
LONGFORMER_INPUTS = ("input_ids", "attention_mask", "global_attention_mask")


@contextlib.contextmanager
def patches_on(names: Sequence[str]) -> Iterator[None]:
    """Apply the patches not yet active; on exit undo only those (the caller's stay on)."""
    added = [n for n in names if n not in patching.active() and patching.apply(n)]
    try:
        yield
    finally:
        for name in reversed(added):
            patching.undo(name)


def longformer_inputs(
    seq_len: int, batch_size: int = 1, vocab_size: int = 100, global_tokens: int = 1, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random token ids with full attention and the first ``global_tokens`` positions global."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=g)
    global_mask = torch.zeros_like(ids)
    global_mask[:, :global_tokens] = 1
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "global_attention_mask": global_mask,
    }


def export_longformer_mlm(
    model: torch.nn.Module,
    path: str | os.PathLike,
    seq_len: int,
    batch_size: int = 1,
    opset: int = nbonnx.DEFAULT_OPSET,
) -> Path:
    """Export a ``LongformerForMaskedLM`` to ``logits`` with dynamic batch and sequence axes: one
    file serves every sequence length that is a multiple of the attention window."""
    window = max(model.config.attention_window)
    if seq_len % window:
        raise ValueError(f"seq_len {seq_len} must be a multiple of the attention window {window}")
    dummy = longformer_inputs(seq_len, batch_size, model.config.vocab_size)
    axes = {name: {0: "batch", 1: "sequence"} for name in LONGFORMER_INPUTS}
    axes["logits"] = {0: "batch", 1: "sequence"}
    with patches_on(LONGFORMER_PATCHES):
        return nbonnx.export_onnx(
            model.eval(), dummy, path, LONGFORMER_INPUTS, ["logits"], dynamic_axes=axes, opset=opset
        )


def longformer_parity(
    model: torch.nn.Module,
    path: str | os.PathLike,
    seq_lens: Sequence[int],
    batch_size: int = 2,
    seed: int = 1,
) -> dict[int, float]:
    """Largest |PyTorch - ONNX Runtime| of the logits at each sequence length (fresh inputs)."""
    out = {}
    for i, seq_len in enumerate(seq_lens):
        inputs = longformer_inputs(seq_len, batch_size, model.config.vocab_size, seed=seed + i)
        out[int(seq_len)] = nbonnx.parity_check(model, path, inputs, ["logits"])
    return out


def export_reformer_mlm(
    model: torch.nn.Module,
    path: str | os.PathLike,
    seq_len: int,
    batch_size: int = 1,
    opset: int = nbonnx.DEFAULT_OPSET,
) -> Path:
    """Export a ``ReformerForMaskedLM`` to ``logits`` at a fixed (batch, sequence) shape.

    Every LSH layer must have a ``hash_seed`` (``nbzoo.longseq.set_hash_seed``): an exported
    model can only hash the way PyTorch does with fixed rotations. The shape is fixed because
    upstream's axial position embeddings pick their columns in Python from the largest
    position id and loop over the batch."""
    unseeded = [
        name
        for name, m in model.named_modules()
        if type(m).__name__ == "LSHSelfAttention" and m.hash_seed is None
    ]
    if unseeded:
        raise ValueError(
            f"LSH layers {', '.join(unseeded)} have no hash_seed; set one "
            "(nbzoo.longseq.set_hash_seed(model, seed)) so that the rotations are fixed"
        )
    g = torch.Generator().manual_seed(0)
    dummy = {
        "input_ids": torch.randint(5, model.config.vocab_size, (batch_size, seq_len), generator=g)
    }
    with patches_on(REFORMER_PATCHES):
        return nbonnx.export_onnx(model.eval(), dummy, path, ["input_ids"], ["logits"], opset=opset)
