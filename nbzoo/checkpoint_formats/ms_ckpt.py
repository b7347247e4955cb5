"""MindSpore's ``.ckpt`` read without MindSpore.

The file is one serialized ``Checkpoint`` message (mindspore/ccsrc/utils/checkpoint.proto,
proto2)::

    message Checkpoint {
        message Value { required string tag = 1; required TensorProto tensor = 2; }
        repeated Value value = 1;
        // MindSpore 0.x (2020) also wrote: string model_type = 2;
    }
    message TensorProto {
        repeated int64 dims = 1;          // [0] for a scalar
        required string tensor_type = 2;  // "Float32", "Float16", "Int32", ...
        required bytes tensor_content = 3;
    }

``save_checkpoint`` writes one ``Value`` per parameter, ``tag`` its name, ``tensor_content`` its
values flattened in C order, little endian (``asnumpy().reshape(-1).tostring()``); later releases
split a large tensor into consecutive ``Value`` s with the same tag, which ``load_checkpoint``
concatenates -- so does this reader. The file holds no checksum. The message is walked with
:mod:`nbzoo.checkpoint_formats.protowire` over an ``mmap`` (only the fields' headers are touched),
and each tensor's bytes are read from the file when asked for: one tensor in memory at a time.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nbzoo.checkpoint_formats import FormatError
from nbzoo.checkpoint_formats.protowire import (
    LENGTH,
    VARINT,
    WireError,
    fields,
    packed_varints,
    signed64,
    varint,
)

# serialization.py's tensor_to_np_type (both spellings of the unsigned types have been used)
DTYPES = {
    "Float16": "<f2",
    "Float32": "<f4",
    "Float64": "<f8",
    "BFloat16": None,
    "Int8": "i1",
    "Int16": "<i2",
    "Int32": "<i4",
    "Int64": "<i8",
    "Uint8": "u1",
    "UInt8": "u1",
    "Uint16": "<u2",
    "UInt16": "<u2",
    "Uint32": "<u4",
    "UInt32": "<u4",
    "Uint64": "<u8",
    "UInt64": "<u8",
    "Bool": "?",
}
_ITEMSIZE = {name: (np.dtype(code).itemsize if code else 2) for name, code in DTYPES.items()}


@dataclass
class Entry:
    name: str
    dtype: str  # MindSpore's tensor_type
    shape: tuple[int, ...]
    pieces: list[tuple[int, int]] = field(default_factory=list)  # tensor_content byte ranges

    @property
    def dtype_name(self) -> str:
        return self.dtype.lower()  # numpy's spelling: float32, uint8, ...


class Checkpoint:
    """The entries of a MindSpore ``.ckpt`` (byte ranges, no tensor data read yet)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FormatError(f"{self.path}: not found")
        if self.path.stat().st_size == 0:
            raise FormatError(f"{self.path}: empty, not a MindSpore checkpoint")
        self._file = open(self.path, "rb")  # noqa: SIM115 -- closed by close()
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.entries = self._index()
        except FormatError:
            self.close()
            raise

    def close(self) -> None:
        self._map.close()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _index(self) -> dict[str, Entry]:
        buf, end = self._map, len(self._map)
        entries: dict[str, Entry] = {}
        last: Entry | None = None
        pos = 0
        try:
            for number, wire, value in fields(buf, 0, end):
                if number == 2 and wire == LENGTH:  # MindSpore 0.x's model_type
                    pos = value[1]
                    continue
                if number != 1 or wire != LENGTH:
                    raise WireError(f"field {number} (wire type {wire}) is not a Checkpoint's")
                entry = self._value(*value)
                pos = value[1]  # where the next top-level field starts
                if last is not None and entry.name == last.name:
                    if (entry.dtype, entry.shape) != (last.dtype, last.shape):
                        raise WireError(f"the slices of {entry.name} disagree on type or shape")
                    last.pieces += entry.pieces
                    continue
                if entry.name in entries:
                    raise WireError(f"{entry.name} appears twice")
                entries[entry.name] = last = entry
        except WireError as exc:
            raise FormatError(
                f"{self.path}: not a readable MindSpore checkpoint ({exc}); "
                f"{self._damage_note(pos, last)}"
            ) from None
        if not entries:
            raise FormatError(f"{self.path}: not a MindSpore checkpoint (no parameter in it)")
        for entry in entries.values():
            self._check_size(entry)
        return entries

    def _value(self, begin: int, stop: int) -> Entry:
        buf = self._map
        name, tensor = None, None
        for number, wire, value in fields(buf, begin, stop):
            if number == 1 and wire == LENGTH:
                name = _text(buf, *value)
            elif number == 2 and wire == LENGTH:
                tensor = value
            else:
                raise WireError(f"field {number} (wire type {wire}) is not a Checkpoint.Value's")
        if name is None or tensor is None:
            raise WireError(f"a parameter without {'tag' if name is None else 'tensor'}")
        dims, dtype, content = [], None, None
        try:
            for number, wire, value in fields(buf, *tensor):
                if number == 1 and wire == VARINT:
                    dims.append(signed64(value))
                elif number == 1 and wire == LENGTH:  # packed, as proto3 writers would
                    dims += [signed64(v) for v in packed_varints(buf, *value)]
                elif number == 2 and wire == LENGTH:
                    dtype = _text(buf, *value)
                elif number == 3 and wire == LENGTH:
                    content = value
                else:
                    raise WireError(f"field {number} (wire type {wire}) is not a TensorProto's")
            if dtype not in DTYPES or content is None:
                raise WireError(
                    f"tensor_type {dtype!r}" if content is not None else "no tensor_content"
                )
            if any(d < 0 for d in dims):
                raise WireError(f"dims {dims}")
        except WireError as exc:
            raise WireError(f"parameter {name}: {exc}") from None
        shape = () if dims in ([], [0]) else tuple(dims)
        return Entry(name, dtype, shape, [content])

    def _check_size(self, entry: Entry) -> None:
        size = sum(stop - begin for begin, stop in entry.pieces)
        expected = int(np.prod(entry.shape, dtype=np.int64)) * _ITEMSIZE[entry.dtype]
        if size != expected:
            raise FormatError(
                f"{self.path}: parameter {entry.name}: {size} bytes for shape "
                f"{list(entry.shape)} of {entry.dtype} ({expected} expected)"
            )

    def _damage_note(self, pos: int, last: Entry | None) -> str:
        """Which parameter the damage is in: the one whose Value starts at ``pos``, when its tag
        can still be read (a file cut inside a tensor keeps the tag in front of it)."""
        name = _tag_at(self._map, pos)
        if name is not None:
            return f"at byte {pos}, in parameter {name}"
        if last is not None:
            return f"at byte {pos}, after parameter {last.name}"
        return "no parameter can be read from it"

    def read(self, entry: Entry) -> np.ndarray:
        """The tensor's values (a fresh array)."""
        code = DTYPES[entry.dtype]
        if code is None:
            raise FormatError(
                f"{self.path}: parameter {entry.name}: {entry.dtype} is not read here"
            )
        # read from the file, not the map: mapped pages would stay in this process's memory
        raw = bytearray(sum(stop - begin for begin, stop in entry.pieces))
        view, at = memoryview(raw), 0
        for begin, stop in entry.pieces:
            self._file.seek(begin)
            if self._file.readinto(view[at : at + stop - begin]) != stop - begin:
                raise FormatError(f"{self.path}: parameter {entry.name}: the file ends inside it")
            at += stop - begin
        return np.frombuffer(raw, code).reshape(entry.shape)


def _text(buf, begin: int, stop: int) -> str:
    try:
        return bytes(buf[begin:stop]).decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"bytes {begin}..{stop} are not UTF-8 text") from None


def _tag_at(buf, pos: int) -> str | None:
    """The tag of a (possibly cut) ``Value`` whose top-level field starts at ``pos``."""
    try:
        key, p = varint(buf, pos, len(buf))
        if key != (1 << 3 | LENGTH):
            return None
        _, p = varint(buf, p, len(buf))  # the Value's length, which may run past the end
        key, p = varint(buf, p, len(buf))
        if key != (1 << 3 | LENGTH):
            return None
        length, p = varint(buf, p, len(buf))
        if p + length > len(buf):
            return None
        return _text(buf, p, p + length)
    except WireError:
        return None
