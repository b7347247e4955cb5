"""GLUE SST-2 in fairseq's binarized layout: the binarizer and the sentence-prediction dataset.

``binarize_sst2`` does what ``examples/roberta/preprocess_GLUE_tasks.sh <glue> SST-2`` does: take
the sentence column of ``SST-2/{train,dev,test}.tsv`` (header dropped), encode it with GPT-2 BPE
and ``dict.txt`` into ``input0/{train,valid,test}.{bin,idx}``, and binarize the label column with a
label dictionary built from the training labels into ``label/{train,valid}.{bin,idx}``. Each
folder gets its ``dict.txt`` and a ``preprocess.log``, as in the seed's tree.

``SentencePredictionDataset`` reads such a folder the way fairseq's ``sentence_prediction`` task
does: ``<s>`` (init_token 0) before each sentence, and targets = label id - ``nspecial`` with
``</s>`` stripped, so class *k* is the k-th symbol of ``label/dict.txt``.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from nbzoo import safe_write
from nbzoo.data import glue, sources, unknown_tokens
from nbzoo.data.fairseq import (
    Dictionary,
    FairseqFormatError,
    MMapIndexedDataset,
    best_fitting_int_dtype,
    write_bytes_atomic,
    write_dataset,
)
from nbzoo.data.gpt2_bpe import RobertaEncoder

# GLUE split name → fairseq-preprocess output prefix (--trainpref / --validpref / --testpref).
FAIRSEQ_SPLITS = {"train": "train", "dev": "valid", "test": "test"}
# fairseq writes label/; the seed's tree (seeds/004_roberta.md) spells the folder lable/.
LABEL_FOLDERS = ("label", "lable")


BINARIZER = "nbzoo's SST-2 binarizer"
BINARIZED_HINT = (
    "pass data_source=binarized to train on it, or name an empty or new folder for the binarized "
    "data"
)


def binarize_sst2(
    glue_dir: str | os.PathLike,
    dest: str | os.PathLike,
    encoder: RobertaEncoder,
    splits: tuple[str, ...] = ("train", "dev", "test"),
    label_name: str = "label",
    adopt: Callable[[Path], bool] | None = None,
) -> Path:
    """``glue_dir/SST-2/*.tsv`` → ``dest/input0`` + ``dest/label``; returns ``dest``.
    ``label_name="lable"`` writes the labels under the seed's spelling instead.

    ``dest`` is made whole (nbzoo.safe_write.new_folder): it must be new, empty or nbzoo's, so a
    binarized folder of the user's is refused, never written; ``adopt`` may accept an unmarked
    one (a folder an nbzoo without markers wrote)."""
    if label_name not in LABEL_FOLDERS:
        raise ValueError(
            f"label_name must be one of {', '.join(LABEL_FOLDERS)}; got {label_name!r}"
        )
    dest = Path(dest)
    data = {split: glue.read_split(glue_dir, "sst2", split) for split in splits}
    if "train" not in data:
        raise ValueError(
            "binarize_sst2 needs the train split: the label dictionary is built from it"
        )
    with safe_write.new_folder(
        dest, BINARIZER, what="data_dir", hint=BINARIZED_HINT, adopt=adopt
    ) as tmp:
        _binarize_into(tmp, dest, glue_dir, data, encoder, label_name)
    return dest


def _binarize_into(
    out: Path,
    dest: Path,
    glue_dir: str | os.PathLike,
    data: dict[str, glue.GlueSplit],
    encoder: RobertaEncoder,
    label_name: str,
) -> None:
    """binarize_sst2's files, written into ``out`` (a temporary folder that becomes ``dest``)."""
    source_dict = encoder.dictionary
    log = [f"{_now()} | nbzoo.data.fairseq_glue.binarize_sst2 | {glue_dir} -> {dest}"]
    for split, rows in data.items():
        prefix = out / "input0" / FAIRSEQ_SPLITS[split]
        ids = encoder.encode_batch(rows.text_a)
        tokens = sum(len(x) for x in ids)
        unk = sum(int((x == source_dict.unk()).sum()) for x in ids)
        # before anything is written: a dict.txt of other text gives mostly <unk>
        unknown_tokens.check_rate(
            unk,
            tokens,
            source_dict.source or "the encoder's dict.txt",
            glue.task_path(glue_dir, "sst2", split),
            source_dict.unk_word,
        )
        write_dataset(prefix, ids, vocab_size=len(source_dict))
        log.append(
            f"[input0] {glue.task_path(glue_dir, 'sst2', split)}: {len(ids)} sents, {tokens} tokens, "
            f"{100 * unk / max(tokens, 1):.3}% replaced by <unk> | dtype "
            f"{np.dtype(best_fitting_int_dtype(len(source_dict))).name}"
        )
    source_dict.save(out / "input0" / "dict.txt")
    write_bytes_atomic(out / "input0" / "preprocess.log", ("\n".join(log) + "\n").encode())

    label_dict = Dictionary.build(str(label) for label in data["train"].labels)
    log = [f"{_now()} | nbzoo.data.fairseq_glue.binarize_sst2 | labels of {glue_dir}"]
    for split, rows in data.items():
        if rows.labels is None:  # GLUE's test split has no labels; fairseq writes none either
            continue
        items = [label_dict.encode_line(str(label)) for label in rows.labels]
        write_dataset(out / label_name / FAIRSEQ_SPLITS[split], items, vocab_size=len(label_dict))
        log.append(f"[label] {split}: {len(items)} sents, {2 * len(items)} tokens")
    label_dict.save(out / label_name / "dict.txt")
    write_bytes_atomic(out / label_name / "preprocess.log", ("\n".join(log) + "\n").encode())


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def label_folder(folder: str | os.PathLike) -> Path:
    """The binarized labels' folder: ``label/`` (fairseq's name) or ``lable/`` (the seed's)."""
    folder = Path(folder)
    found = [folder / name for name in LABEL_FOLDERS if (folder / name).is_dir()]
    if len(found) > 1:
        raise FairseqFormatError(
            f"{folder}: both label/ and lable/ exist; keep the one that matches input0/ "
            "(fairseq writes label/, the seed's tree spells it lable/)"
        )
    if not found:
        raise FileNotFoundError(
            f"{folder}: no label/ (or the seed's lable/) folder; {sources.FAIRSEQ_SST2_HOWTO}"
        )
    return found[0]


def load_task_dictionary(path: str | os.PathLike) -> Dictionary:
    """``SentencePredictionTask.load_dictionary``: dict.txt plus ``<mask>`` at the end."""
    d = Dictionary.load(path)
    d.add_symbol("<mask>")
    return d


class SentencePredictionDataset(torch.utils.data.Dataset):
    """One split of a binarized single-sentence task (``input0`` + ``label``) as model inputs.

    Items are ``{"input_ids": LongTensor, "labels": LongTensor}`` (no labels for test splits);
    sentences longer than ``max_positions`` keep their first tokens and their final ``</s>``.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        split: str,
        max_positions: int = 512,
        init_token: int | None = 0,
    ):
        folder = Path(folder)
        self.folder, self.split = folder, split
        self.dictionary = load_task_dictionary(folder / "input0" / "dict.txt")
        self.label_dir = label_folder(folder)
        label_file = Dictionary.load(self.label_dir / "dict.txt")
        # Real labels have counts; fairseq pads the dictionary with zero-count madeupwords.
        n = label_file.nspecial
        self.class_names = [
            s for s, c in zip(label_file.symbols[n:], label_file.counts[n:], strict=True) if c > 0
        ]
        self.label_dictionary = load_task_dictionary(self.label_dir / "dict.txt")
        self.inputs = MMapIndexedDataset(folder / "input0" / split)
        self.init_token = init_token
        self.max_positions = max_positions
        if self.inputs.num_tokens and int(self.inputs.tokens.max()) >= len(self.dictionary):
            bad = next(
                i for i, x in enumerate(self.inputs) if len(x) and x.max() >= len(self.dictionary)
            )
            raise FairseqFormatError(
                f"{folder / 'input0' / split}.bin: item {bad} holds token id {int(self.inputs[bad].max())}, "
                f"but {folder / 'input0' / 'dict.txt'} defines only {len(self.dictionary)} symbols"
            )
        self.targets = None
        label_prefix = self.label_dir / split
        if Path(f"{label_prefix}.idx").exists():
            self.targets = self._read_targets(label_prefix)
        lengths = self.inputs.sizes.astype(np.int64) + (init_token is not None)
        self.truncated = int((lengths > max_positions).sum())
        # tokens per item as the model sees it: what fairseq's --max-tokens batching counts
        self.item_tokens = np.minimum(lengths, max_positions)

    def _read_targets(self, prefix: Path) -> np.ndarray:
        labels = MMapIndexedDataset(prefix)
        if len(labels) != len(self.inputs):
            raise FairseqFormatError(
                f"{prefix}.idx: {len(labels)} labels for {len(self.inputs)} sentences in "
                f"{self.folder / 'input0' / self.split}.idx"
            )
        d = self.label_dictionary
        eos = d.eos()
        if not np.all(labels.sizes == 2):
            bad = int(np.argmax(labels.sizes != 2))
            raise FairseqFormatError(
                f"{prefix}.bin: label item {bad} has {int(labels.sizes[bad])} tokens, expected 2 "
                "(the label id and </s>)"
            )
        pairs = np.asarray(labels.tokens, dtype=np.int64).reshape(-1, 2)
        ok = (pairs[:, 1] == eos) & (pairs[:, 0] >= d.nspecial) & (pairs[:, 0] < len(d))
        if not ok.all():
            bad = int(np.argmax(~ok))
            raise FairseqFormatError(
                f"{prefix}.bin: label item {bad} is {pairs[bad].tolist()}, expected "
                f"[a label id in {d.nspecial}..{len(d) - 1}, {eos} (</s>)]"
            )
        return pairs[:, 0] - d.nspecial

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.inputs[i]
        limit = self.max_positions - (self.init_token is not None)
        if len(ids) > limit:
            ids = np.append(ids[: limit - 1], ids[-1])
        ids = torch.from_numpy(ids.astype(np.int64))
        if self.init_token is not None:
            ids = torch.cat([torch.tensor([self.init_token]), ids])
        item = {"input_ids": ids}
        if self.targets is not None:
            item["labels"] = torch.tensor(self.targets[i])
        return item


class PadCollator:
    """Right-pad ``input_ids`` with the dictionary's ``<pad>`` and build the attention mask."""

    def __init__(self, pad_id: int = 1):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        for row, x in enumerate(items):
            ids[row, : len(x["input_ids"])] = x["input_ids"]
        batch = {"input_ids": ids, "attention_mask": (ids != self.pad_id).long()}
        if "labels" in items[0]:
            batch["labels"] = torch.stack([x["labels"] for x in items])
        return batch
