"""fairseq's binarized data: ``dict.txt`` and the MMIDIDX indexed dataset (``<prefix>.idx`` +
``<prefix>.bin``), byte for byte as ``fairseq-preprocess --dataset-impl mmap`` writes them.

fairseq itself no longer installs on current Python, so this is our own reader and writer of its
format (checked against ``fairseq/data/indexed_dataset.py`` and ``fairseq/data/dictionary.py`` at the
commit the seed pins, d871f616):

``.idx``   ``MMIDIDX\\x00\\x00`` (9 bytes) · version, little-endian u64 (1) · dtype code, u8 ·
           item count n, u64 · n sizes, int32 (tokens per item) · n pointers, int64 (byte offset of
           each item in the ``.bin``)
``.bin``   every item's token ids back to back, in the dtype of the code: fairseq picks uint16 when
           the dictionary has fewer than 65500 symbols, uint32 below 2**32 - 1, else int64
           (``best_fitting_int_dtype``).
``dict.txt`` ``<symbol> <count>`` per line (optionally `` #fairseq:overwrite``); ``<s> <pad> </s>
           <unk>`` take ids 0-3 before the file's first line.

The reader maps both files with ``numpy.memmap``: opening a dataset reads only the 26-byte header,
and an item is a view into the mapped ``.bin`` (no copy).
"""

from __future__ import annotations

import io
import os
import re
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from nbzoo.data import utf8

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQ")  # magic, version, dtype code, item count: 26 bytes

# fairseq's ``_code_to_dtype``. Codes 6 and 7 are both float64; fairseq writes the first match (6).
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.double,
    8: np.uint16,
    9: np.uint32,
    10: np.uint64,
}


class FairseqFormatError(ValueError):
    """A dict.txt or an .idx/.bin pair that is not what fairseq writes."""


def dtype_code(dtype) -> int:
    dtype = np.dtype(dtype)
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == dtype:
            return code
    raise ValueError(f"fairseq's indexed dataset has no code for dtype {dtype}")


def best_fitting_int_dtype(max_int_to_represent: int | None) -> type[np.generic]:
    """The token dtype fairseq's ``make_builder(..., vocab_size=len(dictionary))`` chooses."""
    if max_int_to_represent is None:
        return np.uint32
    if max_int_to_represent < 65500:
        return np.uint16
    if max_int_to_represent < 4294967295:
        return np.uint32
    return np.int64


def index_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def data_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def exists(prefix: str | os.PathLike) -> bool:
    return index_path(prefix).exists() and data_path(prefix).exists()


# --- dict.txt ---------------------------------------------------------------------------------

_SPACES = re.compile(r"\s+")


def tokenize_line(line: str) -> list[str]:
    """fairseq's ``tokenize_line``: collapse whitespace, strip, split."""
    return _SPACES.sub(" ", line).strip().split()


