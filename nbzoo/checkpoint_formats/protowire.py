"""A reader of protobuf's wire format (https://protobuf.dev/programming-guides/encoding/), for
the few small messages of the checkpoint formats.

Why not the ``protobuf`` package: a MindSpore ``.ckpt`` is one ``Checkpoint`` message holding every
tensor, so ``ParseFromString`` needs the whole file (gigabytes for BERT-Large with its optimizer
state) in memory at once, plus the parsed copy. This reader walks a buffer -- an ``mmap`` of the
file -- field by field and hands out the byte range of each length-delimited field, so the caller
decodes one tensor at a time. The messages read here (``BundleHeaderProto``, ``BundleEntryProto``,
MindSpore's ``Checkpoint.Value`` / ``TensorProto``) need only varints, fixed32 and byte ranges, which
is all this module does; it needs no generated classes and no ``.proto`` files.
"""

from __future__ import annotations

from collections.abc import Iterator

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
_MAX_VARINT_BYTES = 10


class WireError(ValueError):
    """Bytes that are not a protobuf message (the caller adds the file and the tensor)."""


def varint(buf, pos: int, end: int) -> tuple[int, int]:
    """The unsigned varint at ``pos`` and the position after it."""
    value = shift = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= end:
            raise WireError(f"a varint runs past byte {end}")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos + i + 1
        shift += 7
    raise WireError(f"a varint at byte {pos} is longer than {_MAX_VARINT_BYTES} bytes")


def signed64(value: int) -> int:
    """An ``int64`` field's value (negative numbers are sent as 64-bit two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int | tuple[int, int]]]:
    """``(field number, wire type, value)`` for each field of the message in ``buf[start:end]``:
    an int for varint and fixed fields, ``(begin, stop)`` byte offsets for length-delimited ones."""
    pos = start
    while pos < end:
        key, pos = varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError(f"field number 0 at byte {pos}")
        if wire_type == VARINT:
            value, pos = varint(buf, pos, end)
        elif wire_type in (FIXED32, FIXED64):
            size = 4 if wire_type == FIXED32 else 8
            if pos + size > end:
                raise WireError(f"a fixed{size * 8} field runs past byte {end}")
            value = int.from_bytes(bytes(buf[pos : pos + size]), "little")
            pos += size
        elif wire_type == LENGTH:
            length, pos = varint(buf, pos, end)
            if pos + length > end:
                raise WireError(
                    f"field {number} ({length} bytes from byte {pos}) runs past byte {end}"
                )
            value = (pos, pos + length)
            pos += length
        else:  # 3 and 4 are proto2's deprecated groups, 6 and 7 do not exist
            raise WireError(f"wire type {wire_type} (field {number}) at byte {pos}")
        yield number, wire_type, value


def packed_varints(buf, begin: int, stop: int) -> list[int]:
    """The values of a packed ``repeated`` varint field."""
    values, pos = [], begin
    while pos < stop:
        value, pos = varint(buf, pos, stop)
        values.append(value)
    return values
