"""The two foreign checkpoint formats written from their specifications, for the tests only.

Independent of nbzoo: neither its reader nor its stand-in writers (nbzoo.checkpoint_formats), so
that a misunderstanding of a format shared by both cannot pass the tests. Everything is built in
memory (the tests' models are tiny).

* TensorFlow 1's tensor bundle: tensorflow/core/util/tensor_bundle/tensor_bundle.cc
  (``BundleWriter``), tensorflow/core/protobuf/tensor_bundle.proto, and the LevelDB table of
  tensorflow/core/lib/io/{table_builder,block_builder,format}.cc.
* MindSpore's ``.ckpt``: mindspore/ccsrc/utils/checkpoint.proto and ``save_checkpoint`` in
  mindspore/train/serialization.py.
* Protobuf's wire format: https://protobuf.dev/programming-guides/encoding/
"""

from __future__ import annotations

import struct
from pathlib import Path

import crc32c
import numpy as np

# tensorflow/core/framework/types.proto
TF_DATATYPE = {np.dtype("float32"): 1, np.dtype("int32"): 3, np.dtype("int64"): 9,
               np.dtype("float16"): 19}  # fmt: skip
# mindspore serialization.py: str(Tensor.dtype)
MS_TENSOR_TYPE = {np.dtype("float32"): "Float32", np.dtype("float16"): "Float16",
                  np.dtype("int32"): "Int32", np.dtype("int64"): "Int64"}  # fmt: skip


# --- protobuf wire format -----------------------------------------------------------------------


def uvarint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # int64: negatives as 64-bit two's complement
    while True:
        low = n & 0x7F
        n >>= 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb_varint(number: int, value: int) -> bytes:
    return uvarint(number << 3 | 0) + uvarint(value)


def pb_bytes(number: int, payload: bytes) -> bytes:
    return uvarint(number << 3 | 2) + uvarint(len(payload)) + payload


def pb_fixed32(number: int, value: int) -> bytes:
    return uvarint(number << 3 | 5) + struct.pack("<I", value)


# --- TensorFlow 1 tensor bundle ---------------------------------------------------------------


def masked(crc: int) -> int:
    """crc32c::Mask: rotate right by 15 bits and add a constant."""
    return ((crc >> 15 | crc << 17) + 0xA282EAD8) & 0xFFFFFFFF


def _block(entries: list[tuple[bytes, bytes]], restart_interval: int) -> bytes:
    """BlockBuilder: prefix-compressed entries, a restart point every ``restart_interval``."""
    out, restarts, previous = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        out += uvarint(shared) + uvarint(len(key) - shared) + uvarint(len(value))
        out += key[shared:] + value
        previous = key
    for r in restarts or [0]:
        out += struct.pack("<I", r)
    return bytes(out + struct.pack("<I", len(restarts or [0])))


def _with_trailer(contents: bytes) -> bytes:
    """A block on disk: contents, compression type 0, masked crc32c of both."""
    typed = contents + b"\x00"
    return typed + struct.pack("<I", masked(crc32c.crc32c(typed)))


def _handle(offset: int, size: int) -> bytes:
    return uvarint(offset) + uvarint(size)


def table(items: list[tuple[bytes, bytes]], block_size: int, restart_interval: int = 16) -> bytes:
    """A LevelDB table of sorted ``items``: data blocks cut at ``block_size`` bytes, an empty
    meta-index block, the index block (restart interval 1, as TableBuilder's), the footer."""
    out, index, pending = bytearray(), [], []

    def flush():
        contents = _block(pending, restart_interval)
        index.append((pending[-1][0], _handle(len(out), len(contents))))
        out.extend(_with_trailer(contents))
        pending.clear()

    for key, value in items:
        pending.append((key, value))
        if sum(len(k) + len(v) + 3 for k, v in pending) >= block_size:
            flush()
    if pending:
        flush()
    meta = _block([], 1)
    meta_handle = _handle(len(out), len(meta))
    out += _with_trailer(meta)
    index_block = _block(index, 1)
    index_handle = _handle(len(out), len(index_block))
    out += _with_trailer(index_block)
    footer = (meta_handle + index_handle).ljust(40, b"\x00")
    magic = 0xDB4775248B80FB57
    return bytes(out + footer + struct.pack("<II", magic & 0xFFFFFFFF, magic >> 32))


