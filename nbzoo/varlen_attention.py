"""Variable-length attention for packed rows: torch's FlashAttention over the sequences of a
packed batch, without a mask (``packing.attention_implementation`` picks it on CUDA).

A packed batch keeps sequences apart with a block-diagonal mask: SDPA then computes every
(query, key) pair of a row and masks most of them, and FlexAttention skips whole masked blocks
but needs ``torch.compile``. ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10) takes the
tokens of all rows as one stream with the sequences' boundaries (``cu_seq_lens``, as
FlashAttention's ``flash_attn_varlen_func``) and computes each sequence's attention alone: no
mask, no masked pair, no compile. It is registered with transformers' ``AttentionInterface``
under :data:`NAME`, so a model set to it (``model.set_attn_implementation(NAME)``) calls
:func:`attention_forward` in every layer; the packing patches pass the boundaries down
(:func:`packing.model_attention`).

Limits, each refused with a message: torch's kernel has no dropout (a model training with
attention dropout keeps SDPA or FlexAttention), and runs fp16 / bf16 on CUDA only. On a CPU the
same function computes each sequence with SDPA in a loop: slow, there so that the tests check
the boundaries and the layout against the padded model without a GPU.
"""

from __future__ import annotations

import torch

NAME = "nbzoo_varlen"


def available() -> bool:
    """Whether this torch has the varlen kernel and a CUDA device to run it."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def register() -> None:
    """Make :data:`NAME` an attention implementation transformers' models accept."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)


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
    if cu_seq_lens is None:
        raise ValueError(
            f"attention {NAME!r} serves packed batches only (it needs their sequence boundaries); "
            "set the model's attention to sdpa for padded batches"
        )
    if dropout > 0:
        raise ValueError(
            f"attention {NAME!r} has no dropout (torch's varlen_attn), and this model trains with "
            f"attention dropout {dropout}: use sdpa or flex_attention"
        )
    rows, heads, length, dim = query.shape

    def stream(t: torch.Tensor) -> torch.Tensor:  # (rows, heads, length, dim) -> (tokens, ...)
        return t.transpose(1, 2).reshape(rows * length, heads, dim)

    q, k, v = stream(query), stream(key), stream(value)
    if query.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        if q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"attention {NAME!r} runs fp16 / bf16 (FlashAttention); the model computes in "
                f"{q.dtype}: train under bf16 / fp16 autocast, or use sdpa"
            )
        out = varlen_attn(
            q, k, v, cu_seq_lens, cu_seq_lens, max_seq_len, max_seq_len, scale=scaling
        )
    else:
        out = torch.empty_like(q)
        edges = cu_seq_lens.tolist()
        for start, end in zip(edges[:-1], edges[1:], strict=True):
            part = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # (heads, n, dim)
            out[start:end] = torch.nn.functional.scaled_dot_product_attention(
                *part, scale=scaling
            ).transpose(0, 1)
    return out.reshape(rows, length, heads, dim), None
