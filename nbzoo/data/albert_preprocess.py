"""The seed's offline-inference data layout for ALBERT on SST-2, and its accuracy postprocess.

``Albert_preprocess.py --save_dir ./preprocessed_data_seq128 --max_seq_length 128`` in the seed
writes one file per dev sample and input, plus the labels::

    save_dir/input_ids/0.npy  save_dir/attention_mask/0.npy  save_dir/token_type_ids/0.npy  ...
    save_dir/label.npy

each sample int64 of shape ``1 × seq_len`` (padded / truncated to ``seq_len`` = 16, 32, 64 or 128),
``label.npy`` int64 of shape ``(N,)``. ``Albert_postprocess.py --result_dir results/seq128_bs32
--label_path .../label.npy`` then reads the runner's per-sample outputs (``{i}_0.npy``, named
after the input file as ais_bench does) and prints the accuracy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nbzoo import metrics, safe_write
from nbzoo.data.glue import GlueSplit

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
SEQ_LENGTHS = (16, 32, 64, 128)


class PostprocessError(ValueError):
    pass


def preprocess(
    split: GlueSplit,
    tokenizer,
    save_dir: str | os.PathLike,
    max_seq_length: int,
    max_samples: int | None = None,
) -> Path:
    """Tokenize an SST-2 split with labels into the seed's layout under ``save_dir``.

    The folder is built under a temporary name and renamed when complete, so a crash never leaves
    a partial ``save_dir`` behind; it replaces only an earlier ``save_dir`` of nbzoo's
    (nbzoo.safe_write), never a folder of the user's.
    """
    if split.labels is None:
        raise ValueError("preprocess needs a labelled split (SST-2 train or dev), not test")
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be at least 2; got {max_seq_length}")
    save_dir = Path(save_dir)
    n = len(split) if not max_samples else min(len(split), max_samples)
    enc = tokenizer(
        split.text_a[:n],
        split.text_b[:n] if split.text_b else None,
        max_length=max_seq_length,
        padding="max_length",
        truncation=True,
        return_token_type_ids=True,
        return_attention_mask=True,
        return_tensors="np",
    )
    with safe_write.new_folder(
        save_dir, "nbzoo.data.albert_preprocess", what="save_dir", hint="name another save_dir"
    ) as tmp:
        for name in INPUT_NAMES:
            folder = tmp / name
            folder.mkdir(parents=True)
            data = np.asarray(enc[name], dtype=np.int64)
            for i in range(n):
                np.save(folder / f"{i}.npy", data[i : i + 1])
        np.save(tmp / "label.npy", np.asarray(split.labels[:n], dtype=np.int64))
    return save_dir


def input_dirs(save_dir: str | os.PathLike) -> list[Path]:
    """The runner's ``--input`` folders, in the model's input order."""
    return [Path(save_dir) / name for name in INPUT_NAMES]


def load_features(save_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read a preprocessed folder back: ``({name: (N, seq) int64}, labels (N,))``."""
    save_dir = Path(save_dir)
    labels = np.load(save_dir / "label.npy")
    features = {}
    for name in INPUT_NAMES:
        rows = [np.load(save_dir / name / f"{i}.npy") for i in range(len(labels))]
        features[name] = np.concatenate(rows, axis=0)
    return features, labels


def read_outputs(
    result_dir: str | os.PathLike, n: int, num_classes: int | None = None, output_index: int = 0
) -> np.ndarray:
    """The runner's per-sample outputs ``{i}_{k}.npy|.bin|.txt`` for i < n, stacked (n, classes).

    ``.bin`` files are raw float32; their class count comes from the file size.
    """
    result_dir = Path(result_dir)
    rows = []
    for i in range(n):
        found = [
            result_dir / f"{i}_{output_index}.{ext}"
            for ext in ("npy", "bin", "txt")
            if (result_dir / f"{i}_{output_index}.{ext}").exists()
        ]
        if not found:
            raise PostprocessError(
                f"{result_dir / f'{i}_{output_index}.npy'}: missing (expected one output file per "
                f"sample for samples 0..{n - 1}, named as the runner writes them)"
            )
        path = found[0]
        if path.suffix == ".npy":
            row = np.load(path)
        elif path.suffix == ".bin":
            row = np.fromfile(path, dtype=np.float32)
        else:
            row = np.loadtxt(path, dtype=np.float32, ndmin=1)
        row = np.asarray(row, dtype=np.float32).reshape(-1)
        if num_classes is not None and row.size != num_classes:
            raise PostprocessError(f"{path}: {row.size} values, expected {num_classes} classes")
        if rows and row.size != rows[0].size:
            raise PostprocessError(f"{path}: {row.size} values, the first file has {rows[0].size}")
        rows.append(row)
    return np.stack(rows)


def postprocess(result_dir: str | os.PathLike, label_path: str | os.PathLike) -> dict[str, float]:
    """Accuracy of the argmax of each output against ``label.npy`` (the seed's
    Albert_postprocess.py)."""
    labels = np.load(label_path)
    logits = read_outputs(result_dir, len(labels))
    return {"accuracy": metrics.accuracy(logits.argmax(-1), labels), "samples": int(len(labels))}
