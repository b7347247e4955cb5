"""Token lengths of BERT pre-training samples, by the sampling of BERT's create_pretraining_data.py.

No token-length histogram of the MLPerf BERT data is part of nbzoo; this module models one. It
follows the algorithm that made the data (google-research/bert, ``create_instances_from_document``,
as MLPerf's reference runs it: ``max_seq_length`` 512, ``short_seq_prob`` 0.1), on documents
whose sentence counts and sentence lengths are nbzoo's assumptions (log-normal, parameters in
``length_histograms.json``), and returns only the lengths. Written here because only the
lengths are needed, not text, a tokenizer or TFRecords.

The algorithm, per document: a sample targets ``max_seq_length - 3`` tokens, or with
probability ``short_seq_prob`` a uniform length in [2, ``max_seq_length - 3``]; sentences are
gathered until the target is reached or the document ends (which cuts samples short); segment
A is a random number of the gathered sentences; half of the time (always when one sentence was
gathered) segment B comes from a random other document, as many sentences from a random start
as reach the rest of the target, and the sentences not used go back to the document; otherwise
B is the rest of the gathered sentences. The pair is trimmed to ``max_seq_length - 3``, and
[CLS] and two [SEP] are added.
"""

from __future__ import annotations

import math
from typing import Any


def _lognormal_ints(rng, spec: dict[str, float], size: int):
    import numpy as np

    mu = math.log(spec["mean"]) - spec["sigma"] ** 2 / 2  # so that the mean is spec["mean"]
    return np.maximum(np.rint(rng.lognormal(mu, spec["sigma"], size=size)), spec["min"]).astype(int)


def _document(rng, model: dict[str, Any]) -> list[int]:
    n = int(_lognormal_ints(rng, model["document_sentences"], 1)[0])
    return [int(x) for x in _lognormal_ints(rng, model["sentence_tokens"], n)]


def _samples_of_document(doc: list[int], model: dict[str, Any], rng) -> list[int]:
    max_num_tokens = model["max_seq_length"] - 3
    target = max_num_tokens
    if rng.random() < model["short_seq_prob"]:
        target = int(rng.integers(2, max_num_tokens + 1))
    lengths: list[int] = []
    chunk: list[int] = []
    i = 0
    while i < len(doc):
        chunk.append(doc[i])
        if i == len(doc) - 1 or sum(chunk) >= target:
            a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
            a = sum(chunk[:a_end])
            if len(chunk) == 1 or rng.random() < 0.5:
                other = _document(rng, model)
                b = 0
                for sentence in other[int(rng.integers(0, len(other))) :]:
                    b += sentence
                    if b >= target - a:
                        break
                i -= len(chunk) - a_end  # the sentences not used go back
            else:
                b = sum(chunk[a_end:])
            lengths.append(min(a + b, max_num_tokens) + 3)
            chunk = []
            target = max_num_tokens
            if rng.random() < model["short_seq_prob"]:
                target = int(rng.integers(2, max_num_tokens + 1))
        i += 1
    return lengths


def sample_lengths(model: dict[str, Any], n: int, rng) -> list[int]:
    """``n`` sample lengths, [CLS] and [SEP] included, in shuffled order (as the data is)."""
    lengths: list[int] = []
    while len(lengths) < n:
        lengths.extend(_samples_of_document(_document(rng, model), model, rng))
    order = rng.permutation(len(lengths))[:n]
    return [lengths[k] for k in order]