class Dictionary:
    """fairseq's ``Dictionary``: symbols ↔ consecutive ids, with ``<s> <pad> </s> <unk>`` first."""

    def __init__(
        self,
        bos: str = "<s>",
        pad: str = "<pad>",
        eos: str = "</s>",
        unk: str = "<unk>",
        extra_special_symbols: Iterable[str] = (),
    ):
        self.bos_word, self.pad_word, self.eos_word, self.unk_word = bos, pad, eos, unk
        self.symbols: list[str] = []
        self.counts: list[int] = []
        self.indices: dict[str, int] = {}
        self.bos_index = self.add_symbol(bos)
        self.pad_index = self.add_symbol(pad)
        self.eos_index = self.add_symbol(eos)
        self.unk_index = self.add_symbol(unk)
        for symbol in extra_special_symbols:
            self.add_symbol(symbol)
        self.nspecial = len(self.symbols)
        self.source: Path | None = None  # the dict.txt it was read from (for messages)

    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, symbol: str) -> bool:
        return symbol in self.indices

    def __getitem__(self, index: int) -> str:
        return self.symbols[index] if index < len(self.symbols) else self.unk_word

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dictionary) and self.indices == other.indices

    def bos(self) -> int:
        return self.bos_index

    def pad(self) -> int:
        return self.pad_index

    def eos(self) -> int:
        return self.eos_index

    def unk(self) -> int:
        return self.unk_index

    def index(self, symbol: str) -> int:
        return self.indices.get(symbol, self.unk_index)

    def add_symbol(self, word: str, n: int = 1, overwrite: bool = False) -> int:
        if word in self.indices and not overwrite:
            idx = self.indices[word]
            self.counts[idx] += n
            return idx
        idx = len(self.symbols)
        self.indices[word] = idx
        self.symbols.append(word)
        self.counts.append(n)
        return idx

    @classmethod
    def load(cls, path: str | os.PathLike) -> Dictionary:
        """Read a ``dict.txt``; a malformed or duplicated line raises one error naming it."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such dictionary file (fairseq's dict.txt)")
        d = cls()
        # as fairseq reads it: text mode's readlines (universal newlines), not str.splitlines
        lines = io.StringIO(utf8.read_text(path, FairseqFormatError), newline=None).readlines()
        for lineno, raw in enumerate(lines, start=1):
            line = raw.rstrip()
            overwrite = False
            parts = line.rsplit(" ", 1)
            if len(parts) == 2 and parts[1] == "#fairseq:overwrite":
                overwrite = True
                parts = parts[0].rsplit(" ", 1)
            if len(parts) != 2 or not parts[0] or not re.fullmatch(r"-?\d+", parts[1]):
                raise FairseqFormatError(
                    f"{path}, line {lineno}: expected '<symbol> <count> [#fairseq:overwrite]', "
                    f"got {raw!r}"
                )
            word, count = parts[0], int(parts[1])
            if word in d and not overwrite:
                raise FairseqFormatError(
                    f"{path}, line {lineno}: symbol {word!r} appears twice (fairseq allows that "
                    "only with the '#fairseq:overwrite' flag)"
                )
            d.add_symbol(word, n=count, overwrite=overwrite)
        d.source = path
        return d

    def dump(self) -> bytes:
        """The bytes of ``dict.txt``: the symbols after the specials, with their counts."""
        lines = "".join(
            f"{s} {c}\n"
            for s, c in zip(
                self.symbols[self.nspecial :], self.counts[self.nspecial :], strict=True
            )
        )
        return lines.encode("utf-8")

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``dict.txt`` atomically."""
        return write_bytes_atomic(Path(path), self.dump())

    def finalize(self, threshold: int = -1, nwords: int = -1, padding_factor: int = 8) -> None:
        """Sort symbols by count (ties by symbol), keep ``nwords``, pad to ``padding_factor``."""
        if nwords <= 0:
            nwords = len(self)
        symbols = self.symbols[: self.nspecial]
        counts = self.counts[: self.nspecial]
        # Counter.most_common is a stable sort of the symbol-sorted items: ties stay in symbol order.
        pairs = Counter(
            dict(
                sorted(
                    zip(self.symbols[self.nspecial :], self.counts[self.nspecial :], strict=True)
                )
            )
        )
        for symbol, count in pairs.most_common(nwords - self.nspecial):
            if count < threshold:
                break
            symbols.append(symbol)
            counts.append(count)
        self.symbols, self.counts = symbols, counts
        self.indices = {s: i for i, s in enumerate(symbols)}
        if padding_factor > 1:
            i = 0
            while len(self) % padding_factor != 0:
                self.add_symbol(f"madeupword{i:04d}", n=0)
                i += 1

    @classmethod
    def build(
        cls, lines: Iterable[str], threshold: int = -1, nwords: int = -1, padding_factor: int = 8
    ) -> Dictionary:
        """The dictionary ``fairseq-preprocess`` builds from a text file without ``--srcdict``."""
        counter: Counter[str] = Counter()
        d = cls()
        for line in lines:
            counter.update(tokenize_line(line))
            counter.update([d.eos_word])
        for word, count in sorted(counter.items()):
            d.add_symbol(word, count)
        d.finalize(threshold, nwords, padding_factor)
        return d

    def encode_line(self, line: str, append_eos: bool = True) -> np.ndarray:
        """``Dictionary.encode_line(add_if_not_exist=False)``: unknown symbols become ``<unk>``."""
        ids = [self.index(word) for word in tokenize_line(line)]
        if append_eos:
            ids.append(self.eos_index)
        return np.asarray(ids, dtype=np.int32)

    def string(self, ids: Iterable[int]) -> str:
        """Symbols of ``ids`` joined by spaces, without ``<s>`` and ``</s>``."""
        skip = {self.bos_index, self.eos_index}
        return " ".join(self[int(i)] for i in ids if int(i) not in skip)


