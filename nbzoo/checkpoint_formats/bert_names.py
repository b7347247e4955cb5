"""One table: every weight of transformers' ``BertForPreTraining`` with its name in Google's BERT
(TensorFlow 1, the MLPerf v0.7 phase-1 checkpoint's names) and in MindSpore's 2020 BERT model zoo,
and its shape for a given ``bert_config.json``.

Google's names are the variable scopes of google-research/bert's ``modeling.py`` and
``run_pretraining.py`` (the same in mlcommons/training's ``language_model/tensorflow/bert``, now
``retired_benchmarks/bert``): ``bert/embeddings/word_embeddings``,
``bert/encoder/layer_N/attention/self/query/kernel``, ``cls/predictions/output_bias``,
``cls/seq_relationship/output_weights``, ... TensorFlow's dense kernels are ``[in, out]``
(``tf.matmul(x, kernel)``); torch's ``Linear.weight`` is ``[out, in]``, so kernels are transposed.
``cls/seq_relationship/output_weights`` is ``[2, hidden]`` already (``matmul(..., transpose_b=True)``).

MindSpore's names are those of the model zoo's tf -> ms table, ``param_name_dict`` in
mindspore-ai/models ``official/nlp/Bert/scripts/ms2tf/ms2tf_config.py`` (key: tf, value: ms; e.g.
``'bert/embeddings/word_embeddings': 'bert.bert.bert_embedding_lookup.embedding_table'``), which
are the attribute paths of the seed's 2020 ``model_zoo/official/nlp/bert_thor/src`` (mindspore-ai/
mindspore): ``BertNetworkWithLoss.bert`` (``BertPreTraining``) ``.bert`` (``BertModel``) /
``.cls1`` (``GetMaskedLMOutput``) / ``.cls2`` (``GetNextSentenceOutput``), layers in
``bert_encoder.layers.N``. MindSpore's ``Dense`` (and bert_thor's ``Dense_Thor``) weights are
``[out, in]`` like torch's -- the same table's ``transpose_list`` transposes exactly TF's kernels --
so nothing is transposed from MindSpore; its LayerNorms name their parameters ``gamma`` / ``beta``.

transformers ties the decoder to the word embeddings (:data:`TIED`); the converted file holds the
embedding once and no decoder, as ``save_pretrained`` writes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

# transformers' tied pairs: the first shares the second's tensor, so the file holds only the second.
TIED = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}


@dataclass(frozen=True)
class Sizes:
    """The sizes of a ``bert_config.json`` that shape the weights."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int


@dataclass(frozen=True)
class Weight:
    hf: str  # transformers BertForPreTraining state-dict key
    google: str  # Google's BERT (TensorFlow 1) variable name
    mindspore: str  # MindSpore BERT model zoo parameter name
    shape: tuple[int, ...]  # torch's shape
    tf_transposed: bool  # TensorFlow stores it [in, out]

    @property
    def tf_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.tf_transposed else self.shape


def _dense(hf: str, google: str, ms: str, out: int, into: int) -> list[Weight]:
    return [
        Weight(f"{hf}.weight", f"{google}/kernel", f"{ms}.weight", (out, into), True),
        Weight(f"{hf}.bias", f"{google}/bias", f"{ms}.bias", (out,), False),
    ]


def _layernorm(hf: str, google: str, ms: str, width: int) -> list[Weight]:
    return [
        Weight(f"{hf}.weight", f"{google}/gamma", f"{ms}.gamma", (width,), False),
        Weight(f"{hf}.bias", f"{google}/beta", f"{ms}.beta", (width,), False),
    ]


def _layer(n: int, h: int, i: int) -> list[Weight]:
    hf, g, ms = (
        f"bert.encoder.layer.{n}",
        f"bert/encoder/layer_{n}",
        f"bert.bert.bert_encoder.layers.{n}",
    )
    rows = []
    for part in ("query", "key", "value"):
        rows += _dense(f"{hf}.attention.self.{part}", f"{g}/attention/self/{part}",
                       f"{ms}.attention.attention.{part}_layer", h, h)  # fmt: skip
    rows += _dense(f"{hf}.attention.output.dense", f"{g}/attention/output/dense",
                   f"{ms}.attention.output.dense", h, h)  # fmt: skip
    rows += _layernorm(f"{hf}.attention.output.LayerNorm", f"{g}/attention/output/LayerNorm",
                       f"{ms}.attention.output.layernorm", h)  # fmt: skip
    rows += _dense(
        f"{hf}.intermediate.dense", f"{g}/intermediate/dense", f"{ms}.intermediate", i, h
    )
    rows += _dense(f"{hf}.output.dense", f"{g}/output/dense", f"{ms}.output.dense", h, i)
    rows += _layernorm(
        f"{hf}.output.LayerNorm", f"{g}/output/LayerNorm", f"{ms}.output.layernorm", h
    )
    return rows


def bert_weights(s: Sizes) -> list[Weight]:
    """Every weight of ``BertForPreTraining`` but the tied decoder, in the model's order."""
    h, emb, post = s.hidden_size, "bert.embeddings", "bert.bert.bert_embedding_postprocessor"
    rows = [
        Weight(f"{emb}.word_embeddings.weight", "bert/embeddings/word_embeddings",
               "bert.bert.bert_embedding_lookup.embedding_table", (s.vocab_size, h), False),
        Weight(f"{emb}.position_embeddings.weight", "bert/embeddings/position_embeddings",
               f"{post}.full_position_embedding.embedding_table",
               (s.max_position_embeddings, h), False),
        Weight(f"{emb}.token_type_embeddings.weight", "bert/embeddings/token_type_embeddings",
               f"{post}.token_type_embedding.embedding_table", (s.type_vocab_size, h), False),
    ]  # fmt: skip
    rows += _layernorm(f"{emb}.LayerNorm", "bert/embeddings/LayerNorm", f"{post}.layernorm", h)
    for n in range(s.num_hidden_layers):
        rows += _layer(n, h, s.intermediate_size)
    rows += _dense("bert.pooler.dense", "bert/pooler/dense", "bert.bert.dense", h, h)
    rows += _dense("cls.predictions.transform.dense", "cls/predictions/transform/dense",
                   "bert.cls1.dense", h, h)  # fmt: skip
    rows += _layernorm("cls.predictions.transform.LayerNorm", "cls/predictions/transform/LayerNorm",
                       "bert.cls1.layernorm", h)  # fmt: skip
    rows += [
        Weight("cls.predictions.bias", "cls/predictions/output_bias", "bert.cls1.output_bias",
               (s.vocab_size,), False),
        Weight("cls.seq_relationship.weight", "cls/seq_relationship/output_weights",
               "bert.cls2.dense.weight", (2, h), False),
        Weight("cls.seq_relationship.bias", "cls/seq_relationship/output_bias",
               "bert.cls2.dense.bias", (2,), False),
    ]  # fmt: skip
    return rows


@cache
def weight_name_pattern(field: str) -> re.Pattern[str]:
    """A regular expression matching the ``field`` ("google" or "mindspore") name of any weight
    for any layer count: a checkpoint name that matches but is not among a configuration's weights
    belongs to a model of another depth."""
    one_layer = bert_weights(Sizes(1, 1, 1, 1, 1, 1))
    plain = {"google": "layer_0/", "mindspore": "layers.0."}[field]
    general = {"google": r"layer_\d+/", "mindspore": r"layers\.\d+\."}[field]
    names = {re.escape(getattr(w, field)).replace(re.escape(plain), general) for w in one_layer}
    return re.compile("|".join(sorted(names)))
