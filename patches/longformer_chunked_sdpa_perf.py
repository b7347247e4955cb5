"""Speed-up: Longformer's sliding-window (+ global) attention through one fused SDPA call.

Upstream ``LongformerSelfAttention.forward`` builds the band of scores with overlapping-chunk
matmuls, pads and re-diagonalises them, runs softmax in fp32 and multiplies back chunk by chunk:
many memory-bound kernels and about twice the band's FLOPs. This replacement cuts the sequence
into blocks of ``w`` (the one-sided window) and lets each query block attend to its own block and
its two neighbours (3w keys) with a boolean band mask, through
``torch.nn.functional.scaled_dot_product_attention`` — the fused (memory-efficient) kernel on a
GPU, with attention dropout inside the kernel. Same attention pattern as upstream:

- query ``i`` sees key ``j`` when ``|i - j| <= w`` and ``j`` is neither padding nor global;
- every query also sees every global key (local projections), as extra key columns;
- global queries attend to all non-padding keys with the ``*_global`` projections, replacing their
  local rows; padding queries output zeros.

FlexAttention would skip the masked blocks too, but it has no attention dropout, and Longformer
trains with dropout 0.1. Calls asking for attention probabilities go to upstream unchanged.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from nbzoo import patching

NAME = "longformer_chunked_sdpa_perf"


def _windows(x: torch.Tensor, w: int, value: float | bool = 0.0) -> torch.Tensor:
    """(B, S, ...) -> (B, S // w, 3w, ...): for block b, positions (b-1)w .. (b+2)w - 1
    (zero/``value`` outside the sequence)."""
    pad = [0, 0] * (x.ndim - 2) + [w, w]
    padded = F.pad(x, pad, value=value)
    # unfold puts the window dimension last; move it next to the block dimension
    win = padded.unfold(1, 3 * w, w)
    return win.movedim(-1, 2)


def _band(w: int, device: torch.device) -> torch.Tensor:
    """(w, 3w) bool: query r of a block may see window column c when |(c - w) - r| <= w."""
    r = torch.arange(w, device=device)[:, None]
    c = torch.arange(3 * w, device=device)[None, :]
    return (c - w - r).abs() <= w


def forward(
    self,
    hidden_states,
    attention_mask=None,
    is_index_masked=None,
    is_index_global_attn=None,
    is_global_attn=None,
    output_attentions=False,
):
    w = self.one_sided_attn_window_size
    batch, seq_len, _ = hidden_states.shape
    if output_attentions or seq_len % w != 0 or is_index_masked is None:
        return patching.original(NAME)(
            self,
            hidden_states,
            attention_mask=attention_mask,
            is_index_masked=is_index_masked,
            is_index_global_attn=is_index_global_attn,
            is_global_attn=is_global_attn,
            output_attentions=output_attentions,
        )
    heads, dim = self.num_heads, self.head_dim
    blocks = seq_len // w
    dropout = self.dropout if self.training else 0.0

    q = self.query(hidden_states).view(batch, seq_len, heads, dim)
    k = self.key(hidden_states).view(batch, seq_len, heads, dim)
    v = self.value(hidden_states).view(batch, seq_len, heads, dim)

    # (B*nb, H, w, D) queries; (B*nb, H, 3w, D) keys and values of the three blocks around
    qb = q.view(batch, blocks, w, heads, dim).permute(0, 1, 3, 2, 4).reshape(-1, heads, w, dim)
    kb = _windows(k, w).permute(0, 1, 3, 2, 4).reshape(-1, heads, 3 * w, dim)
    vb = _windows(v, w).permute(0, 1, 3, 2, 4).reshape(-1, heads, 3 * w, dim)

    is_global = is_index_global_attn if is_global_attn else torch.zeros_like(is_index_masked)
    key_ok = _windows(~(is_index_masked | is_global), w, value=False)  # (B, nb, 3w)
    band = _band(w, hidden_states.device)
    allowed = band & key_ok[:, :, None, :]  # (B, nb, w, 3w)
    # Padding queries are zeroed below; let them see their band so that no row is empty (an
    # empty row makes softmax NaN, and NaN survives masking in the backward pass).
    query_pad = is_index_masked.view(batch, blocks, w)
    allowed = allowed | (band & query_pad[..., None])

    if is_global_attn:
        # Global keys as extra columns for every block: (B, G) positions, G = most per sequence.
        counts = is_index_global_attn.sum(-1)
        g = int(counts.max())
        order = torch.argsort((~is_index_global_attn).to(torch.int8), dim=-1, stable=True)[:, :g]
        g_valid = torch.arange(g, device=counts.device)[None, :] < counts[:, None]  # (B, G)
        kg = k.gather(1, order[:, :, None, None].expand(-1, -1, heads, dim))  # (B, G, H, D)
        vg = v.gather(1, order[:, :, None, None].expand(-1, -1, heads, dim))
        kg = kg.permute(0, 2, 1, 3)[:, None].expand(-1, blocks, -1, -1, -1)
        vg = vg.permute(0, 2, 1, 3)[:, None].expand(-1, blocks, -1, -1, -1)
        kb = torch.cat([kb, kg.reshape(-1, heads, g, dim)], dim=2)
        vb = torch.cat([vb, vg.reshape(-1, heads, g, dim)], dim=2)
        allowed = torch.cat([allowed, g_valid[:, None, None, :].expand(-1, blocks, w, -1)], dim=-1)

    mask = allowed.reshape(batch * blocks, 1, w, allowed.shape[-1])
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout)
    out = out.view(batch, blocks, heads, w, dim).permute(0, 1, 3, 2, 4)
    out = out.reshape(batch, seq_len, heads * dim)
    out = out.masked_fill(is_index_masked[:, :, None], 0.0)

    if is_global_attn:
        # Global queries: all non-padding keys, with the global projections.
        h_g = hidden_states.gather(1, order[:, :, None].expand(-1, -1, hidden_states.shape[-1]))
        qg = self.query_global(h_g).view(batch, g, heads, dim).transpose(1, 2)
        kgl = self.key_global(hidden_states).view(batch, seq_len, heads, dim).transpose(1, 2)
        vgl = self.value_global(hidden_states).view(batch, seq_len, heads, dim).transpose(1, 2)
        keys_ok = (~is_index_masked)[:, None, None, :]
        out_g = F.scaled_dot_product_attention(qg, kgl, vgl, attn_mask=keys_ok, dropout_p=dropout)
        out_g = out_g.transpose(1, 2).reshape(batch, g, heads * dim).to(out.dtype)
        # Write the global rows over the local ones (padding slots of short rows write nothing).
        rows = torch.arange(batch, device=out.device)[:, None].expand(-1, g)[g_valid]
        out = out.index_put((rows, order[g_valid]), out_g[g_valid])

    return (out,)


PATCH = patching.Patch(
    name=NAME,
    target="transformers.models.longformer.modeling_longformer:LongformerSelfAttention.forward",
    replacement=forward,
    requires={"transformers": ">=5.24,<5.25", "torch": ">=2.13,<2.14"},
    reason="speed: sliding-window and global attention as one fused SDPA kernel per layer",
)
