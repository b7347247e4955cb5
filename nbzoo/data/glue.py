"""GLUE SST-2 and STS-B in the seed's layout: ``dataset/SST-2/{train,dev,test}.tsv``,
``dataset/STS-B/{train,dev,test}.tsv``.

The column layouts are GLUE's own: a header row; SST-2 ``sentence\\tlabel`` (test:
``index\\tsentence``); STS-B ``index genre filename year old_index source1 source2 sentence1
sentence2 score`` (test: the same without ``score``). Fields are tab-separated and never quoted
(GLUE sentences contain bare quote characters), so files are read with ``csv.QUOTE_NONE``.

Also here: a generator of learnable sample data in exactly that layout, and the real archives'
download for the ``full`` preset.
"""

from __future__ import annotations

import csv
import io
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from nbzoo import safe_write
from nbzoo.data import sources, utf8
from nbzoo.data.download import download, extract_zip

TASK_DIRS = {"sst2": "SST-2", "stsb": "STS-B"}
SPLITS = ("train", "dev", "test")
COLUMNS = {
    ("sst2", "train"): ["sentence", "label"],
    ("sst2", "dev"): ["sentence", "label"],
    ("sst2", "test"): ["index", "sentence"],
    ("stsb", "train"): [
        "index",
        "genre",
        "filename",
        "year",
        "old_index",
        "source1",
        "source2",
        "sentence1",
        "sentence2",
        "score",
    ],
}
COLUMNS[("stsb", "dev")] = COLUMNS[("stsb", "train")]
COLUMNS[("stsb", "test")] = COLUMNS[("stsb", "train")][:-1]

# The archives GLUE's own download script fetches, with their published checksums.
ARCHIVES = {"sst2": sources.GLUE_SST2, "stsb": sources.GLUE_STSB}


class GlueFormatError(ValueError):
    pass


@dataclass
class GlueSplit:
    """One split of one task: first sentences, second sentences (STS-B) and labels (None for test)."""

    task: str
    text_a: list[str]
    text_b: list[str] | None
    labels: list[float] | None

    def __len__(self) -> int:
        return len(self.text_a)


