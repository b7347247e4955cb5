"""TensorFlow 1's name-based checkpoint -- a *tensor bundle* -- read without TensorFlow.

The format, after tensorflow/core/util/tensor_bundle/tensor_bundle.{h,cc} and
tensorflow/core/protobuf/tensor_bundle.proto: a checkpoint ``PREFIX`` is

* ``PREFIX.index``: a table in LevelDB's format (tensorflow/core/lib/io/{table,block,format}.cc)
  from each tensor name to a serialized ``BundleEntryProto``; the empty key, first, holds the
  ``BundleHeaderProto`` (num_shards 1, endianness 2, version 3).
* ``PREFIX.data-NNNNN-of-MMMMM`` (``MMMMM`` = num_shards): each tensor's bytes, little endian in C
  order, at the entry's ``[offset, offset + size)`` of shard ``shard_id``.

The table: data blocks, a meta-index block, an index block, then a 48-byte footer -- the
meta-index and index ``BlockHandle`` s (varint64 offset, varint64 size) zero-padded to 40 bytes, and
the magic number 0xdb4775248b80fb57 as two little-endian fixed32, low half first. Every block is
followed by a 5-byte trailer: the compression type (0: none; TensorFlow writes bundles uncompressed)
and the masked crc32c of the block and that byte. A block holds entries -- varint32 bytes shared
with the previous key, varint32 unshared bytes, varint32 value size, the unshared key bytes, the
value -- then its restart points (fixed32 offsets of entries that share nothing) and their count
(fixed32). The index block maps a separator key to each data block's handle; keys increase.

``BundleEntryProto``: dtype 1 (``DataType``), shape 2 (``TensorShapeProto``: ``repeated Dim dim =
2``, ``Dim.size = 1``), shard_id 3, offset 4, size 5, crc32c 6 (fixed32: the *masked* crc32c of the
tensor's bytes, ``crc32c::Mask`` in ``BundleWriter::Add``), slices 7 (a partitioned variable: not
read here). A "masked" crc is ``((crc >> 15) | (crc << 17)) + 0xa282ead8`` (mod 2**32). Every
checksum the format stores is verified.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np

from nbzoo.checkpoint_formats import FormatError
from nbzoo.checkpoint_formats.protowire import (
    FIXED32,
    LENGTH,
    VARINT,
    WireError,
    fields,
    packed_varints,
    signed64,
    varint,
)

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5
BUNDLE_VERSION = 1  # tensor_bundle.cc's kTensorBundleVersion
# tensorflow/core/framework/types.proto: the DataType numbers of fixed-size types
DTYPES = {
    1: ("float32", "<f4"),
    2: ("float64", "<f8"),
    3: ("int32", "<i4"),
    4: ("uint8", "u1"),
    5: ("int16", "<i2"),
    6: ("int8", "i1"),
    9: ("int64", "<i8"),
    10: ("bool", "?"),
    14: ("bfloat16", None),
    17: ("uint16", "<u2"),
    19: ("float16", "<f2"),
    22: ("uint32", "<u4"),
    23: ("uint64", "<u8"),
}
OTHER_DTYPES = {7: "string", 8: "complex64", 18: "complex128", 20: "resource", 21: "variant"}
# TF2's object-based checkpoints (the MLPerf download's tf2_ckpt) hold this key
TF2_OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"
_MASK_DELTA = 0xA282EAD8
_DATA_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")
_READ_CHUNK = 64 << 20


def masked_crc32c(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def dtype_name(number: int) -> str:
    known = DTYPES.get(number, (OTHER_DTYPES.get(number, f"DataType {number}"),))
    return known[0]


@dataclass(frozen=True)
class Entry:
    """One ``BundleEntryProto``."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # masked, as stored
    partitioned: bool

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)


def prefix_of(src: str | os.PathLike) -> Path:
    """The checkpoint prefix of ``src``: the prefix itself, or its ``.index`` or a data shard."""
    text = os.fspath(src)
    if text.endswith(".index"):
        return Path(text[: -len(".index")])
    return Path(_DATA_SUFFIX.sub("", text))


