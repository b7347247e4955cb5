"""Longformer's sliding-window self-attention without ``as_strided`` and without data-dependent
shapes.

Why: upstream builds the overlapping windows with ``Tensor.as_strided`` (no ONNX operator, and a
copy-heavy op on Ascend NPUs, which is why the seed replaced ``modeling_longformer.py``), and
sizes the global-attention tensors from the data (``nonzero``, ``max()``), which ONNX export
and ``torch.compile(fullgraph=True)`` cannot follow.

How: the sequence is cut into blocks of ``w`` (the one-sided window); every block of queries
meets the keys of its own and its two neighbouring blocks (``cat`` of shifted block views, one
batched matmul), and the diagonal band ``i - w .. i + w`` is cut out of each ``w x 3w`` score
block by the pad-and-reshape ("skew") trick; the weighted sum of the values is the same trick
backwards. Global attention gathers the global positions with ``topk`` into slots (in sequence
order, unused slots masked). The arithmetic is upstream's: same scaling, the same mask values
(-inf off the sequence, ``finfo.min`` for masked and global keys), fp32 softmax, the same dropout.

Outputs are upstream's in eager mode: as many global slots as the largest number of global tokens
in the batch (so any number of global tokens; question answering makes every question token
global), the global columns of ``attentions`` per example in sequence order, and no global
attention probabilities (``global_attentions`` None) when no token is global.

The one difference, needed for export only: while tracing (ONNX export, ``torch.jit.trace``,
``torch.compile``) no shape may depend on the data, so the slots number
``config.max_global_tokens`` (default 16) whatever the batch; a sequence with more global tokens
than that loses the extra ones in an exported or compiled graph (size the slots for the data).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nbzoo.patching import Patch

DEFAULT_MAX_GLOBAL_TOKENS = 16


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _neighbour_blocks(x: torch.Tensor, w: int) -> torch.Tensor:
    """(N, L, D) -> (N, L/w, 3w, D): each block of w rows next to its left and right block
    (zeros beyond the ends)."""
    n, length, d = x.shape
    blocks = nn.functional.pad(x.reshape(n, length // w, w, d), (0, 0, 0, 0, 1, 1))
    return torch.cat([blocks[:, :-2], blocks[:, 1:-1], blocks[:, 2:]], dim=2)


def band_scores(query: torch.Tensor, key: torch.Tensor, w: int) -> torch.Tensor:
    """(N, L, D) x (N, L, D) -> (N, L, 2w+1) with ``out[:, i, j] = q_i . k_(i - w + j)``
    (entries beyond the sequence are 0; the caller masks them)."""
    n, length, d = query.shape
    nb = length // w
    scores = torch.matmul(
        query.reshape(n, nb, w, d), _neighbour_blocks(key, w).transpose(-1, -2)
    )  # (N, nb, w, 3w): row r of a block against keys (block - 1) * w + t
    # row r needs columns r .. r + 2w: shift row r left by r (pad one column per row, reshape)
    skewed = nn.functional.pad(scores.flatten(-2), (0, w)).view(n, nb, w, 3 * w + 1)
    return skewed[..., : 2 * w + 1].reshape(n, length, 2 * w + 1)


def band_context(probs: torch.Tensor, value: torch.Tensor, w: int) -> torch.Tensor:
    """(N, L, 2w+1) x (N, L, D) -> (N, L, D): ``out_i = sum_j probs[i, j] v_(i - w + j)``."""
    n, length, d = value.shape
    nb = length // w
    blocks = nn.functional.pad(probs.reshape(n, nb, w, 2 * w + 1), (0, w))  # (.., w, 3w+1)
    skewed = blocks.flatten(-2)[..., : w * 3 * w].view(n, nb, w, 3 * w)  # row r shifted by r
    return torch.matmul(skewed, _neighbour_blocks(value, w)).reshape(n, length, d)


def band_key_bias(attention_mask: torch.Tensor, w: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) Longformer mask (0 local, <0 masked, >0 global) -> (B, L, 2w+1) additive bias of
    the window: 0, ``finfo.min`` for keys that are masked or global, -inf beyond the ends."""
    length = attention_mask.shape[1]
    offsets = torch.arange(2 * w + 1, device=attention_mask.device) - w
    pos = torch.arange(length, device=attention_mask.device)[:, None] + offsets[None, :]
    inside = (pos >= 0) & (pos < length)
    removed = (attention_mask != 0)[:, pos.clamp(0, length - 1)]  # (B, L, 2w+1)
    bias = torch.zeros(removed.shape, dtype=dtype, device=attention_mask.device)
    bias = bias.masked_fill(removed, torch.finfo(dtype).min)
    return bias.masked_fill(~inside, float("-inf"))


