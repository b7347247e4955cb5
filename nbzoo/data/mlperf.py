"""MLPerf BERT pretraining data: ``part-XXXXX-of-NNNNN.tfrecord`` shards of ``tf.train.Example``.

Each record holds the seven features of the MLPerf v0.7 BERT reference (``create_pretraining_data.py``):
``input_ids``, ``input_mask``, ``segment_ids`` (int64, ``max_seq_length`` = 512 in MLPerf),
``masked_lm_positions``, ``masked_lm_ids`` (int64, ``max_predictions_per_seq`` = 76),
``masked_lm_weights`` (float, 76) and ``next_sentence_labels`` (int64, 1; 1 = B is a random sentence).

A TFRecord file is a sequence of frames: ``u64 length`` (little endian), ``u32 masked crc32c of the
length bytes``, ``length`` bytes of serialized protobuf, ``u32 masked crc32c of the data``.

Here: a reader that verifies both checksums of every frame, a writer (atomic), the seed's evaluation
split (the first 10,000 consecutive samples, shards in name order) and a generator of sample shards
in exactly this format. The protobuf messages come from the maintained ``tfrecord`` package
(``tfrecord.example_pb2``, no TensorFlow needed); the checksums from ``crc32c``.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np
import torch
from tfrecord import example_pb2

from nbzoo import safe_write
from nbzoo.data import sources

# name -> (protobuf list kind, which length applies)
FEATURES: dict[str, tuple[str, str]] = {
    "input_ids": ("int64_list", "seq"),
    "input_mask": ("int64_list", "seq"),
    "segment_ids": ("int64_list", "seq"),
    "masked_lm_positions": ("int64_list", "pred"),
    "masked_lm_ids": ("int64_list", "pred"),
    "masked_lm_weights": ("float_list", "pred"),
    "next_sentence_labels": ("int64_list", "one"),
}
MLPERF_SEQ_LENGTH = 512
MLPERF_MAX_PREDICTIONS = 76
EVAL_SAMPLES = 10_000  # the seed: "测试：训练集前10000个连续样本"
SHARD_PATTERN = re.compile(r"^part-(\d{5})-of-(\d{5})\.tfrecord$")
_HEADER = struct.Struct("<QI")
_CRC = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8


class TFRecordError(ValueError):
    """A malformed shard; the message names the file and the byte offset of the bad frame."""


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: crc32c rotated right by 15 bits plus a constant (mod 2**32)."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def shard_name(index: int, total: int) -> str:
    return f"part-{index:05d}-of-{total:05d}.tfrecord"


# --- framing -----------------------------------------------------------------------------------
# The `tfrecord` package has a record iterator, but it skips both checksums and its errors name
# neither the file nor the offset; a corrupt record must be rejected with both, so the framing loop
# (a dozen lines) is ours.


def _read_frame(f, path: Path, offset: int, size: int) -> tuple[bytes, int]:
    """Read and verify the frame at ``offset``; return (payload, offset of the next frame)."""
    f.seek(offset)
    header = f.read(_HEADER.size)
    if len(header) != _HEADER.size:
        raise TFRecordError(
            f"{path}: byte offset {offset}: truncated record header "
            f"({len(header)} of {_HEADER.size} bytes; file size {size})"
        )
    length, length_crc = _HEADER.unpack(header)
    if masked_crc32c(header[:8]) != length_crc:
        raise TFRecordError(
            f"{path}: byte offset {offset}: length checksum mismatch (corrupt record)"
        )
    end = offset + _HEADER.size + length + _CRC.size
    if end > size:
        raise TFRecordError(
            f"{path}: byte offset {offset}: record of {length} bytes runs past the end of the file"
        )
    payload = f.read(length)
    (data_crc,) = _CRC.unpack(f.read(_CRC.size))
    if masked_crc32c(payload) != data_crc:
        raise TFRecordError(
            f"{path}: byte offset {offset}: data checksum mismatch (corrupt record)"
        )
    return payload, end


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Yield (byte offset, payload) for every record of one file, checking both checksums."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        offset = 0
        while offset < size:
            payload, nxt = _read_frame(f, path, offset, size)
            yield offset, payload
            offset = nxt


def record_offsets(path: str | os.PathLike) -> np.ndarray:
    """Byte offsets of every record, from the headers alone (length checksum verified; the data
    checksum is verified when a record is read)."""
    path = Path(path)
    size = path.stat().st_size
    offsets = []
    with open(path, "rb") as f:
        offset = 0
        while offset < size:
            header = f.read(_HEADER.size)
            if len(header) != _HEADER.size:
                raise TFRecordError(f"{path}: byte offset {offset}: truncated record header")
            length, length_crc = _HEADER.unpack(header)
            if masked_crc32c(header[:8]) != length_crc:
                raise TFRecordError(
                    f"{path}: byte offset {offset}: length checksum mismatch (corrupt record)"
                )
            offsets.append(offset)
            offset += _HEADER.size + length + _CRC.size
            if offset > size:
                raise TFRecordError(
                    f"{path}: byte offset {offsets[-1]}: record runs past the end of the file"
                )
            f.seek(offset)
    return np.asarray(offsets, dtype=np.int64)


def frame(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return length + _CRC.pack(masked_crc32c(length)) + payload + _CRC.pack(masked_crc32c(payload))


def write_records(path: str | os.PathLike, payloads: Iterable[bytes]) -> Path:
    """Write framed records to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for payload in payloads:
                f.write(frame(payload))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --- examples ----------------------------------------------------------------------------------


