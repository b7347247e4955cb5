"""The Reformer / Longformer seeds' language-modelling layout, and the masking collators.

Layout (``seeds/000_reformer.md``, ``seeds/001_longformer.md``)::

    corpus/train_corpus.txt    UTF-8 text, one document per line
    corpus/test_corpus.txt
    lf_token/vocab.json        byte-level BPE (GPT-2 / RoBERTa format): token -> id
    lf_token/merges.txt        "#version: 0.2" then one merge "a b" per line, by rank
    lf_token/config.json       the config AutoTokenizer reads to pick the tokenizer class

Here: a reader and writer of the corpus files, byte-level BPE training with the ``tokenizers``
library into ``lf_token/`` (or loading one), tokenising and grouping text into fixed-length blocks
(as ``run_mlm.py``'s ``group_texts`` does), a generator of learnable sample documents (a small
grammar), and two masking collators: token-level MLM (15%, 80/10/10, transformers'
``DataCollatorForLanguageModeling`` as is) and whole n-gram masking (spans of 1-3 tokens).
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForLanguageModeling

from nbzoo import safe_write
from nbzoo.data import sources, unknown_tokens, utf8

SPLITS = ("train", "test")
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids 0..4
TOKENIZER_FILES = ("vocab.json", "merges.txt", "config.json")


class CorpusFormatError(ValueError):
    """A corpus or tokenizer file that does not match the layout."""


@dataclass(frozen=True)
class CorpusLayout:
    """Paths of the seed layout under one root folder."""

    root: Path

    @property
    def corpus_dir(self) -> Path:
        return self.root / "corpus"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "lf_token"

    def split_path(self, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        return self.corpus_dir / f"{split}_corpus.txt"

    def has_tokenizer(self) -> bool:
        return all((self.tokenizer_dir / name).exists() for name in TOKENIZER_FILES)


def layout(root: str | os.PathLike) -> CorpusLayout:
    return CorpusLayout(Path(root))


# ----------------------------------------------------------------------------- corpus files


def read_corpus(root: str | os.PathLike, split: str) -> list[str]:
    """The documents of one split: one per non-blank line, trailing whitespace removed."""
    path = layout(root).split_path(split)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file (expected the layout corpus/{split}_corpus.txt under {root}; "
            f"{sources.CORPUS_HOWTO})"
        )
    docs = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CorpusFormatError(
                    f"{path}, line {lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})"
                ) from None
            line = line.rstrip()
            if line:
                docs.append(line)
    if not docs:
        raise CorpusFormatError(f"{path}: no text (every line is blank)")
    return docs


GENERATOR = "nbzoo's sample corpus generator (data_source=generate)"
KEEP_HINT = "pass data_source=local to read it, or name an empty or new folder"


def corpus_text(docs: Iterable[str]) -> str:
    """One split's file: one document per line (newlines inside a document are refused)."""
    lines = []
    for i, doc in enumerate(docs):
        if "\n" in doc or "\r" in doc:
            raise ValueError(f"document {i} contains a line break; the layout is one per line")
        lines.append(doc)
    return "".join(line + "\n" for line in lines)


def write_corpus(root: str | os.PathLike, split: str, docs: Iterable[str]) -> Path:
    """Write one split into ``root``, a folder nbzoo creates or marked (nbzoo.safe_write: a
    folder of the user's corpus is refused, never written)."""
    rel = layout(".").split_path(split).as_posix()
    text = corpus_text(docs)
    return safe_write.claim(root, GENERATOR, what="data_dir", hint=KEEP_HINT).write_text(rel, text)


# ----------------------------------------------------------------------------- sample corpus
# A small generated grammar: short stories about one person each. Local structure (determiners,
# number agreement, counting, fixed phrases) is learnable in seconds; document-level structure
# (the hero's name and pronoun, their trade and its product, their home, the season and its
# colour, their animal) recurs sentences apart, so attention beyond a small window pays off.

