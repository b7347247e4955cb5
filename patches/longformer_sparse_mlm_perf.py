"""Speed-up: Longformer masked LM computes vocabulary logits only where a label is.

Upstream ``LongformerForMaskedLM.forward`` runs the LM head (dense, GELU, LayerNorm and the 50k
vocabulary projection) on every position; at sequence 4096 that is about a third of a training
step, spent mostly on positions labelled -100. This replacement runs the head on the labelled
positions only (``nbzoo.perf.labelled_positions``; a static count when the model carries
``_nbzoo_mlm_budget``) with the same mean cross-entropy. It takes this path only when it
trains a model put on the perf path (``nbzoo.perf.enable``, which sets ``_nbzoo_mlm_budget``) in
training mode, with gradients on and labels given; then ``logits`` is None, which is the point.
Every other call -- evaluation (eval mode, or no gradients), no labels, a model not on the perf
path -- goes to the upstream forward unchanged and gets upstream's logits.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers.models.longformer.modeling_longformer import (
    LongformerMaskedLMOutput,
)

from nbzoo import patching
from nbzoo.perf import labelled_positions

NAME = "longformer_sparse_mlm_perf"


def forward(
    self,
    input_ids=None,
    attention_mask=None,
    global_attention_mask=None,
    token_type_ids=None,
    position_ids=None,
    inputs_embeds=None,
    labels=None,
    output_attentions=None,
    output_hidden_states=None,
    return_dict=None,
    **kwargs,
):
    upstream = patching.original(NAME)
    sparse = (
        labels is not None
        and self.training
        and torch.is_grad_enabled()
        and hasattr(self, "_nbzoo_mlm_budget")  # put on the perf path by nbzoo.perf.enable
        and return_dict is not False
        and not output_attentions
        and not output_hidden_states
    )
    if not sparse:
        return upstream(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            global_attention_mask=global_attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            **kwargs,
        )
    outputs = self.longformer(
        input_ids,
        attention_mask=attention_mask,
        global_attention_mask=global_attention_mask,
        token_type_ids=token_type_ids,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        return_dict=True,
    )
    hidden, targets = labelled_positions(
        outputs[0], labels, getattr(self, "_nbzoo_mlm_budget", None)
    )
    scores = self.lm_head(hidden)
    loss = F.cross_entropy(scores.view(-1, self.config.vocab_size), targets)
    return LongformerMaskedLMOutput(loss=loss, logits=None)


PATCH = patching.Patch(
    name=NAME,
    target="transformers.models.longformer.modeling_longformer:LongformerForMaskedLM.forward",
    replacement=forward,
    same_signature=True,
    requires={"transformers": ">=5.24,<5.25", "torch": ">=2.13,<2.14"},
    reason="speed: MLM logits and loss only at the labelled (masked) positions",
)