def encode_example(sample: dict[str, Sequence]) -> bytes:
    """One MLPerf sample (the seven features) as a serialized ``tf.train.Example``.

    Serialized deterministically (map entries in key order), so a shard's bytes depend only on
    its samples."""
    missing = [k for k in FEATURES if k not in sample]
    if missing:
        raise ValueError(f"sample lacks the features {missing}")
    example = example_pb2.Example()
    for name, (kind, _) in FEATURES.items():
        values = np.asarray(sample[name]).reshape(-1)
        target = getattr(example.features.feature[name], kind).value
        target.extend(values.astype(np.float32 if kind == "float_list" else np.int64).tolist())
    return example.SerializeToString(deterministic=True)


def decode_example(
    payload: bytes, where: str = "<bytes>", lengths: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Parse one ``tf.train.Example`` into the seven feature arrays, checking kinds and lengths.

    ``lengths`` maps "seq" / "pred" to the expected lengths; where None, the first record fixes them
    (every record of a dataset must agree: the reference parses them as FixedLenFeature)."""
    try:
        example = example_pb2.Example.FromString(bytes(payload))
    except Exception as exc:  # protobuf's DecodeError
        raise TFRecordError(f"{where}: not a tf.train.Example ({exc})") from None
    feats = example.features.feature
    out: dict[str, np.ndarray] = {}
    for name, (kind, length_key) in FEATURES.items():
        if name not in feats:
            raise TFRecordError(f"{where}: feature {name!r} is missing")
        got_kind = feats[name].WhichOneof("kind")
        if got_kind != kind:
            raise TFRecordError(f"{where}: feature {name!r} is a {got_kind}, expected a {kind}")
        values = getattr(feats[name], kind).value
        dtype = np.float32 if kind == "float_list" else np.int64
        arr = np.fromiter(values, dtype=dtype, count=len(values))
        expected = 1 if length_key == "one" else (lengths or {}).get(length_key)
        if expected is not None and len(arr) != expected:
            raise TFRecordError(
                f"{where}: feature {name!r} has {len(arr)} values, expected {expected}"
            )
        if lengths is not None and length_key != "one" and length_key not in lengths:
            lengths[length_key] = len(arr)
        out[name] = arr
    return out


@dataclass(frozen=True)
class Limits:
    """What a model can take from a record: token ids below ``vocab_size``, segment ids below
    ``type_vocab_size``, at most ``max_positions`` tokens. A record beyond them would end in an
    IndexError deep inside the embedding or the gather of the masked positions."""

    vocab_size: int
    type_vocab_size: int = 2
    max_positions: int | None = None


def check_limits(sample: dict[str, np.ndarray], limits: Limits, where: str) -> None:
    """Raise :class:`TFRecordError` naming ``where`` (shard and record), the feature, the value
    and its index when a record holds a value the model cannot take."""
    seq = len(sample["input_ids"])
    if limits.max_positions is not None and seq > limits.max_positions:
        raise TFRecordError(
            f"{where}: feature 'input_ids' holds {seq} tokens, more than the model's "
            f"{limits.max_positions} positions"
        )
    bounds = {
        "input_ids": (limits.vocab_size, f"the vocabulary of {limits.vocab_size} tokens"),
        "masked_lm_ids": (limits.vocab_size, f"the vocabulary of {limits.vocab_size} tokens"),
        "segment_ids": (limits.type_vocab_size, f"{limits.type_vocab_size} segment types"),
        "masked_lm_positions": (seq, f"the sequence of {seq} tokens"),
        "next_sentence_labels": (2, "labels 0 (is next) and 1 (random)"),
    }
    for name, (stop, what) in bounds.items():
        values = sample[name]
        outside = np.flatnonzero((values < 0) | (values >= stop))
        if len(outside):
            i = int(outside[0])
            raise TFRecordError(
                f"{where}: feature {name!r} holds {int(values[i])} at index {i}, outside "
                f"{what} (0 to {stop - 1})"
            )


def write_shard(path: str | os.PathLike, samples: Iterable[dict[str, Sequence]]) -> Path:
    return write_records(path, (encode_example(s) for s in samples))


def read_shard(path: str | os.PathLike) -> list[dict[str, np.ndarray]]:
    path = Path(path)
    lengths: dict[str, int] = {}
    return [
        decode_example(p, f"{path}: byte offset {off}", lengths) for off, p in iter_records(path)
    ]


def list_shards(folder: str | os.PathLike) -> list[Path]:
    """The shards of a folder in name order (the order that defines "the first 10,000 samples")."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: no such folder (expected part-XXXXX-of-NNNNN.tfrecord shards; "
            f"{sources.MLPERF_BERT_HOWTO})"
        )
    shards, indices, totals = [], [], set()
    for p in sorted(folder.iterdir()):
        m = SHARD_PATTERN.match(p.name)
        if m:
            index, total = int(m.group(1)), int(m.group(2))
            if index >= total:
                raise TFRecordError(
                    f"{p}: shard index {index} is not below the shard count {total}"
                )
            shards.append(p)
            indices.append(index)
            totals.add(total)
    if not shards:
        raise FileNotFoundError(
            f"{folder}: no part-XXXXX-of-NNNNN.tfrecord shards; {sources.MLPERF_BERT_HOWTO}"
        )
    if len(totals) > 1:
        raise TFRecordError(f"{folder}: shards disagree on the shard count: {sorted(totals)}")
    # The evaluation split is the first samples in shard order: a set that does not run from
    # 00000 without a gap would silently shift it (a prefix of the set, 00000..0000k, is fine).
    if missing := sorted(set(range(max(indices) + 1)) - set(indices)):
        total = totals.pop()
        names = ", ".join(shard_name(i, total) for i in missing[:3])
        raise TFRecordError(
            f"{folder}: shard {names}{' ...' if len(missing) > 3 else ''} is missing "
            f"({len(missing)} before the last shard present, {shard_name(max(indices), total)}): "
            f"shards must run from {shard_name(0, total)} without a gap, because the evaluation "
            f"split is the first {EVAL_SAMPLES:,} samples in shard order"
        )
    return shards


