"""Sequence packing for RoBERTa classification: several whole sentences per row, kept apart.

As ``albert_packed_sequences``, for ``RobertaForSequenceClassification``: a block-diagonal
attention mask from ``sequence_ids``, RoBERTa's classification head on each sequence's first
token (``<s>``), upstream's loss over sequences. RoBERTa numbers positions from
``pad_token_id + 1`` (fairseq's ``make_positions``), so the collator's 0-based per-sequence
positions are shifted by that offset, and padding slots get ``pad_token_id`` as upstream gives
padding. Calls without ``sequence_ids`` go to the upstream forward unchanged.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from nbzoo import packing, patching

NAME = "roberta_packed_sequences"


def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
            inputs_embeds=None, labels=None, **kwargs):  # fmt: skip
    sequence_ids, cls_positions = packing.pop_packing(kwargs)
    if sequence_ids is None:
        return patching.original(NAME)(
            self, input_ids=input_ids, attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids,
            inputs_embeds=inputs_embeds, labels=labels, **kwargs,
        )  # fmt: skip
    pad = self.config.pad_token_id
    position_ids = torch.where(sequence_ids > 0, position_ids + pad + 1, pad)
    attention = packing.model_attention(self, sequence_ids, attention_mask)
    outputs = self.roberta(
        input_ids, token_type_ids=token_type_ids,
        position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True, **attention,
        **kwargs,
    )  # fmt: skip
    first = packing.gather_sequences(outputs.last_hidden_state, cls_positions)
    logits = self.classifier(first[:, None, :])  # the head takes features[:, 0, :]
    loss = None if labels is None else packing.sequence_classification_loss(self, logits, labels)
    return SequenceClassifierOutput(
        loss=loss, logits=logits, hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )  # fmt: skip


PATCH = patching.Patch(
    name=NAME,
    target="transformers.models.roberta.modeling_roberta:RobertaForSequenceClassification.forward",
    replacement=forward,
    same_signature=True,
    requires={"transformers": ">=5.24,<5.25", "torch": ">=2.13,<2.14"},
    reason="speed: whole sentences packed into rows, attention and pooling per sentence",
)
