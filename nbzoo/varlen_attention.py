"""Variable-length attention: a packed batch's sequences attended one by one, without a mask.

A packed batch keeps its sequences apart with a block-diagonal mask: SDPA then computes every
(query, key) pair of a row and masks most of them, so rows must stay short, and each row's
padding still runs through every layer. Attention that takes the sequences' boundaries instead
(``cu_seq_lens``, as FlashAttention's ``flash_attn_varlen_func``) lets a step's sequences sit in
one row, end to end: the projections, the feed-forward layers and the norms (nearly all of an
encoder's work) then run on the real tokens only, and attention on each sequence alone:

- on CUDA in fp16 / bf16 without attention dropout: ``torch.nn.attention.varlen.varlen_attn``
  (torch >= 2.10), FlashAttention over the token stream;
- elsewhere (a CPU, fp32, attention dropout): the sequences are scattered into a batch of rows
  as long as the longest, attended with SDPA under a key-padding mask and gathered back: the
  attention a length-grouped padded batch computes, without its padding anywhere else.

:func:`register` makes :data:`NAME` an attention implementation of transformers (its
``AttentionInterface``, and SDPA's mask builder under the same name): a model set to it calls
:func:`attention_forward` in every layer, which serves a packed batch's call (the packing
patches pass ``cu_seq_lens`` and ``max_seq_len`` down: ``packing.model_attention``) and hands
every other call to transformers' SDPA unchanged.
"""

from __future__ import annotations

import torch

NAME = "nbzoo_varlen"


def kernel_available() -> bool:
    """Whether this torch has the varlen FlashAttention kernel and a CUDA device to run it."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def register() -> None:
    """Make :data:`NAME` an attention implementation transformers' models accept."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def boundaries(sequence_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seq_lens, longest) of a packed batch's token stream (its rows one after another):
    a segment per sequence, and one per row's padding (which attends to itself, as under the
    block-diagonal mask). int32 offsets from 0 to rows x length, as FlashAttention takes them."""
    rows, length = sequence_ids.shape
    flat = sequence_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::length] = True  # a row starts a segment even where the last row ended on the same id
    offsets = torch.nonzero(starts).reshape(-1)
    end = torch.tensor([flat.numel()], device=flat.device, dtype=offsets.dtype)
    cu = torch.cat([offsets, end]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` / ``key`` / ``value`` of shape
    (rows, heads, length, head dim); returns (rows, length, heads, head dim)."""
    if cu_seq_lens is None:  # an ordinary batch: SDPA, as the model would run it
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows, heads, length, dim = query.shape

    def stream(t: torch.Tensor) -> torch.Tensor:  # (rows, heads, length, dim) -> (tokens, ...)
        return t.transpose(1, 2).reshape(rows * length, heads, dim)

    q, k, v = stream(query), stream(key), stream(value)
    half = q.dtype in (torch.float16, torch.bfloat16)
    if q.is_cuda and half and dropout == 0 and kernel_available():
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(
            q, k, v, cu_seq_lens, cu_seq_lens, max_seq_len, max_seq_len, scale=scaling
        )
    else:
        out = _padded_per_sequence(q, k, v, cu_seq_lens, max_seq_len, dropout, scaling)
    return out.reshape(rows, length, heads, dim), None


def _padded_per_sequence(q, k, v, cu_seq_lens, max_seq_len, dropout, scaling):
    """Attention of each segment of the token stream alone: the segments scattered into rows of
    ``max_seq_len`` (one a segment), SDPA under a key-padding mask, the real positions gathered
    back. (tokens, heads, dim) in and out."""
    tokens, heads, dim = q.shape
    cu = cu_seq_lens.to(q.device, torch.long)
    lengths = cu[1:] - cu[:-1]
    segments = lengths.numel()
    if segments * max_seq_len == tokens:  # every segment full length: rows without padding
        out = torch.nn.functional.scaled_dot_product_attention(
            *(t.view(segments, max_seq_len, heads, dim).transpose(1, 2) for t in (q, k, v)),
            dropout_p=dropout, scale=scaling,
        )  # fmt: skip
        return out.transpose(1, 2).reshape(tokens, heads, dim)
    segment = torch.repeat_interleave(torch.arange(segments, device=q.device), lengths)
    slot = segment * max_seq_len + torch.arange(tokens, device=q.device) - cu[:-1][segment]

    def rows(t: torch.Tensor) -> torch.Tensor:  # (tokens, heads, dim) -> (segments, heads, L, dim)
        padded = t.new_zeros(segments * max_seq_len, heads, dim).index_copy(0, slot, t)
        return padded.view(segments, max_seq_len, heads, dim).transpose(1, 2)

    keys = torch.arange(max_seq_len, device=q.device)[None, :] < lengths[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        rows(q), rows(k), rows(v), attn_mask=keys[:, None, None, :], dropout_p=dropout,
        scale=scaling,
    )  # fmt: skip
    return out.transpose(1, 2).reshape(segments * max_seq_len, heads, dim).index_select(0, slot)
