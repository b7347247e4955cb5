"""Sequence packing for ALBERT classification: several whole sentences per row, kept apart.

A batch from ``nbzoo.packing.PackedCollator`` carries ``sequence_ids`` (each token's sequence
number in its row, 0 for padding) and ``cls_positions`` (each sequence's first token, flat).
This replacement of ``AlbertForSequenceClassification.forward`` turns ``sequence_ids`` into a
block-diagonal attention mask in the form of the model's attention implementation (or, for
varlen attention, the sequences' boundaries: ``nbzoo.packing.model_attention``), runs the
encoder with the collator's per-sequence
``position_ids`` and token types, and applies ALBERT's pooler (dense + tanh on the [CLS]
token), dropout and classifier to each sequence's first token: one logit row per sequence, and
upstream's loss (a mean over sequences). Any call without ``sequence_ids`` goes to the upstream
forward unchanged.
"""

from __future__ import annotations

from transformers.modeling_outputs import SequenceClassifierOutput

from nbzoo import packing, patching

NAME = "albert_packed_sequences"


def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
            inputs_embeds=None, labels=None, **kwargs):  # fmt: skip
    sequence_ids, cls_positions = packing.pop_packing(kwargs)
    if sequence_ids is None:
        return patching.original(NAME)(
            self, input_ids=input_ids, attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids,
            inputs_embeds=inputs_embeds, labels=labels, **kwargs,
        )  # fmt: skip
    attention = packing.model_attention(self, sequence_ids, attention_mask)
    outputs = self.albert(
        input_ids=input_ids, token_type_ids=token_type_ids,
        position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True, **attention,
        **kwargs,
    )  # fmt: skip
    first = packing.gather_sequences(outputs.last_hidden_state, cls_positions)
    pooled = self.albert.pooler_activation(self.albert.pooler(first))
    logits = self.classifier(self.dropout(pooled))
    loss = None if labels is None else packing.sequence_classification_loss(self, logits, labels)
    return SequenceClassifierOutput(
        loss=loss, logits=logits, hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )  # fmt: skip


PATCH = patching.Patch(
    name=NAME,
    target="transformers.models.albert.modeling_albert:AlbertForSequenceClassification.forward",
    replacement=forward,
    same_signature=True,
    requires={"transformers": ">=5.24,<5.25", "torch": ">=2.13,<2.14"},
    reason="speed: whole sentences packed into rows, attention and pooling per sentence",
)
