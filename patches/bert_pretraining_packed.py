"""Sequence packing for BERT pre-training (MLM + NSP): several whole samples per row, kept apart.

A batch from ``nbzoo.packing.PackedCollator`` (MLPerf samples unpadded to their real lengths)
carries ``sequence_ids`` and ``cls_positions``; this replacement of ``BertForPreTraining.forward``
runs the encoder with a block-diagonal attention mask (``nbzoo.packing.model_attention``),
the collator's per-sample positions and token types (each sample keeps its A/B segments), then:

- MLM on the packed token labels (-100 on padding and unmasked tokens): the same mean over the
  labelled tokens of the batch as upstream's. With ``model._nbzoo_mlm_budget`` set (the perf
  path) or ``model._nbzoo_sparse_mlm`` true, the vocabulary projection runs on the labelled
  positions only (``nbzoo.perf.labelled_positions``, as ``bert_pretraining_sparse_mlm_perf``)
  and ``prediction_logits`` is None; otherwise full logits (rows, L, vocab) come back.
- NSP on each sample's [CLS]: BERT's pooler and ``seq_relationship`` per sample, in packed order.

Calls without ``sequence_ids`` go to the upstream forward unchanged. It replaces the same
attribute as ``bert_pretraining_sparse_mlm_perf`` and subsumes it for packed batches: apply one
or the other.
"""

from __future__ import annotations

from torch.nn import functional as F
from transformers.models.bert.modeling_bert import BertForPreTrainingOutput

from nbzoo import packing, patching
from nbzoo.perf import labelled_positions

NAME = "bert_pretraining_packed"


def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
            inputs_embeds=None, labels=None, next_sentence_label=None, **kwargs):  # fmt: skip
    sequence_ids, cls_positions = packing.pop_packing(kwargs)
    if sequence_ids is None:
        return patching.original(NAME)(
            self, input_ids=input_ids, attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids,
            inputs_embeds=inputs_embeds, labels=labels,
            next_sentence_label=next_sentence_label, **kwargs,
        )  # fmt: skip
    kwargs.pop("return_dict", None)
    attention = packing.model_attention(self, sequence_ids, attention_mask)
    outputs = self.bert(
        input_ids, token_type_ids=token_type_ids,
        position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True, **attention,
        **kwargs,
    )  # fmt: skip
    sequence_output = outputs.last_hidden_state
    first = packing.gather_sequences(sequence_output, cls_positions)
    pooled = self.bert.pooler(first[:, None, :])  # BERT's pooler takes hidden[:, 0]
    nsp_scores = self.cls.seq_relationship(pooled)
    budget = getattr(self, "_nbzoo_mlm_budget", None)
    sparse = budget is not None or getattr(self, "_nbzoo_sparse_mlm", False)
    prediction_scores = None
    loss = None
    if sparse and labels is not None:
        hidden, targets = labelled_positions(sequence_output, labels, budget)
        scores = self.cls.predictions(hidden)
        mlm_loss = F.cross_entropy(scores.view(-1, self.config.vocab_size), targets)
    else:
        prediction_scores = self.cls.predictions(sequence_output)
        mlm_loss = None
        if labels is not None:
            mlm_loss = F.cross_entropy(
                prediction_scores.view(-1, self.config.vocab_size),
                labels.view(-1).to(prediction_scores.device),
            )
    if mlm_loss is not None and next_sentence_label is not None:
        nsp_loss = F.cross_entropy(
            nsp_scores.view(-1, 2), next_sentence_label.view(-1).to(nsp_scores.device)
        )
        loss = mlm_loss + nsp_loss
    return BertForPreTrainingOutput(
        loss=loss, prediction_logits=prediction_scores, seq_relationship_logits=nsp_scores,
        hidden_states=outputs.hidden_states, attentions=outputs.attentions,
    )  # fmt: skip


PATCH = patching.Patch(
    name=NAME,
    target="transformers.models.bert.modeling_bert:BertForPreTraining.forward",
    replacement=forward,
    same_signature=True,
    requires={"transformers": ">=5.24,<5.25", "torch": ">=2.13,<2.14"},
    reason="speed: whole pre-training samples packed into rows, MLM and NSP per sample",
)