def is_bundle(src: str | os.PathLike) -> bool:
    return Path(f"{prefix_of(src)}.index").is_file()


def _parse_entry(buf: bytes, name: str) -> Entry:
    dtype = shard = offset = size = crc = 0
    shape: tuple[int, ...] = ()
    partitioned = False
    for number, wire, value in fields(buf, 0, len(buf)):
        if number == 1 and wire == VARINT:
            dtype = value
        elif number == 2 and wire == LENGTH:
            shape = _parse_shape(buf, *value)
        elif number == 3 and wire == VARINT:
            shard = signed64(value)
        elif number == 4 and wire == VARINT:
            offset = signed64(value)
        elif number == 5 and wire == VARINT:
            size = signed64(value)
        elif number == 6 and wire == FIXED32:
            crc = value
        elif number == 7:
            partitioned = True
        else:
            raise WireError(f"field {number} (wire type {wire}) is not a BundleEntryProto's")
    if min(shard, offset, size) < 0 or any(d < 0 for d in shape):
        raise WireError("negative shard, offset, size or dimension")
    return Entry(name, dtype, shape, shard, offset, size, crc, partitioned)


def _parse_shape(buf: bytes, begin: int, stop: int) -> tuple[int, ...]:
    dims = []
    for number, wire, value in fields(buf, begin, stop):
        if number == 2 and wire == LENGTH:  # Dim: size 1, name 2
            size = 0
            for n, w, v in fields(buf, *value):
                if n == 1 and w == VARINT:
                    size = signed64(v)
            dims.append(size)
        elif number == 3 and wire == VARINT and value:
            raise WireError("a shape of unknown rank")
    return tuple(dims)


def _parse_header(buf: bytes) -> tuple[int, int, dict[int, list[int]]]:
    num_shards, endianness, version = 0, 0, {}
    for number, wire, value in fields(buf, 0, len(buf)):
        if number == 1 and wire == VARINT:
            num_shards = signed64(value)
        elif number == 2 and wire == VARINT:
            endianness = value
        elif number == 3 and wire == LENGTH:
            for n, w, v in fields(buf, *value):  # VersionDef: producer 1, min_consumer 2, bad 3
                if w == VARINT:
                    version.setdefault(n, []).append(signed64(v))
                elif w == LENGTH and n == 3:
                    version.setdefault(3, []).extend(packed_varints(buf, *v))
        else:
            raise WireError(f"field {number} (wire type {wire}) is not a BundleHeaderProto's")
    return num_shards, endianness, version


def block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """The ``(key, value)`` entries of a block's contents (trailer removed), keys expanded."""
    if len(block) < 4:
        raise WireError(f"a block of {len(block)} bytes has no restart count")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    restarts_at = len(block) - 4 - 4 * num_restarts
    if num_restarts == 0 or restarts_at < 0:
        raise WireError(f"a block of {len(block)} bytes cannot hold {num_restarts} restart points")
    restarts = set(struct.unpack_from(f"<{num_restarts}I", block, restarts_at))
    entries, key, pos, shared_at = [], b"", 0, {}
    while pos < restarts_at:
        start = pos
        shared, pos = varint(block, pos, restarts_at)
        unshared, pos = varint(block, pos, restarts_at)
        size, pos = varint(block, pos, restarts_at)
        if shared > len(key) or pos + unshared + size > restarts_at:
            raise WireError(f"the block entry at byte {start} runs past its block")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        entries.append((key, block[pos : pos + size]))
        pos += size
        shared_at[start] = shared
    if any(shared_at.get(r) != 0 for r in restarts):
        raise WireError("a restart point that is not the start of an unshared entry")
    return entries


