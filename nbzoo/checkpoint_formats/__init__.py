"""Foreign checkpoint formats read (and, for the rehearsal, written) without their frameworks:
TensorFlow 1's tensor bundle (:mod:`.tf_bundle`), MindSpore's ``.ckpt`` (:mod:`.ms_ckpt`), the
parameter names of Google's BERT and of MindSpore's BERT model zoo (:mod:`.bert_names`), and
stand-in writers of both formats (:mod:`.standins`). :mod:`nbzoo.convert_checkpoint` turns either
into a transformers ``BertForPreTraining`` folder."""

from __future__ import annotations


class FormatError(ValueError):
    """A file that is not what it claims to be, or is damaged; the message names the file (and the
    tensor, where one is concerned)."""