def bundle_entry(array: np.ndarray, shard: int, offset: int, crc: int) -> bytes:
    """BundleEntryProto (proto3: fields at their default are left out)."""
    shape = b"".join(pb_bytes(2, pb_varint(1, d) if d else b"") for d in array.shape)
    out = pb_varint(1, TF_DATATYPE[array.dtype]) + pb_bytes(2, shape)
    if shard:
        out += pb_varint(3, shard)
    if offset:
        out += pb_varint(4, offset)
    if array.nbytes:
        out += pb_varint(5, array.nbytes)
    return out + pb_fixed32(6, masked(crc))


def write_tf1(
    prefix: Path,
    tensors: dict[str, np.ndarray],
    num_shards: int = 1,
    block_size: int = 262144,
    restart_interval: int = 16,
) -> Path:
    """``prefix.index`` and ``prefix.data-0000i-of-0000N``, tensor i in shard i % num_shards."""
    shards = [bytearray() for _ in range(num_shards)]
    items = []
    for i, (name, array) in enumerate(tensors.items()):
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        shard = shards[i % num_shards]
        data = array.tobytes()
        items.append((name.encode(), bundle_entry(array, i % num_shards, len(shard),
                                                  crc32c.crc32c(data))))  # fmt: skip
        shard += data
    # BundleHeaderProto: num_shards 1, endianness 2 (LITTLE = 0, left out), version 3 {producer 1}
    header = pb_varint(1, num_shards) + pb_bytes(3, pb_varint(1, 1))
    items = [(b"", header)] + sorted(items)
    Path(f"{prefix}.index").write_bytes(table(items, block_size, restart_interval))
    for i, data in enumerate(shards):
        Path(f"{prefix}.data-{i:05d}-of-{num_shards:05d}").write_bytes(bytes(data))
    return prefix


# --- MindSpore .ckpt --------------------------------------------------------------------------


def ms_value(name: str, array: np.ndarray, packed_dims: bool = False, content=None) -> bytes:
    """Checkpoint.Value {tag 1, tensor 2: TensorProto {dims 1, tensor_type 2, tensor_content 3}};
    a scalar's dims are [0], as save_checkpoint writes them."""
    dims = list(array.shape) or [0]
    if packed_dims:
        dims_field = pb_bytes(1, b"".join(uvarint(d) for d in dims))
    else:  # proto2's repeated int64 is not packed
        dims_field = b"".join(pb_varint(1, d) for d in dims)
    data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
    tensor = dims_field + pb_bytes(2, MS_TENSOR_TYPE[array.dtype].encode())
    tensor += pb_bytes(3, data if content is None else content)
    return pb_bytes(1, pb_bytes(1, name.encode()) + pb_bytes(2, tensor))


def write_mindspore(
    path: Path,
    params: list[tuple[str, np.ndarray]],
    split: set[str] = frozenset(),
    packed: set[str] = frozenset(),
    model_type: str | None = None,
) -> Path:
    """A Checkpoint of ``params`` in order; a name in ``split`` is written as two consecutive
    Values with the same tag and dims, each half of the flattened data (as later MindSpore
    releases split large tensors); MindSpore 0.x's ``model_type`` (field 2) when given."""
    out = bytearray()
    for name, array in params:
        if name in split:
            data = np.ascontiguousarray(array).tobytes()
            half = (array.size // 2) * array.itemsize
            out += ms_value(name, array, name in packed, data[:half])
            out += ms_value(name, array, name in packed, data[half:])
        else:
            out += ms_value(name, array, name in packed)
    if model_type is not None:
        out += pb_bytes(2, model_type.encode())
    path.write_bytes(bytes(out))
    return path