def task_path(data_dir: str | os.PathLike, task: str, split: str) -> Path:
    if task not in TASK_DIRS:
        raise ValueError(f"task must be one of {', '.join(TASK_DIRS)}; got {task!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    return Path(data_dir) / TASK_DIRS[task] / f"{split}.tsv"


def read_split(data_dir: str | os.PathLike, task: str, split: str) -> GlueSplit:
    """Read one GLUE TSV, checking the header and every row."""
    path = task_path(data_dir, task, split)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file (expected the GLUE layout {TASK_DIRS[task]}/{split}.tsv; "
            f"{sources.glue_howto(TASK_DIRS[task])})"
        )
    expected = COLUMNS[(task, split)]
    text = utf8.read_text(path, GlueFormatError)
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or rows[0] != expected:
        got = "\t".join(rows[0]) if rows else "an empty file"
        raise GlueFormatError(
            f"{path}, line 1: expected the header {chr(9).join(expected)!r}, got {got!r}"
        )
    col = {name: i for i, name in enumerate(expected)}
    text_a, text_b, labels = [], [], []
    for lineno, row in enumerate(rows[1:], start=2):
        if len(row) != len(expected):
            raise GlueFormatError(
                f"{path}, line {lineno}: expected {len(expected)} tab-separated fields, got {len(row)}"
            )
        if task == "sst2":
            text_a.append(row[col["sentence"]])
            if "label" in col:
                value = row[col["label"]]
                if value not in ("0", "1"):
                    raise GlueFormatError(
                        f"{path}, line {lineno}: label must be 0 or 1, got {value!r}"
                    )
                labels.append(int(value))
        else:
            text_a.append(row[col["sentence1"]])
            text_b.append(row[col["sentence2"]])
            if "score" in col:
                try:
                    score = float(row[col["score"]])
                except ValueError:
                    score = -1.0
                if not 0.0 <= score <= 5.0:
                    raise GlueFormatError(
                        f"{path}, line {lineno}: score must be a number in [0, 5], got {row[col['score']]!r}"
                    )
                labels.append(score)
    if not text_a:
        raise GlueFormatError(
            f"{path}: the header and no rows; {split}.tsv needs at least one "
            f"{chr(9).join(expected)!r} row"
        )
    return GlueSplit(
        task, text_a, text_b if task == "stsb" else None, labels if "test" != split else None
    )


GENERATOR = "nbzoo's GLUE sample generator (data_source=generate)"
KEEP_HINT = "pass data_source=local to read it, or name an empty or new folder"


def split_text(split_data: GlueSplit, split: str) -> str:
    """One split as GLUE's exact column layout writes it."""
    task = split_data.task
    path = task_path(".", task, split)
    header = COLUMNS[(task, split)]
    for text in split_data.text_a + (split_data.text_b or []):
        if "\t" in text or "\n" in text:
            raise GlueFormatError(f"{path}: sentences may not contain tabs or newlines: {text!r}")
    rows: list[list[str]] = []
    for i in range(len(split_data)):
        if task == "sst2":
            rows.append(
                [str(i), split_data.text_a[i]]
                if split == "test"
                else [split_data.text_a[i], str(int(split_data.labels[i]))]
            )
        else:
            meta = [str(i), "main-captions", "nbzoo-sample", "2026", f"{i:04d}", "none", "none"]
            row = meta + [split_data.text_a[i], split_data.text_b[i]]
            if split != "test":
                row.append(f"{split_data.labels[i]:.3f}")
            rows.append(row)
    out = io.StringIO(newline="")
    writer = csv.writer(
        out, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n", escapechar=None
    )
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def write_split(data_dir: str | os.PathLike, split_data: GlueSplit, split: str) -> Path:
    """Write one split in GLUE's exact column layout into ``data_dir``, a folder nbzoo creates
    or marked (nbzoo.safe_write: a folder of the user's GLUE data is refused, never written)."""
    rel = task_path(".", split_data.task, split)
    text = split_text(split_data, split)
    root = safe_write.claim(data_dir, GENERATOR, what="data_dir", hint=KEEP_HINT)
    return root.write_text(rel.as_posix(), text)


# --- learnable sample data -------------------------------------------------------------------

_SUBJECTS = [
    "the movie",
    "this film",
    "the plot",
    "the acting",
    "the script",
    "the ending",
    "the soundtrack",
    "the cast",
    "the story",
    "the direction",
    "the dialogue",
    "the camera work",
    "the pacing",
    "this sequel",
]
_POSITIVE = [
    "brilliant",
    "moving",
    "funny",
    "charming",
    "gripping",
    "beautiful",
    "clever",
    "delightful",
    "powerful",
    "wonderful",
    "smart",
    "touching",
    "fresh",
    "superb",
]
_NEGATIVE = [
    "dull",
    "boring",
    "clumsy",
    "tedious",
    "awful",
    "bland",
    "messy",
    "predictable",
    "lifeless",
    "silly",
    "tiresome",
    "weak",
    "painful",
    "forgettable",
]
_INTENSIFIERS = ["", "", "very ", "truly ", "rather ", "quite ", "so ", "really "]
_VERBS = ["is", "was", "feels", "seems", "remains"]
_NEGATIONS = ["not", "never", "hardly"]


def _sst2_sentence(rng: random.Random) -> tuple[str, int]:
    """A clause whose polarity follows its adjective, flipped by a negation; with probability 0.3
    two clauses joined by 'but', where the second clause decides (as in real reviews)."""

    def clause() -> tuple[str, int]:
        positive = rng.random() < 0.5
        adj = rng.choice(_POSITIVE if positive else _NEGATIVE)
        negated = rng.random() < 0.25
        verb = rng.choice(_VERBS)
        neg = f" {rng.choice(_NEGATIONS)}" if negated else ""
        return f"{rng.choice(_SUBJECTS)} {verb}{neg} {rng.choice(_INTENSIFIERS)}{adj}", int(
            positive != negated
        )

    text, label = clause()
    if rng.random() < 0.3:
        second, label = clause()
        text = f"{text} , but {second}"
    return text + " .", label


_NOUNS = [
    "man",
    "woman",
    "dog",
    "cat",
    "child",
    "chef",
    "player",
    "bird",
    "horse",
    "girl",
    "boy",
    "farmer",
    "doctor",
    "pilot",
    "singer",
    "teacher",
]
_SYNONYMS = {
    "man": "guy",
    "woman": "lady",
    "dog": "puppy",
    "cat": "kitten",
    "child": "kid",
    "chef": "cook",
    "boy": "lad",
    "girl": "lass",
    "doctor": "physician",
    "teacher": "tutor",
    "running": "jogging",
    "eating": "consuming",
    "playing": "toying",
    "riding": "driving",
    "big": "large",
    "small": "little",
    "red": "crimson",
    "old": "aged",
}
_ACTIONS = [
    "running",
    "eating",
    "playing",
    "riding",
    "sleeping",
    "singing",
    "cooking",
    "reading",
    "jumping",
    "walking",
]
_ADJS = ["big", "small", "red", "old", "young", "happy", "tall", "black", "white", "quiet"]
_PLACES = [
    "in the park",
    "on the beach",
    "in a kitchen",
    "on a field",
    "in the street",
    "near a river",
    "in a garden",
    "on a stage",
    "at the market",
    "in the snow",
]


def _stsb_pair(rng: random.Random) -> tuple[str, str, float]:
    """A sentence and a variant: synonym swaps keep the meaning, content swaps remove it; the score
    is 5 × the fraction of the four content slots kept, plus rater noise."""
    slots = [rng.choice(_ADJS), rng.choice(_NOUNS), rng.choice(_ACTIONS), rng.choice(_PLACES)]
    first = f"a {slots[0]} {slots[1]} is {slots[2]} {slots[3]} ."
    changed = rng.sample(range(4), k=rng.randint(0, 4))
    pools = [_ADJS, _NOUNS, _ACTIONS, _PLACES]
    other = list(slots)
    for i in range(4):
        if i in changed:
            other[i] = rng.choice(
                [w for w in pools[i] if w != slots[i] and _SYNONYMS.get(slots[i]) != w]
            )
        elif slots[i] in _SYNONYMS and rng.random() < 0.5:
            other[i] = _SYNONYMS[slots[i]]
    second = f"a {other[0]} {other[1]} is {other[2]} {other[3]} ."
    score = 5.0 * (4 - len(changed)) / 4 + rng.gauss(0.0, 0.35)
    return first, second, round(min(5.0, max(0.0, score)), 3)


def generate_split(
    task: str, n: int, seed: int, split: str = "train", label_noise: float = 0.05
) -> GlueSplit:
    """Sample data with learnable structure; SST-2 labels are flipped with probability
    ``label_noise`` so the task is not trivially separable."""
    rng = random.Random(f"{task}-{split}-{seed}")
    if task == "sst2":
        texts, labels = [], []
        for _ in range(n):
            text, label = _sst2_sentence(rng)
            if rng.random() < label_noise:
                label = 1 - label
            texts.append(text)
            labels.append(label)
        return GlueSplit("sst2", texts, None, labels if split != "test" else None)
    if task == "stsb":
        a, b, scores = zip(*(_stsb_pair(rng) for _ in range(n)), strict=True)
        return GlueSplit("stsb", list(a), list(b), list(scores) if split != "test" else None)
    raise ValueError(f"task must be one of {', '.join(TASK_DIRS)}; got {task!r}")


def sample_files(task: str, sizes: dict[str, int], seed: int = 0) -> dict[str, bytes]:
    """What :func:`write_sample_dataset` writes: ``<TASK>/<split>.tsv`` → its bytes."""
    return {
        task_path(".", task, split).as_posix(): split_text(
            generate_split(task, n, seed, split), split
        ).encode("utf-8")
        for split, n in sizes.items()
    }


def generated_alike(sizes: dict[str, int], seed: int = 0) -> Callable[[Path], bool]:
    """The test that an unmarked folder holds only sample data these sizes and seed generate,
    byte for byte (for either task): a folder an nbzoo without markers wrote, adopted."""

    def alike(folder: Path) -> bool:
        every_task = {k: v for t in TASK_DIRS for k, v in sample_files(t, sizes, seed).items()}
        return safe_write.holds_only(folder, every_task)

    return alike


def write_sample_dataset(
    data_dir: str | os.PathLike, task: str, sizes: dict[str, int], seed: int = 0
) -> Path:
    """Generate and write ``<data_dir>/<TASK>/{train,dev,test}.tsv``; returns the task folder.

    ``data_dir`` must be nbzoo's (nbzoo.safe_write): new, empty or marked. A folder that an nbzoo
    without markers filled with this very data (every file byte-identical to what these sizes
    and seed generate, for either task) is adopted; a folder with anything else is refused with
    one line, before anything is written."""
    files = sample_files(task, sizes, seed)
    root = safe_write.claim(
        data_dir, GENERATOR, what="data_dir", hint=KEEP_HINT, adopt=generated_alike(sizes, seed)
    )
    for rel, data in files.items():
        root.write_bytes(rel, data)
    return Path(data_dir) / TASK_DIRS[task]


def download_task(data_dir: str | os.PathLike, task: str) -> Path:
    """Fetch (checking the published sha256) and unpack a GLUE task archive into ``data_dir``
    unless its files are there. A ``data_dir`` holding the task's three files is only read; else
    it must be nbzoo's (nbzoo.safe_write: new, empty or marked) -- a folder of the user's with
    other files in it is refused before anything is fetched."""
    folder = Path(data_dir) / TASK_DIRS[task]
    if all((folder / f"{s}.tsv").exists() for s in SPLITS):
        return folder
    root = safe_write.claim(
        data_dir,
        "nbzoo's GLUE download (data_source=download)",
        what="data_dir",
        hint="pass data_source=local to read what is there, or name an empty or new folder",
    )
    remote = ARCHIVES[task]
    archive = download(
        remote.url,
        root.path(f"{TASK_DIRS[task]}.zip"),
        sha256=remote.sha256,
        size=remote.size,
        owner=root,
    )
    extract_zip(archive, data_dir, owner=root)
    return folder


# --- tokenized datasets ----------------------------------------------------------------------


class EncodedGlue(torch.utils.data.Dataset):
    """A split tokenized once, padded to ``max_length``; items are dicts of tensors ready for
    ``AutoModelForSequenceClassification`` (labels: long for SST-2, float for STS-B)."""

    def __init__(self, split: GlueSplit, tokenizer, max_length: int):
        enc = tokenizer(
            split.text_a,
            split.text_b,
            max_length=max_length,
            padding="max_length",
            truncation=True,
            return_token_type_ids=True,
            return_tensors="pt",
        )
        self.features = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        self.labels = None
        if split.labels is not None:
            dtype = torch.long if split.task == "sst2" else torch.float32
            self.labels = torch.tensor(split.labels, dtype=dtype)

    def __len__(self) -> int:
        return len(self.features["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {k: v[i] for k, v in self.features.items()}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item