def global_slots(is_global: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the global tokens in ``slots`` fixed slots (in sequence order), and which
    slots are used. Unused slots hold distinct non-global positions, masked by the caller."""
    length = is_global.shape[1]
    rank = is_global.long() * (length - torch.arange(length, device=is_global.device))
    index = rank.topk(slots, dim=-1).indices
    used = torch.arange(slots, device=is_global.device) < is_global.long().sum(-1, keepdim=True)
    return index, used


def global_slot_count(config, is_index_global_attn: torch.Tensor) -> int:
    """Upstream's count in eager mode (the most global tokens of any sequence in the batch, 0
    when none); a fixed ``config.max_global_tokens`` while tracing, where no shape may depend on
    the data."""
    length = is_index_global_attn.shape[1]
    if _tracing():
        return min(getattr(config, "max_global_tokens", DEFAULT_MAX_GLOBAL_TOKENS), length)
    return int(is_index_global_attn.sum(-1).max()) if is_index_global_attn.numel() else 0


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, L, ...) and index (B, K) -> (B, K, ...)."""
    shape = index.shape + x.shape[2:]
    expanded = index.reshape(index.shape + (1,) * (x.dim() - 2)).expand(shape)
    return torch.gather(x, 1, expanded)


def forward(
    self,
    hidden_states,
    attention_mask=None,
    is_index_masked=None,
    is_index_global_attn=None,
    is_global_attn=None,
    output_attentions=False,
):
    """Drop-in for ``LongformerSelfAttention.forward`` (same arguments and outputs; the
    ``is_global_attn`` flag is not needed: the slot count says whether any token is global)."""
    batch, length, embed = hidden_states.shape
    heads, dim, w = self.num_heads, self.head_dim, self.one_sided_attn_window_size
    if length % w != 0:
        raise ValueError(f"sequence length {length} must be a multiple of {w} (half the window)")
    slots = global_slot_count(self.config, is_index_global_attn)
    query = (self.query(hidden_states) / math.sqrt(dim)).view(batch, length, heads, dim)
    key = self.key(hidden_states).view(batch, length, heads, dim)
    value = self.value(hidden_states).view(batch, length, heads, dim)

    def per_head(x: torch.Tensor) -> torch.Tensor:  # (B, L, H, D) -> (B*H, L, D)
        return x.transpose(1, 2).reshape(batch * heads, length, dim)

    scores = band_scores(per_head(query), per_head(key), w)
    scores = scores.view(batch, heads, length, 2 * w + 1).transpose(1, 2)  # (B, L, H, 2w+1)
    scores = scores + band_key_bias(attention_mask, w, scores.dtype)[:, :, None, :]

    if slots > 0:
        index, used = global_slots(is_index_global_attn, slots)
        key_global_tokens = _gather_rows(key, index)  # (B, K, H, D)
        to_global = torch.einsum("blhd,bkhd->blhk", query, key_global_tokens)
        to_global = to_global.masked_fill(~used[:, None, None, :], torch.finfo(scores.dtype).min)
        scores = torch.cat([to_global, scores], dim=-1)

    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32)
    probs = probs.masked_fill(is_index_masked[:, :, None, None], 0.0).type_as(scores)
    probs = nn.functional.dropout(probs, p=self.dropout, training=self.training)

    local = probs[..., slots:].transpose(1, 2).reshape(batch * heads, length, 2 * w + 1)
    context = band_context(local, per_head(value), w).view(batch, heads, length, dim)
    context = context.transpose(1, 2)  # (B, L, H, D)
    if slots > 0:
        value_global_tokens = _gather_rows(value, index)
        context = context + torch.einsum("blhk,bkhd->blhd", probs[..., :slots], value_global_tokens)
    output = context.reshape(batch, length, embed)

    global_probs = None
    if slots > 0:
        # the global tokens attend to every position, with their own projections
        hidden_global = _gather_rows(hidden_states, index)  # (B, K, E)
        q_g = (self.query_global(hidden_global) / math.sqrt(dim)).view(batch, slots, heads, dim)
        k_g = self.key_global(hidden_states).view(batch, length, heads, dim)
        v_g = self.value_global(hidden_states).view(batch, length, heads, dim)
        g_scores = torch.einsum("bkhd,blhd->bhkl", q_g, k_g)
        minimum = torch.finfo(g_scores.dtype).min
        g_scores = g_scores.masked_fill(~used[:, None, :, None], minimum)
        g_scores = g_scores.masked_fill(is_index_masked[:, None, None, :], minimum)
        g_probs = nn.functional.softmax(g_scores, dim=-1, dtype=torch.float32).type_as(g_scores)
        global_probs = nn.functional.dropout(g_probs, p=self.dropout, training=self.training)
        g_out = torch.einsum("bhkl,blhd->bkhd", global_probs, v_g).reshape(batch, slots, embed)
        scatter_index = index[..., None].expand(batch, slots, embed)
        kept = torch.gather(output, 1, scatter_index)
        output = output.scatter(1, scatter_index, torch.where(used[..., None], g_out, kept))
        if output_attentions:
            probs = probs.masked_fill(is_index_global_attn[:, :, None, None], 0.0)

    outputs = (output,)
    if output_attentions:
        outputs += (probs,)
        if global_probs is not None:
            outputs += (global_probs,)
    return outputs


PATCH = Patch(
    name="longformer_sliding_window",
    target="transformers.models.longformer.modeling_longformer:LongformerSelfAttention.forward",
    replacement=forward,
    requires={"transformers": ">=5.24,<5.25"},
    reason=(
        "sliding-window attention without as_strided, global attention through slots (fixed in "
        "number while tracing): exports to ONNX at any multiple of the window, compiles without "
        "graph breaks, and "
        "avoids the strided copies that made the seed replace modeling_longformer.py for NPUs"
    ),
)