_NAMES = {
    "anna": "she",
    "maria": "she",
    "lena": "she",
    "sofia": "she",
    "clara": "she",
    "ida": "she",
    "tom": "he",
    "paul": "he",
    "felix": "he",
    "max": "he",
    "leo": "he",
    "otto": "he",
}
_TRADES = {
    "baker": "bread",
    "smith": "nails",
    "miller": "flour",
    "fisher": "fish",
    "weaver": "cloth",
    "potter": "bowls",
    "farmer": "milk",
    "carpenter": "chairs",
}
_PLACES = ["village", "harbour", "forest", "mill", "castle", "valley", "river", "market"]
_ANIMALS = {
    "dog": ["loyal", "brown", "noisy"],
    "cat": ["grey", "lazy", "clever"],
    "horse": ["strong", "white", "fast"],
    "goat": ["stubborn", "small", "black"],
    "owl": ["wise", "quiet", "old"],
}
_SEASONS = {"winter": "white", "spring": "green", "summer": "golden", "autumn": "red"}
_FRUITS = ["apple", "pear", "plum", "lemon", "melon"]
_NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _story(rng: random.Random) -> str:
    name = rng.choice(sorted(_NAMES))
    pron = _NAMES[name]
    friend = rng.choice(sorted(n for n in _NAMES if n != name))
    trade = rng.choice(sorted(_TRADES))
    product = _TRADES[trade]
    home, other = rng.sample(_PLACES, 2)
    season = rng.choice(sorted(_SEASONS))
    animal = rng.choice(sorted(_ANIMALS))
    adjective = rng.choice(_ANIMALS[animal])

    def fruits() -> str:
        k = rng.randrange(1, 6)
        fruit = rng.choice(_FRUITS)
        return f"{_NUMBERS[k - 1]} {fruit}" + ("s" if k > 1 else "")

    def counting() -> str:
        start = rng.randrange(0, 4)
        stop = rng.randrange(start + 3, 10)
        return " , ".join(_NUMBERS[start:stop])

    middle = [
        f"every day {pron} made {product} for the people of the {home} .",
        f"{name} had a {adjective} {animal} .",
        f"the {animal} followed {name} to the {other} .",
        f"one {season} morning {name} met {friend} at the {other} .",
        f"{friend} gave {name} {fruits()} and {pron} said thank you .",
        f"it was {season} , and the trees were {_SEASONS[season]} .",
        f"{name} counted the days : {counting()} .",
        f"{pron} sold {product} at the {other} and bought {fruits()} .",
        f"people said that the {animal} of {name} was {adjective} .",
    ]
    rng.shuffle(middle)
    sentences = [f"{name} was a {trade} who lived in the {home} ."]
    sentences += middle[: rng.randrange(4, len(middle) + 1)]
    sentences.append(f"in the evening {pron} went back to the {home} with the {animal} .")
    return " ".join(sentences)


def generate_documents(n: int, seed: int = 0) -> list[str]:
    """``n`` generated stories, one per line; the same ``seed`` gives the same text."""
    rng = random.Random(seed)
    return [_story(rng) for _ in range(n)]


def write_sample_corpus(
    root: str | os.PathLike,
    sizes: dict[str, int],
    seed: int = 0,
    adopt: Callable[[Path], bool] | None = None,
) -> CorpusLayout:
    """Write ``corpus/{train,test}_corpus.txt`` with generated documents (test gets its own seed)
    into ``root``, a folder nbzoo creates or marked (nbzoo.safe_write); ``adopt`` may accept an
    unmarked one (a folder an nbzoo without markers wrote)."""
    files = {
        layout(".").split_path(split).as_posix(): corpus_text(
            generate_documents(int(sizes[split]), seed=seed * 1000 + i)
        )
        for i, split in enumerate(SPLITS)
        if split in sizes
    }
    owned = safe_write.claim(root, GENERATOR, what="data_dir", hint=KEEP_HINT, adopt=adopt)
    for rel, text in files.items():
        owned.write_text(rel, text)
    return layout(root)