# --- the indexed dataset ----------------------------------------------------------------------


class MMapIndexedDataset(Sequence):
    """Read ``<prefix>.idx`` + ``<prefix>.bin``; ``ds[i]`` is item i's token ids, a read-only
    numpy view in the file's dtype (cast with ``.astype(np.int64)`` for torch, as fairseq does).

    The header and every size and pointer are checked once at opening: a wrong magic, version or
    dtype code, a truncated index, pointers that do not follow the sizes, or a ``.bin`` whose
    length is not the sum of the sizes each raise :class:`FairseqFormatError` naming the file.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        idx, binf = index_path(prefix), data_path(prefix)
        for path in (idx, binf):
            if not path.exists():
                raise FileNotFoundError(
                    f"{path}: no such file (a fairseq dataset is the pair {idx.name} + {binf.name})"
                )
        idx_size = idx.stat().st_size
        with open(idx, "rb") as f:
            head = f.read(HEADER.size)
        if not head or head[:9] != MAGIC[: len(head)]:
            raise FairseqFormatError(
                f"{idx}: not a fairseq MMIDIDX index (the file starts with {head[:9]!r}, "
                f"expected {MAGIC!r})"
            )
        if len(head) < HEADER.size:
            raise FairseqFormatError(
                f"{idx}: truncated header ({len(head)} bytes, expected {HEADER.size})"
            )
        _, version, code, n = HEADER.unpack(head)
        if version != VERSION:
            raise FairseqFormatError(f"{idx}: index version {version}, expected {VERSION}")
        if code not in DTYPE_CODES:
            raise FairseqFormatError(
                f"{idx}: unknown dtype code {code} (fairseq knows {sorted(DTYPE_CODES)})"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = HEADER.size + n * (4 + 8)
        if idx_size != expected:
            what = "truncated" if idx_size < expected else "has trailing bytes"
            raise FairseqFormatError(
                f"{idx}: {what}: {idx_size} bytes, expected {expected} for {n} items "
                f"({HEADER.size}-byte header + {n} int32 sizes + {n} int64 pointers)"
            )
        if n:
            index = np.memmap(idx, mode="r", dtype=np.uint8)
            self.sizes = np.frombuffer(index, dtype="<i4", count=n, offset=HEADER.size)
            self.pointers = np.frombuffer(index, dtype="<i8", count=n, offset=HEADER.size + 4 * n)
        else:
            self.sizes = np.zeros(0, dtype=np.int32)
            self.pointers = np.zeros(0, dtype=np.int64)
        if n and int(self.sizes.min()) < 0:
            bad = int(np.argmax(self.sizes < 0))
            raise FairseqFormatError(
                f"{idx}: size of item {bad} is {int(self.sizes[bad])}, expected >= 0"
            )
        # Item offsets in tokens; fairseq's writer puts the items back to back, so the pointers
        # must be the running sum of the sizes in bytes.
        self._starts = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(self.sizes, dtype=np.int64, out=self._starts[1:])
        expected_pointers = self._starts[:-1] * self.dtype.itemsize
        if n and not np.array_equal(self.pointers, expected_pointers):
            bad = int(np.argmax(self.pointers != expected_pointers))
            raise FairseqFormatError(
                f"{idx}: pointer of item {bad} is {int(self.pointers[bad])}, expected "
                f"{int(expected_pointers[bad])} (items are stored back to back in the .bin)"
            )
        self.num_tokens = int(self._starts[-1])
        bin_size = binf.stat().st_size
        if bin_size != self.num_tokens * self.dtype.itemsize:
            raise FairseqFormatError(
                f"{binf}: {bin_size} bytes, but the sizes in {idx.name} add up to "
                f"{self.num_tokens} tokens of {self.dtype} = "
                f"{self.num_tokens * self.dtype.itemsize} bytes"
            )
        if self.num_tokens:
            # A plain ndarray view of the map: slicing it skips np.memmap's per-slice bookkeeping.
            self._data = np.memmap(binf, mode="r", dtype=self.dtype.newbyteorder("<")).view(
                np.ndarray
            )
        else:  # an empty file cannot be mapped
            self._data = np.zeros(0, dtype=self.dtype)
        self._starts_list = self._starts.tolist()  # python ints: the fastest per-item slicing

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        # The hot path of every epoch: two list lookups and one slice of the mapped array.
        try:
            if i < 0:
                i += len(self._starts_list) - 1
                if i < 0:
                    raise IndexError
            starts = self._starts_list
            return self._data[starts[i] : starts[i + 1]]
        except IndexError:
            raise IndexError(
                f"item {i} out of range for {self.prefix} ({len(self)} items)"
            ) from None
        except TypeError:
            raise TypeError(f"items are indexed by int, got {type(i).__name__}") from None

    @property
    def tokens(self) -> np.ndarray:
        """Every item's ids back to back: the whole ``.bin`` as one read-only view."""
        return self._data

    def __iter__(self) -> Iterator[np.ndarray]:
        # The slicing loop runs in C (map over slice objects): no Python frame per item.
        starts = self._starts_list
        return map(self._data.__getitem__, map(slice, starts[:-1], starts[1:]))

    def __repr__(self) -> str:
        return (
            f"MMapIndexedDataset({self.prefix!r}: {len(self)} items, {self.num_tokens} tokens, "
            f"{self.dtype})"
        )