# --- dataset -----------------------------------------------------------------------------------


class PretrainingShards(torch.utils.data.Dataset):
    """Samples ``start`` (inclusive) to ``stop`` (exclusive) of a folder's shards, in shard-name
    order. Records are found through an offset index (headers only) and read on access, each
    checked against its checksum; ``in_memory=True`` decodes them all up front (small data)."""

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        start: int = 0,
        stop: int | None = None,
        in_memory: bool = False,
        limits: Limits | None = None,
    ):
        self._files: dict[int, object] = {}  # first: __del__ closes them even if the listing fails
        paths = list_shards(shards) if isinstance(shards, str | os.PathLike) else shards
        self.paths = [Path(p) for p in paths]
        self._offsets: list[np.ndarray] = []
        counted = 0
        for p in self.paths:  # index only as many shards as the range needs
            if stop is not None and counted >= stop:
                break
            self._offsets.append(record_offsets(p))
            counted += len(self._offsets[-1])
        self.paths = self.paths[: len(self._offsets)]
        self._cum = np.cumsum([0] + [len(o) for o in self._offsets])
        total = int(self._cum[-1])
        stop = total if stop is None else stop
        if not 0 <= start <= stop <= total:
            raise ValueError(
                f"sample range [{start}, {stop}) is outside the {total} samples of {len(self.paths)} shards"
            )
        self.start, self.stop = start, stop
        self.limits = limits  # every record read is checked against them
        self.lengths: dict[str, int] = {}
        self._arrays: dict[str, np.ndarray] | None = None
        if in_memory:
            rows = [self._read(i) for i in range(len(self))]
            self._arrays = {k: np.stack([r[k] for r in rows]) for k in FEATURES}
            self._close()

    def __len__(self) -> int:
        return self.stop - self.start

    def _read(self, i: int) -> dict[str, np.ndarray]:
        g = self.start + i
        s = int(np.searchsorted(self._cum, g, side="right") - 1)
        offset = int(self._offsets[s][g - self._cum[s]])
        f = self._files.get(s)
        if f is None:
            f = self._files[s] = open(self.paths[s], "rb")  # noqa: SIM115 (kept open for reuse)
        size = os.fstat(f.fileno()).st_size
        payload, _ = _read_frame(f, self.paths[s], offset, size)
        where = f"{self.paths[s]}: record {g - int(self._cum[s])} (byte offset {offset})"
        sample = decode_example(payload, where, self.lengths)
        if self.limits is not None:
            check_limits(sample, self.limits, where)
        return sample

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._arrays is not None:
            return {k: v[i] for k, v in self._arrays.items()}
        return self._read(i)

    def arrays(self) -> dict[str, np.ndarray]:
        """All samples stacked per feature (loads them if not in memory)."""
        if self._arrays is not None:
            return self._arrays
        rows = [self._read(i) for i in range(len(self))]
        return {k: np.stack([r[k] for r in rows]) for k in FEATURES}

    def _close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __getstate__(self):  # open files do not travel to DataLoader workers
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def __del__(self):
        self._close()