# ----------------------------------------------------------------------------- tokenizer


def check_tokenizer_dir(path: str | os.PathLike) -> dict[str, int]:
    """Validate an ``lf_token/`` folder; return its vocabulary. Errors name the file and line."""
    path = Path(path)
    for name in TOKENIZER_FILES:
        if not (path / name).exists():
            raise FileNotFoundError(
                f"{path / name}: no such file (a tokenizer folder holds {', '.join(TOKENIZER_FILES)})"
            )
    vocab = utf8.read_json(path / "vocab.json", CorpusFormatError)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise CorpusFormatError(f"{path / 'vocab.json'}: expected an object of token -> integer id")
    merges = utf8.read_text(path / "merges.txt", CorpusFormatError)
    # read as text mode reads it (universal newlines), line by line
    for lineno, line in enumerate(io.StringIO(merges, newline=None), start=1):
        line = line.rstrip("\n")
        if lineno == 1 and line.startswith("#version"):
            continue
        if not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise CorpusFormatError(
                f"{path / 'merges.txt'}, line {lineno}: expected two tokens separated by one "
                f"space, got {line!r}"
            )
        if parts[0] + parts[1] not in vocab:
            raise CorpusFormatError(
                f"{path / 'merges.txt'}, line {lineno}: the merge {line!r} makes "
                f"{parts[0] + parts[1]!r}, which vocab.json does not contain"
            )
    config = utf8.read_json(path / "config.json", CorpusFormatError)
    if not isinstance(config, dict) or "model_type" not in config:
        raise CorpusFormatError(
            f"{path / 'config.json'}: no 'model_type' field (AutoTokenizer needs it, e.g. \"roberta\")"
        )
    return vocab


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 1000,
    min_frequency: int = 2,
    model_type: str = "roberta",
):
    """Train a byte-level BPE tokenizer (GPT-2 / RoBERTa style) and write ``vocab.json``,
    ``merges.txt`` and ``config.json`` into ``out_dir`` (atomically); return it loaded."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    ids = {tok: bpe.token_to_id(tok) for tok in SPECIAL_TOKENS}
    config = {
        "model_type": model_type,
        "vocab_size": bpe.get_vocab_size(),
        "bos_token_id": ids["<s>"],
        "pad_token_id": ids["<pad>"],
        "eos_token_id": ids["</s>"],
    }
    with safe_write.new_folder(out_dir, TOKENIZER_WRITER, hint=TOKENIZER_HINT) as tmp:
        bpe.save_model(str(tmp))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return load_tokenizer(out_dir)


TOKENIZER_WRITER = "nbzoo's BPE tokenizer training"
TOKENIZER_HINT = (
    "the full presets read the seed's own lf_token/ (data_source=local); name an empty or new "
    "data_dir to generate the demo's"
)


def load_tokenizer(path: str | os.PathLike):
    """Load an ``lf_token/`` folder with ``AutoTokenizer`` (as the seeds' ``--tokenizer_name``)."""
    from transformers import AutoTokenizer

    check_tokenizer_dir(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.mask_token is None or tok.pad_token is None:
        raise CorpusFormatError(f"{path}: the tokenizer has no <mask> or <pad> token")
    return tok


def prepare_tokenizer(
    root: str | os.PathLike, vocab_size: int = 1000, min_frequency: int = 2, retrain: bool = False
):
    """Load ``lf_token/`` under ``root``, training it on the train split first when it is missing
    (or when ``retrain``). For generated text only: the seeds supply their ``lf_token/``, and
    :func:`prepare_data` never trains one in its place."""
    lay = layout(root)
    if retrain or not lay.has_tokenizer():
        return train_tokenizer(
            read_corpus(root, "train"), lay.tokenizer_dir, vocab_size, min_frequency
        )
    return load_tokenizer(lay.tokenizer_dir)


DATA_SOURCES = ("generate", "local")


def prepare_data(
    root: str | os.PathLike,
    data_source: str,
    sample_sizes: dict[str, int] | None = None,
    seed: int = 0,
    vocab_size: int = 1000,
):
    """The tokenizer and the documents of each split, from the seed's layout under ``root``.

    ``generate``: write sample documents and learn a byte-level BPE on them (every run: it is
    deterministic and takes under a second). ``local``: the seed's own ``corpus/`` and
    ``lf_token/`` as they are; a missing ``lf_token/`` stops here, since the seed supplies its
    vocabulary and a vocabulary trained in its place would be nbzoo's invention.
    """
    if data_source not in DATA_SOURCES:
        raise ValueError(
            f"data_source must be one of {', '.join(DATA_SOURCES)}; got {data_source!r}"
        )
    lay = layout(root)
    if data_source == "generate":
        sizes = dict(sample_sizes or {})

        def generate(folder: Path) -> CorpusLayout:
            made = write_sample_corpus(folder, sizes, seed=seed)
            train_tokenizer(read_corpus(folder, "train"), made.tokenizer_dir, vocab_size)
            return made

        # the data_dir and its lf_token/ are asked before anything is written; an unmarked
        # data_dir holding exactly this corpus and tokenizer (nbzoo without markers) is adopted
        safe_write.claim(
            root,
            GENERATOR,
            what="data_dir",
            hint=KEEP_HINT,
            adopt=lambda folder: safe_write.built_alike(folder, generate),
        )
        safe_write.check_replaceable(lay.tokenizer_dir, TOKENIZER_WRITER, hint=KEEP_HINT)
        write_sample_corpus(root, sizes, seed=seed)
        tokenizer = prepare_tokenizer(root, vocab_size=vocab_size, retrain=True)
    else:
        if not lay.has_tokenizer():
            missing = [n for n in TOKENIZER_FILES if not (lay.tokenizer_dir / n).exists()]
            raise FileNotFoundError(
                f"{lay.tokenizer_dir}: {', '.join(missing)} missing. The full presets use the "
                f"seed's own vocabulary and do not train one in its place; {sources.CORPUS_HOWTO}"
            )
        tokenizer = load_tokenizer(lay.tokenizer_dir)
    docs = {split: read_corpus(root, split) for split in SPLITS}
    if data_source == "local":  # a generated corpus has the tokenizer learnt on it
        unknown_tokens.tokenizer_rate(
            tokenizer, docs["train"], lay.tokenizer_dir, lay.split_path("train")
        )
    return tokenizer, docs


# ----------------------------------------------------------------------------- blocks


def group_blocks(
    docs: Sequence[str], tokenizer, block_size: int, max_blocks: int | None = None
) -> torch.Tensor:
    """Tokenise every document with its special tokens (``<s> ... </s>``), concatenate them and
    cut the stream into ``block_size`` tokens per row, dropping the remainder (``group_texts`` of
    transformers' ``run_mlm.py``). Returns a ``(n_blocks, block_size)`` LongTensor."""
    encoded = tokenizer(list(docs), add_special_tokens=True)["input_ids"]
    stream = [t for ids in encoded for t in ids]
    n = len(stream) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise CorpusFormatError(
            f"{len(stream)} tokens make no block of {block_size}; give more text or a smaller block"
        )
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


class BlockDataset(torch.utils.data.Dataset):
    """Fixed-length token blocks as ``{"input_ids", "special_tokens_mask"}`` examples."""

    def __init__(self, blocks: torch.Tensor, special_ids: Iterable[int]):
        self.blocks = blocks
        self.special = torch.isin(blocks, torch.tensor(sorted(set(special_ids))))

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "special_tokens_mask": self.special[i].long()}


def block_dataset(docs: Sequence[str], tokenizer, block_size: int, **kw) -> BlockDataset:
    return BlockDataset(group_blocks(docs, tokenizer, block_size, **kw), tokenizer.all_special_ids)


# ----------------------------------------------------------------------------- masking


def mlm_collator(
    tokenizer, mlm_probability: float = 0.15, seed: int | None = None
) -> DataCollatorForLanguageModeling:
    """Token-level masking as in BERT: 15% of the tokens, of which 80% become ``<mask>``, 10% a
    random token and 10% stay. transformers' collator as is."""
    return DataCollatorForLanguageModeling(
        tokenizer, mlm=True, mlm_probability=mlm_probability, seed=seed
    )


@dataclass
class NgramMaskCollator(DataCollatorForLanguageModeling):
    """Whole n-gram masking: spans of 1..``max_ngram`` tokens (length n drawn with weight 1/n, as
    in ALBERT's n-gram masking) are chosen in random order, without overlap and never over
    special tokens, until ``mlm_probability`` of the maskable tokens are covered. Each span is
    then replaced as a unit: by ``<mask>`` tokens (80%), by random tokens (10%) or left (10%)."""

    max_ngram: int = 3

    def torch_mask_tokens(
        self, inputs: Any, special_tokens_mask: Any | None = None, offset_mapping: Any = None
    ) -> tuple[Any, Any]:
        labels = inputs.clone()
        if special_tokens_mask is None:
            special = torch.tensor(
                [
                    self.tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True)
                    for row in labels.tolist()
                ],
                dtype=torch.bool,
            )
        else:
            special = torch.as_tensor(special_tokens_mask).bool()
        g = self.generator
        weights = torch.tensor([1.0 / n for n in range(1, self.max_ngram + 1)])
        keep = max(0.0, 1.0 - self.mask_replace_prob - self.random_replace_prob)
        actions = torch.tensor([self.mask_replace_prob, self.random_replace_prob, keep])
        masked = torch.zeros_like(labels, dtype=torch.bool)
        action = torch.zeros_like(labels)  # 0 mask, 1 random, 2 keep
        for b in range(labels.shape[0]):
            allowed = (~special[b]).nonzero().flatten().tolist()
            budget = round(len(allowed) * self.mlm_probability)
            if budget == 0:
                continue
            allowed_set = set(allowed)
            covered: set[int] = set()
            order = torch.randperm(len(allowed), generator=g).tolist()
            lengths = torch.multinomial(weights, len(allowed), replacement=True, generator=g)
            choice = torch.multinomial(actions, len(allowed), replacement=True, generator=g)
            for k, j in enumerate(order):
                if len(covered) >= budget:
                    break
                start = allowed[j]
                n = min(int(lengths[k]) + 1, budget - len(covered))
                span = list(range(start, start + n))
                if any(p not in allowed_set or p in covered for p in span):
                    continue
                covered.update(span)
                masked[b, span] = True
                action[b, span] = choice[k]
        labels[~masked] = -100
        inputs = inputs.clone()
        inputs[masked & (action == 0)] = self.tokenizer.mask_token_id
        rand = masked & (action == 1)
        inputs[rand] = torch.randint(
            len(self.tokenizer), labels.shape, dtype=torch.long, generator=g
        )[rand]
        return inputs, labels


def ngram_collator(
    tokenizer, mlm_probability: float = 0.15, max_ngram: int = 3, seed: int | None = None
) -> NgramMaskCollator:
    return NgramMaskCollator(
        tokenizer, mlm=True, mlm_probability=mlm_probability, seed=seed, max_ngram=max_ngram
    )


def masked_batches(
    dataset: Sequence[dict[str, torch.Tensor]], collator, batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Mask an evaluation set once (a seeded collator), so every metric of a run - and of every
    run - scores the same masked positions."""
    return [
        collator([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
        for i in range(0, len(dataset), batch_size)
    ]
