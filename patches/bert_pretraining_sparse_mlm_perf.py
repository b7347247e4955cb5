"""Speed-up: BERT pre-training (MLM + NSP) computes vocabulary logits only where a label is.

Upstream ``BertForPreTraining.forward`` projects every position onto the 30k vocabulary and then
ignores the ~85 % of positions labelled -100. This replacement runs the prediction head on the
labelled positions only (``nbzoo.perf.labelled_positions``; a static count when the model carries
``_nbzoo_mlm_budget``), with the same cross-entropy (mean over labelled positions) plus the NSP
loss. It takes this path only when it trains a model put on the perf path (``nbzoo.perf.enable``,
which sets ``_nbzoo_mlm_budget``) in training mode, with gradients on and both labels given; then
``prediction_logits`` is None (full logits are not computed), which is the point. Every other
call -- evaluation (eval mode, or no gradients), missing labels, tuple outputs, a model not on
the perf path -- goes to the upstream forward unchanged and gets upstream's logits.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers.models.bert.modeling_bert import BertForPreTrainingOutput

from nbzoo import patching
from nbzoo.perf import labelled_positions

NAME = "bert_pretraining_sparse_mlm_perf"


def forward(
    self,
    input_ids=None,
    attention_mask=None,
    token_type_ids=None,
    position_ids=None,
    inputs_embeds=None,
    labels=None,
    next_sentence_label=None,
    **kwargs,
):
    upstream = patching.original(NAME)
    sparse = (
        labels is not None
        and next_sentence_label is not None
        and self.training
        and torch.is_grad_enabled()
        and hasattr(self, "_nbzoo_mlm_budget")  # put on the perf path by nbzoo.perf.enable
        and kwargs.get("return_dict", True) is not False
        and not kwargs.get("output_attentions")
        and not kwargs.get("output_hidden_states")
    )
    if not sparse:
        return upstream(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            next_sentence_label=next_sentence_label,
            **kwargs,
        )
    kwargs.pop("return_dict", None)
    outputs = self.bert(
        input_ids,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        return_dict=True,
        **kwargs,
    )
    sequence_output, pooled_output = outputs[:2]
    hidden, targets = labelled_positions(
        sequence_output, labels, getattr(self, "_nbzoo_mlm_budget", None)
    )
    scores = self.cls.predictions(hidden)
    seq_relationship_score = self.cls.seq_relationship(pooled_output)
    masked_lm_loss = F.cross_entropy(scores.view(-1, self.config.vocab_size), targets)
    next_sentence_loss = F.cross_entropy(
        seq_relationship_score.view(-1, 2), next_sentence_label.view(-1).to(scores.device)
    )
    return BertForPreTrainingOutput(
        loss=masked_lm_loss + next_sentence_loss,
        prediction_logits=None,
        seq_relationship_logits=seq_relationship_score,
    )


PATCH = patching.Patch(
    name=NAME,
    target="transformers.models.bert.modeling_bert:BertForPreTraining.forward",
    replacement=forward,
    same_signature=True,
    requires={"transformers": ">=5.24,<5.25", "torch": ">=2.13,<2.14"},
    reason="speed: MLM logits and loss only at the labelled (masked) positions",
)
