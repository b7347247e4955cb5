"""The GPT-2 byte-level BPE that fairseq's RoBERTa preprocessing applies, on the `tokenizers` library.

fairseq encodes text in two steps (``examples/roberta/multiprocessing_bpe_encoder.py``, then
``fairseq-preprocess --srcdict dict.txt``):

1. ``encoder.json`` + ``vocab.bpe`` (GPT-2's byte-level BPE) turn a stripped line into BPE ids,
   written as a line of decimal numbers;
2. ``dict.txt`` maps each of those numbers, as a *symbol*, to a fairseq id (``<s> <pad> </s> <unk>``
   are 0-3), and ``</s>`` is appended.

Step 1 here is a ``tokenizers`` BPE model with GPT-2's byte-level pre-tokenizer (the same regex and
byte-to-unicode table as fairseq's ``gpt2_bpe_utils``); we do not carry our own BPE. For the demo,
:func:`train_bpe` learns a small byte-level BPE with ``tokenizers`` and writes the three files in
fairseq's layout, so the demo data goes through exactly the path the real files take.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nbzoo import safe_write
from nbzoo.data import sources, utf8
from nbzoo.data.download import DownloadError, download, format_problem
from nbzoo.data.fairseq import Dictionary, FairseqFormatError, write_bytes_atomic

# What examples/roberta/preprocess_GLUE_tasks.sh fetches (no checksum published: sources.py).
GPT2_BPE_FILES = {
    "encoder.json": sources.GPT2_ENCODER_JSON,
    "vocab.bpe": sources.GPT2_VOCAB_BPE,
    "dict.txt": sources.GPT2_DICT_TXT,
}
FILES = tuple(GPT2_BPE_FILES)
MERGES_HEADER = "#version: 0.2"
END_OF_TEXT = "<|endoftext|>"


def _read_encoder(path: Path) -> dict[str, int]:
    vocab = utf8.read_json(path, FairseqFormatError)
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()
    ):
        raise FairseqFormatError(f"{path}: expected a JSON object mapping tokens to integer ids")
    return vocab


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """fairseq's reading of vocab.bpe: drop the first line (the version header) and the text after
    the last newline, and split every other line into a pair."""
    lines = utf8.read_text(path, FairseqFormatError).split("\n")[1:-1]
    merges = []
    for lineno, line in enumerate(lines, start=2):
        pair = line.split()
        if len(pair) != 2:
            raise FairseqFormatError(f"{path}, line {lineno}: expected a merge 'a b', got {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


class GPT2BPE:
    """encoder.json + vocab.bpe → BPE ids (``encode``) and back (``decode``)."""

    def __init__(self, encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike):
        self.encoder_json, self.vocab_bpe = Path(encoder_json), Path(vocab_bpe)
        for path in (self.encoder_json, self.vocab_bpe):
            if not path.exists():
                raise FileNotFoundError(
                    f"{path}: no such file (GPT-2 BPE needs {', '.join(FILES[:2])})"
                )
        vocab = _read_encoder(self.encoder_json)
        merges = _read_merges(self.vocab_bpe)
        try:
            model = models.BPE(vocab=vocab, merges=merges)
        except Exception as exc:  # tokenizers raises when a merge names a token not in the vocab
            raise FairseqFormatError(
                f"{self.vocab_bpe}: merges do not fit {self.encoder_json.name} ({exc})"
            ) from None
        self.tokenizer = Tokenizer(model)
        self.tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(
            add_prefix_space=False, use_regex=True
        )
        self.tokenizer.decoder = decoders.ByteLevel()
        self.vocab_size = len(vocab)

    @classmethod
    def from_dir(cls, folder: str | os.PathLike) -> GPT2BPE:
        folder = Path(folder)
        return cls(folder / "encoder.json", folder / "vocab.bpe")

    def encode(self, text: str) -> list[int]:
        """BPE ids of one line, stripped first as multiprocessing_bpe_encoder.py does."""
        return self.tokenizer.encode(text.strip(), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encodings = self.tokenizer.encode_batch(
            [t.strip() for t in texts], add_special_tokens=False
        )
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


@dataclass
class RobertaEncoder:
    """Text → fairseq ids of a RoBERTa dictionary: GPT-2 BPE, then dict.txt (unknown → ``<unk>``)."""

    bpe: GPT2BPE
    dictionary: Dictionary

    def __post_init__(self):
        # BPE id → dictionary id, as one lookup table (dict.txt's symbols are BPE ids as text).
        table = np.full(self.bpe.vocab_size, self.dictionary.unk(), dtype=np.int64)
        for bpe_id in range(self.bpe.vocab_size):
            table[bpe_id] = self.dictionary.index(str(bpe_id))
        self._table = table

    @classmethod
    def from_dir(cls, folder: str | os.PathLike) -> RobertaEncoder:
        """A folder holding encoder.json, vocab.bpe and dict.txt."""
        return cls(GPT2BPE.from_dir(folder), Dictionary.load(Path(folder) / "dict.txt"))

    def to_dictionary_ids(self, bpe_ids: list[int], append_eos: bool = True) -> np.ndarray:
        ids = self._table[np.asarray(bpe_ids, dtype=np.int64)]
        if append_eos:
            ids = np.append(ids, self.dictionary.eos())
        return ids

    def encode(self, text: str, add_bos: bool = False) -> np.ndarray:
        """What fairseq-preprocess stores for ``text`` (ids + ``</s>``); ``add_bos`` prepends
        ``<s>`` as the sentence_prediction task does when it loads the data."""
        ids = self.to_dictionary_ids(self.bpe.encode(text))
        return np.insert(ids, 0, self.dictionary.bos()) if add_bos else ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.to_dictionary_ids(b) for b in self.bpe.encode_batch(texts)]

    def decode(self, ids) -> str:
        """Dictionary ids back to text (specials dropped; ``<unk>`` cannot be decoded and is kept)."""
        d = self.dictionary
        parts, bpe_ids = [], []
        for i in (int(x) for x in ids):
            if i in (d.bos(), d.eos(), d.pad()):
                continue
            symbol = d[i]
            if symbol.isdigit():
                bpe_ids.append(int(symbol))
            else:
                parts.append(self.bpe.decode(bpe_ids) + symbol)
                bpe_ids = []
        return "".join(parts) + self.bpe.decode(bpe_ids)


def train_bpe(
    texts: Iterable[str],
    folder: str | os.PathLike,
    vocab_size: int = 512,
    min_frequency: int = 2,
    adopt: Callable[[Path], bool] | None = None,
) -> Path:
    """Learn a byte-level BPE on ``texts`` and write encoder.json, vocab.bpe and dict.txt in
    fairseq's layout; dict.txt is built from the BPE-encoded texts the way fairseq-preprocess
    builds one (counts, sorted by frequency, padded to a multiple of 8).

    The folder is made whole (nbzoo.safe_write.new_folder): it must be new, empty or nbzoo's;
    ``adopt`` may accept an unmarked one (a folder an nbzoo without markers wrote)."""
    texts = [t.strip() for t in texts]
    with safe_write.new_folder(
        folder, BPE_WRITER, what="bpe_dir", hint=BPE_HINT, adopt=adopt
    ) as tmp:
        write_bpe_files(texts, tmp, vocab_size, min_frequency)
    return Path(folder)


BPE_WRITER = "nbzoo's BPE learner (data_source=generate)"
BPE_HINT = "name an empty or new folder for the generated BPE files, or move this one away"


def write_bpe_files(
    texts: list[str], folder: Path, vocab_size: int = 512, min_frequency: int = 2
) -> None:
    """:func:`train_bpe`'s three files, written into ``folder`` as it is (a temporary folder of
    its caller's)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    state = json.loads(tok.to_str())  # {"model": {"vocab": {...}, "merges": [[a, b], ...]}, ...}
    vocab = dict(sorted(state["model"]["vocab"].items(), key=lambda kv: kv[1]))
    vocab[END_OF_TEXT] = len(vocab)  # GPT-2's encoder.json ends with it too
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    write_bytes_atomic(folder / "encoder.json", json.dumps(vocab).encode("utf-8"))
    # fairseq drops the first line of vocab.bpe and whatever follows the last newline.
    write_bytes_atomic(
        folder / "vocab.bpe", ("\n".join([MERGES_HEADER, *merges]) + "\n").encode("utf-8")
    )
    bpe = GPT2BPE(folder / "encoder.json", folder / "vocab.bpe")
    lines = (" ".join(map(str, ids)) for ids in bpe.encode_batch(texts))
    Dictionary.build(lines).save(folder / "dict.txt")


def download_gpt2_bpe(folder: str | os.PathLike) -> Path:
    """fairseq's public encoder.json, vocab.bpe and dict.txt (as preprocess_GLUE_tasks.sh gets
    them). Files already there are used as they are (the offline route: placed by hand); the
    missing ones are fetched into a folder that is nbzoo's (nbzoo.safe_write)."""
    folder = Path(folder)
    if all((folder / name).is_file() for name in GPT2_BPE_FILES):
        for name, remote in GPT2_BPE_FILES.items():
            if problem := format_problem(folder / name):
                raise DownloadError(
                    f"{folder / name} {problem}: put the file of {remote.url} there"
                )
        return folder
    root = safe_write.claim(
        folder,
        "nbzoo's GPT-2 BPE download (data_source=download)",
        what="bpe_dir",
        hint="place encoder.json, vocab.bpe and dict.txt there yourself, or name an empty or new "
        "folder",
    )
    for name, remote in GPT2_BPE_FILES.items():
        download(remote.url, root.path(name), sha256=remote.sha256, size=remote.size, owner=root)
    return folder