def eval_split(
    folder: str | os.PathLike,
    samples: int = EVAL_SAMPLES,
    in_memory: bool = False,
    limits: Limits | None = None,
) -> PretrainingShards:
    """The seed's evaluation set: the first ``samples`` consecutive samples (shards in name order)."""
    return PretrainingShards(folder, 0, samples, in_memory=in_memory, limits=limits)


def train_split(
    folder: str | os.PathLike,
    skip: int = EVAL_SAMPLES,
    limit: int | None = None,
    in_memory: bool = False,
    limits: Limits | None = None,
) -> PretrainingShards:
    """Training samples from sample ``skip`` on (at most ``limit`` of them): ``skip = 0`` is the
    seed's training set, all samples, its evaluation samples included; ``skip = samples`` of
    :func:`eval_split` leaves the evaluation samples out of training (a held-out evaluation)."""
    return PretrainingShards(
        folder, skip, None if limit is None else skip + limit, in_memory=in_memory, limits=limits
    )


def collate(samples: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack samples into the tensors a BERT pretraining step consumes (names as in the records)."""
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in FEATURES}


# --- sample shards -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSpec:
    """A synthetic language for sample shards, and how create_pretraining_data.py would cut it.

    Text is a first-order Markov chain over ``vocab_size - 5`` words: every word has ``branching``
    successors (drawn by a Zipf law, so some words are frequent), taken with probabilities
    ``successor_probs``. Segment B continues A's chain (IsNext, label 0) or is a chain from
    elsewhere (label 1), half and half. Masking follows the reference: 15% of the tokens, at most
    ``max_predictions`` per sequence, 80% [MASK] / 10% random word / 10% unchanged."""

    vocab_size: int = 128
    seq_length: int = 64
    max_predictions: int = 10
    branching: int = 4
    successor_probs: tuple[float, ...] = (0.5, 0.25, 0.15, 0.1)
    short_seq_prob: float = 0.1
    masked_lm_prob: float = 0.15
    zipf: float = 1.0


PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def sample_vocab(spec: SampleSpec) -> list[str]:
    """vocab.txt lines of the sample language: the five special tokens, then w0, w1, ..."""
    return list(SPECIAL_TOKENS) + [f"w{i}" for i in range(spec.vocab_size - len(SPECIAL_TOKENS))]


class _MarkovText:
    def __init__(self, spec: SampleSpec, rng: np.random.Generator):
        if len(spec.successor_probs) != spec.branching:
            raise ValueError("successor_probs needs one probability per successor")
        self.words = spec.vocab_size - len(SPECIAL_TOKENS)
        ranks = np.arange(1, self.words + 1, dtype=np.float64)
        self.unigram = ranks**-spec.zipf / np.sum(ranks**-spec.zipf)
        self.succ = np.stack(
            [
                rng.choice(self.words, size=spec.branching, replace=False, p=self.unigram)
                for _ in range(self.words)
            ]
        )
        self.probs = np.asarray(spec.successor_probs) / np.sum(spec.successor_probs)

    def chains(self, rng: np.random.Generator, n: int, length: int) -> np.ndarray:
        """``n`` chains of ``length`` word ids (offset by the special tokens)."""
        out = np.empty((n, length), dtype=np.int64)
        out[:, 0] = rng.choice(self.words, size=n, p=self.unigram)
        branch = rng.choice(len(self.probs), size=(n, length), p=self.probs)
        for t in range(1, length):
            out[:, t] = self.succ[out[:, t - 1], branch[:, t]]
        return out + len(SPECIAL_TOKENS)


def generate_samples(spec: SampleSpec, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` pretraining samples of the synthetic language, stacked per feature (the language, the
    cuts and the masks all follow from ``seed``). Vectorised over samples: a Python loop per sample
    is too slow for the notebook's time budget."""
    rng = np.random.default_rng(seed)
    text = _MarkovText(spec, rng)
    L, P, nspecial = spec.seq_length, spec.max_predictions, len(SPECIAL_TOKENS)
    content = L - 3  # [CLS] A [SEP] B [SEP]
    doc = text.chains(rng, n, 2 * content)
    other = text.chains(rng, n, content)
    total = np.where(
        rng.random(n) < spec.short_seq_prob, rng.integers(4, content + 1, size=n), content
    )
    len_a = (rng.random(n) * (total - 1)).astype(np.int64) + 1  # 1 .. total-1
    len_b = total - len_a
    is_random = rng.random(n) < 0.5
    # B continues A's chain (IsNext) or comes from another chain (random next)
    b_src = np.where(is_random[:, None], np.pad(other, ((0, 0), (0, content))), doc)
    b_start = np.where(is_random, 0, len_a)
    j = np.arange(L)[None, :]
    la, lb = len_a[:, None], len_b[:, None]
    a_tok = np.take_along_axis(doc, np.clip(j - 1, 0, 2 * content - 1), axis=1)
    b_idx = np.clip(b_start[:, None] + j - la - 2, 0, 2 * content - 1)
    b_tok = np.take_along_axis(b_src, b_idx, axis=1)
    tokens = np.full((n, L), PAD, dtype=np.int64)
    tokens = np.where(j == 0, CLS, tokens)
    tokens = np.where((j >= 1) & (j <= la), a_tok, tokens)
    tokens = np.where((j == la + 1) | (j == la + lb + 2), SEP, tokens)
    tokens = np.where((j >= la + 2) & (j < la + lb + 2), b_tok, tokens)
    length = (total + 3)[:, None]
    segments = ((j >= la + 2) & (j < length)).astype(np.int64)
    mask = (j < length).astype(np.int64)
    # masking as the reference: choose k positions among the words, then 80/10/10
    k = np.minimum(P, np.maximum(1, np.round((total + 3) * spec.masked_lm_prob))).astype(np.int64)
    keys = np.where(tokens >= nspecial, rng.random((n, L)), 2.0)
    chosen = np.argsort(keys, axis=1, kind="stable")[:, :P]
    valid = np.arange(P)[None, :] < k[:, None]
    positions = np.sort(np.where(valid, chosen, L), axis=1)
    valid = positions < L
    positions = np.where(valid, positions, 0)
    labels = np.where(valid, np.take_along_axis(tokens, positions, axis=1), 0)
    r = rng.random((n, P))
    replacement = np.where(
        r < 0.8, MASK, np.where(r < 0.9, rng.integers(nspecial, spec.vocab_size, (n, P)), labels)
    )
    inputs = tokens.copy()
    rows = np.repeat(np.arange(n)[:, None], P, axis=1)
    inputs[rows[valid], positions[valid]] = replacement[valid]
    return {
        "input_ids": inputs,
        "input_mask": mask,
        "segment_ids": segments,
        "masked_lm_positions": positions.astype(np.int64),
        "masked_lm_ids": labels.astype(np.int64),
        "masked_lm_weights": valid.astype(np.float32),
        "next_sentence_labels": is_random.astype(np.int64)[:, None],
    }


def generate_sample_shards(
    folder: str | os.PathLike,
    num_samples: int,
    samples_per_shard: int,
    spec: SampleSpec = SampleSpec(),
    seed: int = 0,
) -> list[Path]:
    """Write ``num_samples`` synthetic samples as ``part-XXXXX-of-NNNNN.tfrecord`` shards, plus the
    language's ``vocab.txt``. Deterministic for a given spec and seed.

    The folder is made whole (nbzoo.safe_write.new_folder): new, empty or nbzoo's -- a folder of
    the user's shards is refused, never written. An unmarked folder holding exactly these files
    (written by an nbzoo without markers) is adopted."""
    folder = Path(folder)

    def write(out: Path) -> list[str]:
        out.mkdir(parents=True, exist_ok=True)
        arrays = generate_samples(spec, num_samples, seed)
        total = -(-num_samples // samples_per_shard)
        names = []
        for s in range(total):
            rows = range(s * samples_per_shard, min((s + 1) * samples_per_shard, num_samples))
            samples = ({k: v[i] for k, v in arrays.items()} for i in rows)
            names.append(write_shard(out / shard_name(s, total), samples).name)
        (out / "vocab.txt").write_text("\n".join(sample_vocab(spec)) + "\n", encoding="utf-8")
        return names

    with safe_write.new_folder(
        folder,
        GENERATOR,
        what="data_dir",
        hint="pass data_source=local to read the shards there, or name an empty or new folder",
        adopt=lambda existing: safe_write.built_alike(existing, write),
    ) as tmp:
        names = write(tmp)
    return [folder / name for name in names]


GENERATOR = "nbzoo's MLPerf sample shard generator (data_source=generate)"