class MMapIndexedDatasetBuilder:
    """Write an ``.idx``/``.bin`` pair exactly as fairseq's ``MMapIndexedDatasetBuilder`` does.

    Both files go to temporary names and are renamed by :meth:`finalize`; used as a context
    manager, an exception removes them instead, so no half-written dataset is left behind.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.int64):
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self._disk_dtype = self.dtype.newbyteorder("<")
        self._bin_tmp = Path(f"{data_path(prefix)}.tmp-{os.getpid()}")
        self._bin_tmp.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._bin_tmp, "wb")
        self._sizes: list[int] = []
        if np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            self._range = (int(info.min), int(info.max))
        else:
            self._range = None

    def add_item(self, ids) -> None:
        array = np.asarray(ids)
        if array.dtype != self._disk_dtype:
            if self._range is not None and array.size:
                lo, hi = int(array.min()), int(array.max())
                if lo < self._range[0] or hi > self._range[1]:
                    raise ValueError(
                        f"{self.prefix}: token id {lo if lo < self._range[0] else hi} does not "
                        f"fit the dataset dtype {self.dtype} (item {len(self._sizes)})"
                    )
            array = array.astype(self._disk_dtype)
        self._file.write(np.ascontiguousarray(array).reshape(-1).tobytes())
        self._sizes.append(array.size)

    def finalize(self) -> None:
        self._file.close()
        sizes = np.asarray(self._sizes, dtype="<i4")
        pointers = np.zeros(len(sizes), dtype="<i8")
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        body = HEADER.pack(MAGIC, VERSION, self._code, len(sizes)) + sizes.tobytes()
        write_bytes_atomic(index_path(self.prefix), body + pointers.tobytes())
        os.replace(self._bin_tmp, data_path(self.prefix))

    def abort(self) -> None:
        self._file.close()
        self._bin_tmp.unlink(missing_ok=True)

    def __enter__(self) -> MMapIndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
        return False


def write_dataset(prefix: str | os.PathLike, items: Iterable, vocab_size: int | None) -> Path:
    """Write ``items`` (sequences of ids) with the dtype fairseq picks for ``vocab_size``."""
    with MMapIndexedDatasetBuilder(prefix, dtype=best_fitting_int_dtype(vocab_size)) as builder:
        for ids in items:
            builder.add_item(ids)
    return index_path(prefix)


def write_bytes_atomic(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(payload)
    os.replace(tmp, path)
    return path
