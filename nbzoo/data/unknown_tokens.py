"""How much of a text a vocabulary cannot spell: the check that a tokenizer or ``dict.txt`` belongs
to the data before hours of training on ``<unk>``.

A vocabulary made for the text leaves next to nothing unknown: the seeds' byte-level BPE
(``lf_token/``) and fairseq's GPT-2 BPE with its ``dict.txt`` can spell every byte, 0 % by
construction; a WordPiece vocabulary of the text's language leaves well under 1 %. So:

- above :data:`WARN_ABOVE` (5 %) a line on stdout: the vocabulary is probably not the text's;
- above :data:`REFUSE_ABOVE` (50 %) the run stops: most of the text would reach the model as one
  symbol, so it could not learn the text, and a masked-LM accuracy would be mostly ``<unk>``
  predicted as ``<unk>``.

The rate is measured on the first :data:`SAMPLE_LINES` lines: enough tokens (thousands) that a rate
near either bar is not noise, few enough to cost well under a second.
"""

from __future__ import annotations

import os

WARN_ABOVE = 0.05
REFUSE_ABOVE = 0.5
SAMPLE_LINES = 200


class UnknownTokens(ValueError):
    """Most of the data is outside the vocabulary: the vocabulary belongs to other text."""


def check_rate(
    unknown: int, total: int, vocabulary: str | os.PathLike, data: str | os.PathLike, unk: str
) -> float:
    """The share of ``unk`` tokens; raise :class:`UnknownTokens` above :data:`REFUSE_ABOVE`,
    print a warning above :data:`WARN_ABOVE`. The messages name both files and the rate."""
    rate = unknown / total if total else 0.0
    said = (
        f"{100 * rate:.1f}% of the tokens of {data} ({unknown} of {total}) are {unk} with the "
        f"vocabulary {vocabulary}"
    )
    if rate > REFUSE_ABOVE:
        raise UnknownTokens(
            f"{said}: the vocabulary does not belong to this text (more than "
            f"{100 * REFUSE_ABOVE:.0f}% unknown); use the vocabulary the data was made with"
        )
    if rate > WARN_ABOVE:
        print(
            f"warning: {said} (more than {100 * WARN_ABOVE:.0f}%): is it the data's own "
            "vocabulary?",
            flush=True,
        )
    return rate


def tokenizer_rate(tokenizer, lines: list[str], vocabulary, data) -> float:
    """:func:`check_rate` of a transformers tokenizer on the first :data:`SAMPLE_LINES` lines
    (special tokens not counted)."""
    sample = [line for line in lines[:SAMPLE_LINES] if line.strip()]
    if not sample or tokenizer.unk_token_id is None:
        return 0.0
    encoded = tokenizer(sample, add_special_tokens=False)["input_ids"]
    total = sum(len(ids) for ids in encoded)
    unknown = sum(ids.count(tokenizer.unk_token_id) for ids in encoded)
    return check_rate(unknown, total, vocabulary, data, str(tokenizer.unk_token))
