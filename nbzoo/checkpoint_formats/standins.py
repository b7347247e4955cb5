"""Stand-in checkpoints of a given ``BertForPreTraining`` in the seeds' two foreign formats, for
the rehearsal (``make rehearse``) to convert with :mod:`nbzoo.convert_checkpoint` as a lab converts
the real ones:

* :func:`write_tf1_checkpoint`: a TensorFlow 1 tensor bundle under Google's names (MLPerf's
  phase-1 ``model.ckpt-28252`` layout: one shard), with a couple of optimizer slots and
  ``global_step`` as a training checkpoint holds them; :func:`write_bert_config` its
  ``bert_config.json``.
* :func:`write_mindspore_checkpoint`: a MindSpore ``.ckpt`` under the BERT model zoo's names, with
  some of bert_thor's THOR state and the optimizer's moments.

Both follow the formats' specifications themselves (the references are in
:mod:`.tf_bundle` and :mod:`.ms_ckpt`, which only read): LevelDB blocks with restart points every
16 entries and TensorFlow's 256 KiB blocks, ``BundleEntryProto`` / ``BundleHeaderProto`` fields,
masked crc32c of every block and tensor; MindSpore's ``Checkpoint`` / ``Value`` / ``TensorProto``.
They stream: one tensor in memory at a time. Files are written under temporary names, then renamed.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import crc32c
import numpy as np

from nbzoo.checkpoint_formats.bert_names import Sizes, bert_weights

TF_BLOCK_SIZE = 262144  # tensorflow/core/lib/io/table_options.h
TF_RESTART_INTERVAL = 16
TF_FLOAT, TF_INT64 = 1, 9  # types.proto
TABLE_MAGIC = 0xDB4775248B80FB57
# transformers activation -> Google's bert_config.json name (Google's "gelu" is the tanh form)
GOOGLE_ACTIVATIONS = {"gelu_new": "gelu", "gelu": "gelu", "relu": "relu", "tanh": "tanh"}


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _uint(number: int, value: int) -> bytes:
    return _key(number, 0) + _varint(value) if value else b""  # proto3 leaves defaults out


def _sub(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint(len(payload)) + payload


def _mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --- Google's bert_config.json --------------------------------------------------------------


def google_config(config) -> dict:
    """Google's ``bert_config.json`` of a transformers ``BertConfig``."""
    return {
        "attention_probs_dropout_prob": config.attention_probs_dropout_prob,
        "hidden_act": GOOGLE_ACTIVATIONS.get(config.hidden_act, config.hidden_act),
        "hidden_dropout_prob": config.hidden_dropout_prob,
        "hidden_size": config.hidden_size,
        "initializer_range": config.initializer_range,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "type_vocab_size": config.type_vocab_size,
        "vocab_size": config.vocab_size,
    }


def write_bert_config(config, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(google_config(config), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def _rows(model):
    c = model.config
    sizes = Sizes(c.vocab_size, c.hidden_size, c.num_hidden_layers, c.intermediate_size,
                  c.max_position_embeddings, c.type_vocab_size)  # fmt: skip
    return bert_weights(sizes), model.state_dict()


def _array(tensor) -> np.ndarray:
    return tensor.detach().to("cpu").float().numpy()


# --- TensorFlow 1 tensor bundle -------------------------------------------------------------


class _TableWriter:
    """LevelDB's TableBuilder for sorted keys, uncompressed, as TensorFlow writes bundle indexes."""

    def __init__(self, f):
        self.f, self.offset = f, 0
        self.pending: list[tuple[bytes, bytes]] = []
        self.pending_bytes = 0
        self.index: list[tuple[bytes, bytes]] = []

    def add(self, key: bytes, value: bytes) -> None:
        self.pending.append((key, value))
        self.pending_bytes += len(key) + len(value) + 3
        if self.pending_bytes >= TF_BLOCK_SIZE:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            handle = self._write_block(self.pending, TF_RESTART_INTERVAL)
            self.index.append((self.pending[-1][0], handle))  # a key >= the block's last
            self.pending, self.pending_bytes = [], 0

    def _write_block(self, entries, restart_interval: int) -> bytes:
        body, restarts, previous = bytearray(), [0], b""
        for i, (key, value) in enumerate(entries):
            shared = 0
            if i and i % restart_interval == 0:
                restarts.append(len(body))
            elif i:
                limit = min(len(key), len(previous))
                while shared < limit and key[shared] == previous[shared]:
                    shared += 1
            body += _varint(shared) + _varint(len(key) - shared) + _varint(len(value))
            body += key[shared:] + value
            previous = key
        body += struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))
        typed = bytes(body) + b"\x00"  # compression type: none
        self.f.write(typed + struct.pack("<I", _mask(crc32c.crc32c(typed))))
        handle = _varint(self.offset) + _varint(len(body))
        self.offset += len(typed) + 4
        return handle

    def finish(self) -> None:
        self._flush()
        meta_handle = self._write_block([], 1)
        index_handle = self._write_block(self.index, 1)
        footer = (meta_handle + index_handle).ljust(40, b"\x00")
        self.f.write(footer + struct.pack("<Q", TABLE_MAGIC))


