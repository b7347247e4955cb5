"""Speed-up: Reformer's encoder with ordinary autograd instead of the reversible-residual function.

Upstream ``ReformerEncoder.forward`` runs all layers inside ``_ReversibleFunction``: the forward
runs under ``torch.no_grad()`` and re-seeds the global RNG before every attention and feed-forward
block (so that dropout can be replayed), and the backward recomputes each layer. The re-seeding
(``torch.seed()``, ``torch.manual_seed``) and the custom backward break ``torch.compile`` into
many small graphs, and the recompute costs a third more work; Reformer's small kernels then leave
the GPU waiting on launches. The reversible trick saves activation memory, which a single GPU at
the seed's shapes does not need.

This replacement computes the same two residual streams with ordinary autograd:
``Y1 = X1 + Attention(X2)``, ``Y2 = X2 + FeedForward(Y1)`` per layer, then the same LayerNorm
over ``[Y1, Y2]`` and the same dropout, so the loss is the same and the gradients equal the
reversible ones up to rounding (the reversible backward reconstructs inputs by subtraction).
It applies while gradients are computed and no cache, attention probabilities or hidden states
are asked for; other calls (generation, evaluation) go to upstream unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.reformer.modeling_reformer import ReformerEncoderOutput

from nbzoo import patching

NAME = "reformer_plain_residual_perf"


def forward(
    self,
    hidden_states,
    attention_mask=None,
    num_hashes=None,
    past_buckets_states=None,
    use_cache=False,
    orig_sequence_length=None,
    output_hidden_states=False,
    output_attentions=False,
):
    if (
        not torch.is_grad_enabled()
        or use_cache
        or past_buckets_states is not None
        or output_hidden_states
        or output_attentions
    ):
        return patching.original(NAME)(
            self,
            hidden_states,
            attention_mask=attention_mask,
            num_hashes=num_hashes,
            past_buckets_states=past_buckets_states,
            use_cache=use_cache,
            orig_sequence_length=orig_sequence_length,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
    # Upstream duplicates the input into the two streams: X1 (attn_output) and X2 (hidden_states).
    attn_output = hidden_states
    for layer in self.layers:
        attn = layer.attention(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            num_hashes=num_hashes,
            orig_sequence_length=orig_sequence_length,
        ).hidden_states
        attn_output = attn_output + attn
        hidden_states = hidden_states + layer.feed_forward(attn_output)
    hidden_states = self.layer_norm(torch.cat([attn_output, hidden_states], dim=-1))
    hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
    return ReformerEncoderOutput(
        hidden_states=hidden_states,
        all_hidden_states=[],
        all_attentions=[],
        past_buckets_states=None,
    )


PATCH = patching.Patch(
    name=NAME,
    target="transformers.models.reformer.modeling_reformer:ReformerEncoder.forward",
    replacement=forward,
    requires={"transformers": ">=5.24,<5.25", "torch": ">=2.13,<2.14"},
    reason="speed: ordinary autograd instead of reversible layers, so compile / CUDA graphs apply",
)