class Bundle:
    """The index of a TF1 checkpoint, its shards checked; tensors read one at a time."""

    def __init__(self, src: str | os.PathLike):
        self.prefix = prefix_of(src)
        self.index = Path(f"{self.prefix}.index")
        if not self.index.is_file():
            raise FormatError(
                f"{self.index}: not found -- SRC must be a TensorFlow checkpoint prefix (e.g. "
                "model.ckpt-28252 for model.ckpt-28252.index and model.ckpt-28252.data-*) or a "
                "MindSpore .ckpt file"
            )
        data = self.index.read_bytes()
        try:
            header, self.entries = self._read_table(data)
        except WireError as exc:
            raise FormatError(
                f"{self.index}: not a readable TensorFlow checkpoint index ({exc}); "
                f"{_readable_prefix(data)}"
            ) from None
        self.num_shards = self._check_header(header)
        if TF2_OBJECT_GRAPH in self.entries:
            raise FormatError(
                f"{self.index}: a TensorFlow 2 object-based checkpoint (it holds "
                f"{TF2_OBJECT_GRAPH}); convert the TensorFlow 1 checkpoint (MLPerf's tf1_ckpt)"
            )
        self._check_shards()

    def _read_table(self, data: bytes) -> tuple[bytes, dict[str, Entry]]:
        if len(data) < FOOTER_SIZE or int.from_bytes(data[-8:], "little") != TABLE_MAGIC:
            raise WireError(
                f"it does not end with the table footer (magic {TABLE_MAGIC:#x}): truncated, "
                "or another kind of file"
            )
        footer = data[-FOOTER_SIZE:]
        _, pos = varint(footer, 0, 40)  # meta-index: TensorFlow's tables have no meta blocks
        _, pos = varint(footer, pos, 40)
        index_offset, pos = varint(footer, pos, 40)
        index_size, _ = varint(footer, pos, 40)
        end = len(data) - FOOTER_SIZE
        entries: dict[str, Entry] = {}
        header, previous = None, None
        for _, handle in block_entries(_block(data, index_offset, index_size, end)):
            offset, pos = varint(handle, 0, len(handle))
            size, _ = varint(handle, pos, len(handle))
            for key, value in block_entries(_block(data, offset, size, end)):
                if previous is not None and key <= previous:
                    raise WireError(f"keys out of order ({previous!r}, then {key!r})")
                previous = key
                if key == b"":
                    header = value
                    continue
                try:
                    name = key.decode("utf-8")
                except UnicodeDecodeError:
                    raise WireError(f"the key {key!r} is not UTF-8") from None
                try:
                    entries[name] = _parse_entry(value, name)
                except WireError as exc:
                    raise WireError(f"tensor {name!r}: {exc}") from None
        if header is None:
            raise WireError("no header entry (the empty key)")
        return header, entries

    def _check_header(self, header: bytes) -> int:
        try:
            num_shards, endianness, version = _parse_header(header)
        except WireError as exc:
            raise FormatError(f"{self.index}: the bundle header is not readable ({exc})") from None
        if endianness != 0:
            raise FormatError(f"{self.index}: a big-endian checkpoint, which is not read here")
        producer = version.get(1, [0])[-1]
        min_consumer = version.get(2, [0])[-1]
        if producer < 0 or min_consumer > BUNDLE_VERSION or BUNDLE_VERSION in version.get(3, []):
            raise FormatError(
                f"{self.index}: bundle format version {version}, newer than the version "
                f"{BUNDLE_VERSION} this reader follows"
            )
        if num_shards < 1:
            raise FormatError(f"{self.index}: the header says {num_shards} shards")
        return num_shards

    def shard_path(self, shard_id: int) -> Path:
        return Path(f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}")

    def _check_shards(self) -> None:
        needed: dict[int, str] = {}
        for entry in self.entries.values():
            if entry.partitioned:
                continue
            if entry.shard_id >= self.num_shards:
                raise FormatError(
                    f"{self.index}: tensor {entry.name} is in shard {entry.shard_id} of "
                    f"{self.num_shards}"
                )
            needed.setdefault(entry.shard_id, entry.name)
        missing = [i for i in sorted(needed) if not self.shard_path(i).is_file()]
        if missing:
            first = missing[0]
            raise FormatError(
                f"{self.shard_path(first)}: missing (it holds tensor {needed[first]}"
                f"{f' and {len(missing) - 1} more shards are missing' if len(missing) > 1 else ''})"
            )
        self._shard_sizes = {i: self.shard_path(i).stat().st_size for i in needed}

    def check_extent(self, entry: Entry) -> None:
        """The entry's bytes lie inside its shard (a truncated shard fails here, before reading)."""
        shard = self.shard_path(entry.shard_id)
        if entry.offset + entry.size > self._shard_sizes[entry.shard_id]:
            raise FormatError(
                f"{shard}: tensor {entry.name} ends at byte {entry.offset + entry.size}, the "
                f"shard has {self._shard_sizes[entry.shard_id]}: the shard is truncated"
            )

    def read(self, entry: Entry) -> np.ndarray:
        """The tensor's values (a fresh array), its checksum verified."""
        shard = self.shard_path(entry.shard_id)
        where = f"{shard}: tensor {entry.name}"
        if entry.partitioned:
            raise FormatError(f"{where}: a partitioned variable, which is not read here")
        numpy_dtype = DTYPES.get(entry.dtype, (None, None))[1]
        if numpy_dtype is None:
            raise FormatError(f"{where}: dtype {entry.dtype_name}, which is not read here")
        expected = int(np.prod(entry.shape, dtype=np.int64)) * np.dtype(numpy_dtype).itemsize
        if entry.size != expected:
            raise FormatError(
                f"{where}: {entry.size} bytes for shape {list(entry.shape)} of "
                f"{entry.dtype_name} ({expected} expected)"
            )
        self.check_extent(entry)
        raw = bytearray(entry.size)
        crc = 0
        with open(shard, "rb") as f:
            f.seek(entry.offset)
            view = memoryview(raw)
            for start in range(0, entry.size, _READ_CHUNK):
                chunk = view[start : start + _READ_CHUNK]
                if f.readinto(chunk) != len(chunk):
                    raise FormatError(f"{where}: the shard ends inside the tensor (truncated)")
                crc = crc32c.crc32c(chunk, crc)
        if masked_crc32c(crc) != entry.crc32c:
            raise FormatError(
                f"{where}: checksum mismatch (stored {entry.crc32c:#010x}, the bytes give "
                f"{masked_crc32c(crc):#010x}): the shard is damaged"
            )
        return np.frombuffer(raw, numpy_dtype).reshape(entry.shape)