def _little_endian(array: np.ndarray) -> np.ndarray:
    """C order, little endian: the bytes both formats store (no copy when already so)."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


def _bundle_entry(dtype: int, data: np.ndarray, offset: int) -> bytes:
    dims = b"".join(_sub(2, _uint(1, d)) for d in data.shape)  # TensorShapeProto.dim {size}
    fixed32 = _key(6, 5) + struct.pack("<I", _mask(crc32c.crc32c(data)))
    return _uint(1, dtype) + _sub(2, dims) + _uint(4, offset) + _uint(5, data.nbytes) + fixed32


def write_tf1_checkpoint(
    model,
    prefix: str | os.PathLike,
    slots: tuple[str, ...] = ("adam_m", "adam_v"),
    slot_count: int = 2,
    global_step: int = 28252,
) -> Path:
    """``prefix.index`` + ``prefix.data-00000-of-00001``: the model's weights under Google's
    names (kernels ``[in, out]``), the first ``slot_count`` weights' ``slots`` (zeros) and
    ``global_step``."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    rows, state = _rows(model)
    data_path = Path(f"{prefix}.data-00000-of-00001")
    tmp_data = data_path.with_name(f".{data_path.name}.tmp-{os.getpid()}")
    entries: dict[str, bytes] = {}
    offset = 0
    with open(tmp_data, "wb") as f:

        def add(name: str, array: np.ndarray, dtype: int) -> None:
            nonlocal offset
            data = _little_endian(array)
            entries[name] = _bundle_entry(dtype, data, offset)
            f.write(data.data)
            offset += data.nbytes

        for i, row in enumerate(rows):
            array = _array(state[row.hf])
            array = array.T if row.tf_transposed else array
            add(row.google, array, TF_FLOAT)
            for slot in slots if i < slot_count else ():
                add(f"{row.google}/{slot}", np.zeros_like(array), TF_FLOAT)
        add("global_step", np.array(global_step, dtype=np.int64), TF_INT64)
    os.replace(tmp_data, data_path)
    index_path = Path(f"{prefix}.index")
    tmp_index = index_path.with_name(f".{index_path.name}.tmp-{os.getpid()}")
    with open(tmp_index, "wb") as f:
        table = _TableWriter(f)
        # BundleHeaderProto: num_shards 1, endianness LITTLE (0, left out), version {producer 1}
        table.add(b"", _uint(1, 1) + _sub(3, _uint(1, 1)))
        for name in sorted(entries):
            table.add(name.encode("utf-8"), entries[name])
        table.finish()
    os.replace(tmp_index, index_path)
    return prefix


# --- MindSpore .ckpt ------------------------------------------------------------------------

_MS_TYPES = {np.dtype("float32"): "Float32", np.dtype("float16"): "Float16",
             np.dtype("int32"): "Int32"}  # fmt: skip


def _ms_value_header(name: str, array: np.ndarray, content_size: int) -> bytes:
    """A ``Checkpoint.Value`` up to its ``tensor_content`` bytes, which follow it."""
    dims = b"".join(_key(1, 0) + _varint(d) for d in (array.shape or (0,)))  # not packed (proto2)
    tensor_head = dims + _sub(2, _MS_TYPES[array.dtype].encode())
    tensor_head += _key(3, 2) + _varint(content_size)
    tensor_size = len(tensor_head) + content_size
    value_head = _sub(1, name.encode("utf-8")) + _key(2, 2) + _varint(tensor_size)
    return _key(1, 2) + _varint(len(value_head) + tensor_size) + value_head + tensor_head


def write_mindspore_checkpoint(model, path: str | os.PathLike, thor_state: bool = True) -> Path:
    """A MindSpore ``.ckpt`` of the model under the BERT model zoo's names (``[out, in]`` like
    torch), then -- with ``thor_state`` -- bert_thor's first THOR layer state (``matrix_A_inv``,
    ``matrix_G_inv`` in float16, ``cov_step``) and the optimizer's ``moments.`` copy of the first
    weight, as a training checkpoint of the seed holds them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, state = _rows(model)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:

        def add(name: str, array: np.ndarray) -> None:
            data = _little_endian(array)
            f.write(_ms_value_header(name, array, data.nbytes))
            f.write(data.data)

        for row in rows:
            add(row.mindspore, _array(state[row.hf]))
        if thor_state:
            first = next(r for r in rows if r.mindspore.endswith("query_layer.weight"))
            cell = first.mindspore.removesuffix(".weight")
            out_size, in_size = first.shape
            add(f"{cell}.matrix_A_inv", np.zeros((in_size, in_size), np.float16))
            add(f"{cell}.matrix_G_inv", np.zeros((out_size, out_size), np.float16))
            add(f"{cell}.cov_step", np.zeros((1,), np.int32))
            add(f"moments.{rows[0].mindspore}", np.zeros(rows[0].shape, np.float32))
    os.replace(tmp, path)
    return path