def _block(data: bytes, offset: int, size: int, end: int) -> bytes:
    if offset + size + BLOCK_TRAILER_SIZE > end:
        raise WireError(f"a block at bytes {offset}..{offset + size} runs past the table's end")
    contents = data[offset : offset + size + 1]  # the block and its compression byte
    if contents[-1] != 0:
        raise WireError(f"a block compressed with method {contents[-1]} (TensorFlow writes none)")
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    if masked_crc32c(crc32c.crc32c(contents)) != stored:
        raise WireError(f"the block at byte {offset} fails its checksum (damaged)")
    return contents[:-1]


def _readable_prefix(data: bytes) -> str:
    """How far a damaged index reads from its start: TensorFlow writes the first data block at
    byte 0, so the entries up to the damage are still there, in order."""
    last, key, pos = None, None, 0
    try:
        while pos < len(data):
            shared, pos = varint(data, pos, len(data))
            unshared, pos = varint(data, pos, len(data))
            size, pos = varint(data, pos, len(data))
            if shared > len(key or b"") or pos + unshared + size > len(data):
                break
            new = (key or b"")[:shared] + data[pos : pos + unshared]
            value = data[pos + unshared : pos + unshared + size]
            if key is None and new != b"" or key is not None and new <= key:
                break
            if new:
                _parse_entry(value, "")
                last = new.decode("utf-8")
            else:
                _parse_header(value)
            key, pos = new, pos + unshared + size
    except (WireError, UnicodeDecodeError):
        pass
    if last is None:
        return "no tensor entry can be read from it"
    return f"its entries read up to tensor {last}, then stop"
