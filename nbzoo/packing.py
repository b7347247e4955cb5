"""Sequence packing: whole sequences side by side in rows of ``max_length`` instead of padding.

A batch of short sentences padded to ``max_length`` spends most of its compute on padding (SST-2
at 128: ~90 % of the tokens). Packing puts several whole sequences into one row and keeps them
apart inside the model:

- **which sequences share a row**: :func:`spfhp`, the shortest-pack-first histogram packing of
  Krell et al., "Efficient Sequence Packing without Cross-contamination" (Graphcore, 2021,
  arXiv:2107.02027), written here from the paper's description of the algorithm: lengths are
  taken longest first, each length's sequences go into the open packs with the *least* room
  that still fits them, a whole histogram bin at a time, and new packs open only where none
  fits. (transformers' ``DataCollatorWithFlattening`` concatenates a batch into one row for
  decoder models with FlashAttention; it neither bins nor supports encoders' pooled heads.)
- **attention stays inside each sequence**: every token carries its sequence's number in its
  row (``sequence_ids``, 0 for the padding at a row's end); the patches in ``patches/*_packed.py``
  turn it into a block-diagonal mask (:func:`attention_mask_for`): a boolean mask for SDPA (and
  an additive one for eager attention), or a FlexAttention document mask on GPUs.
- **positions restart per sequence** (``position_ids``), token types are kept per token.
- **per-sequence heads**: ``cls_positions`` (flat indices of each sequence's first token) give
  the classification / NSP heads one pooled vector per sequence, in packed order; ``labels`` of
  sequence-level tasks and ``next_sentence_label`` are in that order too (``packed_order`` maps
  them back to the batch).

Training stays equivalent to the padded run: :class:`PackedCollator` packs the *same* sentences
the padded run would put into one optimizer step, and the losses are the same means (over
sequences for classification and NSP, over labelled tokens for MLM), so logits, loss and
gradients agree with the padded batch's to float rounding (tests/test_packing.py).

The notebooks' ``packing`` knob (:func:`mode`) picks one of :data:`MODES`:

- ``plain``: each step's sentences in the sampler's order, packed into rows of ``max_length``;
- ``length``: each step's sentences grouped by length within a window of steps
  (``nbzoo.length_grouping``, as transformers' ``group_by_length``), laid end to end in one row
  (:func:`one_row`) and attended each alone (:mod:`nbzoo.varlen_attention`): the projections and
  feed-forward layers run on the real tokens only, attention on each sentence padded to the
  step's longest. Still whole sentences, still the mean over the step's sentences, each sentence
  once per epoch: what changes is which sentences share a step;
- ``off``: padded batches.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nbzoo import varlen_attention

IGNORE_INDEX = -100
PACKING_KEYS = ("sequence_ids", "cls_positions", "packed_order")
MODES = ("off", "plain", "length")
ROW_MULTIPLE = 8  # a length-packed row is a multiple of this long, as stock's pad_to_multiple_of=8


def mode(cfg: Any) -> str:
    """The ``packing`` knob of a notebook's configuration: one of :data:`MODES` (``off`` where the
    notebook has no such knob, as 02 calling 01's training). ``true`` / ``false``, the knob's
    spelling before ``length`` existed, are refused with the new names: ``true`` was ``plain``,
    but a bare ``true`` now reads as "pack" and the best packing is ``length``."""
    value = cfg.get("packing", "off") if hasattr(cfg, "get") else getattr(cfg, "packing", "off")
    if isinstance(value, bool):
        raise ValueError(
            f"packing = {str(value).lower()}: the knob now names the mode, one of "
            f"{', '.join(MODES)} (true was plain, false off; length is the fastest)"
        )
    if value not in MODES:
        raise ValueError(f"packing must be one of {', '.join(MODES)}; got {value!r}")
    return value


def spfhp(
    lengths: Sequence[int], max_length: int, max_sequences_per_pack: int | None = None
) -> list[list[int]]:
    """Shortest-pack-first histogram packing: the indices of ``lengths`` grouped into packs whose
    lengths sum to at most ``max_length``, each pack at most ``max_sequences_per_pack`` long.

    Works on the histogram: all sequences of one length are placed together, so the cost grows
    with the number of distinct lengths times the number of distinct remaining spaces, not with
    the number of sequences. Where no open pack fits, the new packs take as many sequences of the
    length as fit (see the comment below: a change to the paper's step). Packs are returned in
    the order they were opened; inside a pack the sequences are in the order they were added
    (longest first)."""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    if max_sequences_per_pack is not None and max_sequences_per_pack < 1:
        raise ValueError(f"max_sequences_per_pack must be at least 1, got {max_sequences_per_pack}")
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        n = int(n)
        if not 1 <= n <= max_length:
            raise ValueError(
                f"sequence {i} has length {n}; packing needs 1 <= length <= {max_length}"
            )
        by_length.setdefault(n, []).append(i)
    packs: list[list[int]] = []
    # open packs grouped by the room they have left; `spaces` is the sorted list of keys
    open_by_space: dict[int, list[int]] = {}  # room -> pack numbers (into `packs`)
    spaces: list[int] = []

    def add_open(room: int, pack_ids: list[int]) -> None:
        if room <= 0 or not pack_ids:
            return
        if room not in open_by_space:
            open_by_space[room] = []
            bisect.insort(spaces, room)
        open_by_space[room].extend(pack_ids)

    for length in sorted(by_length, reverse=True):
        todo = by_length[length]
        while todo:
            at = bisect.bisect_left(spaces, length)
            if at == len(spaces):
                # Nothing open fits: open new packs. Each takes as many sequences of this length
                # as fit (the paper opens one per sequence, which for a bin of many equal short
                # lengths -- a batch of GLUE sentences -- leaves each alone in its row).
                per_pack = max_length // length
                if max_sequences_per_pack is not None:
                    per_pack = min(per_pack, max_sequences_per_pack)
                for start in range(0, len(todo), per_pack):
                    chunk = todo[start : start + per_pack]
                    packs.append(list(chunk))
                    if max_sequences_per_pack is None or len(chunk) < max_sequences_per_pack:
                        add_open(max_length - length * len(chunk), [len(packs) - 1])
                todo = []
                break
            room = spaces[at]  # the fullest open packs that still fit this length
            group = open_by_space[room]
            take = min(len(group), len(todo))
            chosen, open_by_space[room] = group[:take], group[take:]
            if not open_by_space[room]:
                del open_by_space[room]
                spaces.pop(at)
            for pack_id, seq in zip(chosen, todo[:take], strict=True):
                packs[pack_id].append(seq)
            todo = todo[take:]
            if max_sequences_per_pack is not None:
                chosen = [p for p in chosen if len(packs[p]) < max_sequences_per_pack]
            add_open(room - length, chosen)
    return packs


def one_row(
    lengths: Sequence[int], max_length: int, multiple: int = ROW_MULTIPLE
) -> tuple[int, list[list[int]]]:
    """(row length, packs) of a batch laid end to end in one row, rounded up to ``multiple``:
    for attention given the sequences' boundaries, where no row length limits a sequence's
    attention. Each sequence is still at most ``max_length`` long."""
    if not lengths:
        raise ValueError("cannot pack an empty batch")
    for i, n in enumerate(lengths):
        if not 1 <= int(n) <= max_length:
            raise ValueError(
                f"sequence {i} has length {n}; packing needs 1 <= length <= {max_length}"
            )
    total = sum(int(n) for n in lengths)
    return -(-total // multiple) * multiple, [list(range(len(lengths)))]


def padding_fraction(lengths: Sequence[int], max_length: int) -> float:
    """Share of the tokens of a batch padded to ``max_length`` that are padding."""
    return 1.0 - sum(lengths) / (len(lengths) * max_length) if lengths else 0.0


def packed_padding_fraction(lengths: Sequence[int], max_length: int) -> float:
    """Share of padding left after :func:`spfhp` packs ``lengths`` into rows of ``max_length``."""
    if not lengths:
        return 0.0
    rows = len(spfhp(lengths, max_length))
    return 1.0 - sum(lengths) / (rows * max_length)


# ----------------------------------------------------------------------------- batches


def _lengths(items: Sequence[Mapping[str, torch.Tensor]]) -> list[int]:
    out = []
    for item in items:
        mask = item.get("attention_mask")
        out.append(int(mask.sum()) if mask is not None else int(item["input_ids"].numel()))
    return out


@dataclass(frozen=True)
class PackedCollator:
    """A ``collate_fn`` that packs a list of padded or unpadded items (dicts of 1-D tensors as
    ``EncodedGlue`` gives: ``input_ids``, ``attention_mask``, ``token_type_ids``, a scalar
    ``labels``) into rows of ``max_length`` with :func:`spfhp`.

    Token-level keys (``token_labels``: e.g. MLM ``labels`` of shape (seq,)) are packed along
    with the tokens, padding with -100; sequence-level keys (``sequence_labels``: scalars, e.g.
    ``labels`` for classification, ``next_sentence_label``) become 1-D tensors in packed order.
    Padding tokens get ``pad_token_id`` and sequence id 0.

    Rows are ``max_length`` long, or with ``one_row`` the whole batch is one row, end to end (a
    multiple of ``row_multiple`` long, token types zero where the items have none: a model's own
    zeros stop at its position table), for attention that takes the sequences' boundaries
    instead of a mask (:mod:`nbzoo.varlen_attention`)."""

    max_length: int
    pad_token_id: int = 0
    token_labels: tuple[str, ...] = ()
    sequence_labels: tuple[str, ...] = ("labels",)
    max_sequences_per_pack: int | None = None
    one_row: bool = False
    row_multiple: int = ROW_MULTIPLE

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {self.max_length}")
        clash = set(self.token_labels) & set(self.sequence_labels)
        if clash:
            raise ValueError(f"{sorted(clash)} cannot be both token and sequence labels")

    def __call__(self, items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot pack an empty batch")
        lengths = _lengths(items)
        if self.one_row:
            width, packs = one_row(lengths, self.max_length, self.row_multiple)
        else:
            width = self.max_length
            packs = spfhp(lengths, width, self.max_sequences_per_pack)
        rows = len(packs)
        has_types = "token_type_ids" in items[0]
        write_types = has_types or self.one_row
        input_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        token_types = torch.zeros((rows, width), dtype=torch.long)
        positions = torch.zeros((rows, width), dtype=torch.long)
        sequence_ids = torch.zeros((rows, width), dtype=torch.long)
        token_out = {
            k: torch.full((rows, width), IGNORE_INDEX, dtype=torch.long) for k in self.token_labels
        }
        order, cls_positions = [], []
        for r, pack in enumerate(packs):
            at = 0
            for n_in_row, i in enumerate(pack, 1):
                n, item = lengths[i], items[i]
                # right padding (EncodedGlue, tokenizers' default): the real tokens come first
                input_ids[r, at : at + n] = item["input_ids"][:n]
                if has_types:
                    token_types[r, at : at + n] = item["token_type_ids"][:n]
                positions[r, at : at + n] = torch.arange(n)
                sequence_ids[r, at : at + n] = n_in_row
                for k in self.token_labels:
                    token_out[k][r, at : at + n] = item[k][:n]
                cls_positions.append(r * width + at)
                order.append(i)
                at += n
        batch: dict[str, torch.Tensor] = {
            "input_ids": input_ids,
            "position_ids": positions,
            "sequence_ids": sequence_ids,
            "cls_positions": torch.tensor(cls_positions, dtype=torch.long),
            "packed_order": torch.tensor(order, dtype=torch.long),
        }
        if write_types:
            batch["token_type_ids"] = token_types
        batch.update(token_out)
        for k in self.sequence_labels:
            if k in items[0]:
                batch[k] = torch.stack([torch.as_tensor(items[i][k]) for i in order])
        return batch


def is_packed(batch: Mapping[str, Any]) -> bool:
    return "sequence_ids" in batch


# ----------------------------------------------------------------------------- inside the model


def attention_mask_for(
    sequence_ids: torch.Tensor, implementation: str, dtype: torch.dtype = torch.float32
) -> Any:
    """The 4-D mask that keeps attention inside each packed sequence, in the form the model's
    attention ``implementation`` takes (transformers passes a 4-D mask through unchanged):

    - ``sdpa``: boolean (rows, 1, L, L), True where attention is allowed;
    - ``eager``: additive, 0 where allowed and the dtype's minimum elsewhere;
    - ``flex_attention``: a FlexAttention ``BlockMask`` with a document mask (GPUs: blocks
      wholly outside every sequence are skipped, not computed and masked).

    Padding tokens (sequence id 0) attend to each other only, so no row is fully masked. A batch
    on the host whose rows each hold one sequence without padding gets None (no mask)."""
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        ids = sequence_ids

        def same_sequence(b, h, q, kv):
            return ids[b, q] == ids[b, kv]

        rows, length = sequence_ids.shape
        return create_block_mask(
            same_sequence, rows, None, length, length, device=str(sequence_ids.device)
        )
    if implementation in ("sdpa", "eager") and not sequence_ids.is_cuda:
        # Every row one whole sequence, no padding (full-length batches): nothing to mask, and
        # SDPA without a mask is faster. Checked only on the host, where it costs no sync.
        if bool((sequence_ids == 1).all()):
            return None
    same = (sequence_ids[:, :, None] == sequence_ids[:, None, :])[:, None]
    if implementation == "eager":
        return torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill(
            ~same, torch.finfo(dtype).min
        )
    if implementation == "sdpa":
        return same
    raise ValueError(
        f"packing supports attention implementations sdpa, eager and flex_attention; the model "
        f"uses {implementation!r}"
    )


def pop_packing(kwargs: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Take ``sequence_ids`` and ``cls_positions`` out of a forward's kwargs (``packed_order``
    is dropped: it is for the caller). Returns (None, None) for an ordinary batch."""
    kwargs.pop("packed_order", None)
    return kwargs.pop("sequence_ids", None), kwargs.pop("cls_positions", None)


def model_attention(model, sequence_ids: torch.Tensor, attention_mask: Any = None) -> dict:
    """What a packed forward passes its encoder to keep the sequences apart, in ``model``'s
    attention implementation: ``attention_mask`` (:func:`attention_mask_for`, in the model's
    dtype), or for :mod:`nbzoo.varlen_attention` no mask but the sequences' boundaries. A packed
    batch carries ``sequence_ids`` instead of an ``attention_mask``: one given beside them is
    refused."""
    if attention_mask is not None:
        raise ValueError("a packed batch carries sequence_ids instead of an attention_mask")
    implementation = model.config._attn_implementation
    if implementation == varlen_attention.NAME:
        cu_seq_lens, longest = varlen_attention.boundaries(sequence_ids)
        return {"attention_mask": None, "cu_seq_lens": cu_seq_lens, "max_seq_len": longest}
    return {"attention_mask": attention_mask_for(sequence_ids, implementation, model.dtype)}


def gather_sequences(hidden: torch.Tensor, cls_positions: torch.Tensor) -> torch.Tensor:
    """(rows, L, H) hidden states → (sequences, H): each packed sequence's first token."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat.index_select(0, cls_positions.to(hidden.device))


ATTENTIONS = ("sdpa", "eager", "flex_attention", varlen_attention.NAME)


def attention_implementation(
    device_kind: str, requested: str = "auto", mode: str = "plain", compiled: bool = True
) -> str:
    """The attention a packed batch is trained with. ``auto``: for ``length`` packing (one row a
    step) :mod:`nbzoo.varlen_attention`, each sequence attended alone; for ``plain`` rows a
    block-diagonal mask: FlexAttention's document mask on CUDA under ``torch.compile``
    (uncompiled it runs unfused), SDPA's boolean mask elsewhere. :data:`varlen_attention.NAME`
    is registered with transformers when chosen."""
    if requested == "auto":
        if mode == "length":
            requested = varlen_attention.NAME
        elif device_kind == "cuda" and compiled:
            try:
                from torch.nn.attention import flex_attention  # noqa: F401
            except ImportError:
                return "sdpa"
            return "flex_attention"
        else:
            return "sdpa"
    if requested not in ATTENTIONS:
        raise ValueError(
            f"packing attention must be auto or one of {', '.join(ATTENTIONS)}; got {requested!r}"
        )
    if requested == "flex_attention" and device_kind == "cpu":
        # torch 2.13's compiled CPU FlexAttention gives logits 0.3 off with one thread on an
        # AVX2-only CPU (found by CI's AVX2 run): refused rather than silently wrong
        raise ValueError(
            "packing attention flex_attention is not used on a CPU (torch's CPU kernel is wrong "
            "on some CPUs); take sdpa, the same block-diagonal mask"
        )
    if requested == varlen_attention.NAME:
        varlen_attention.register()
    return requested


def sequence_classification_loss(
    model: torch.nn.Module, logits: torch.Tensor, labels: torch.Tensor
):
    """transformers' loss of ``*ForSequenceClassification`` (problem type chosen as upstream
    chooses it), here over the packed sequences: a mean over sequences, as over a padded batch."""
    from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss

    config, num_labels = model.config, model.num_labels
    labels = labels.to(logits.device)
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif num_labels > 1 and labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        if num_labels == 1:
            return MSELoss()(logits.squeeze(), labels.squeeze())
        return MSELoss()(logits, labels)
    if config.problem_type == "single_label_classification":
        return CrossEntropyLoss()(logits.view(-1, num_labels), labels.view(-1))
    return BCEWithLogitsLoss()(logits, labels)


PATCHES = {  # model class -> the patch that teaches its forward packed batches
    "AlbertForSequenceClassification": "albert_packed_sequences",
    "RobertaForSequenceClassification": "roberta_packed_sequences",
    "BertForPreTraining": "bert_pretraining_packed",
}


def patch_for(model: torch.nn.Module) -> str:
    """The packing patch of ``model``'s class; a clear error for a class packing cannot serve."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    name = type(model).__name__
    if name not in PATCHES:
        raise ValueError(
            f"packing supports {', '.join(sorted(PATCHES))}; this model is a {name}: "
            "set packing = false"
        )
    return PATCHES[name]


LENGTH_ATTENTION = {"length": varlen_attention.NAME}  # packing mode -> the attention it needs


@contextlib.contextmanager
def attention_set(
    model: torch.nn.Module, attention: str | None, device_kind: str | None = None
) -> Iterator[None]:
    """``model``'s attention set to ``attention`` (:func:`attention_implementation`'s names) for
    the duration of a block, the one it had after; nothing where ``attention`` is None."""
    if attention is None:
        yield
        return
    inner = getattr(model, "module", model)  # DistributedDataParallel
    before = inner.config._attn_implementation
    inner.set_attn_implementation(attention_implementation(device_kind or "cpu", attention))
    try:
        yield
    finally:
        inner.set_attn_implementation(before)


@contextlib.contextmanager
def packed_training(
    model: torch.nn.Module, device_kind: str | None = None, attention: str | None = None
) -> Iterator[str]:
    """Apply ``model``'s packing patch for the duration of a block (and :func:`attention_set`
    with ``attention``); yields the patch's name."""
    from nbzoo import patching

    name = patch_for(model)
    with (
        patching.applied(name, device_kind=device_kind),
        attention_set(model, attention, device_kind),
    ):
        yield name


@dataclass(frozen=True)
class MLPerfPackedCollator:
    """Packs MLPerf pre-training samples (the records' features, padded to the shard's sequence
    length: ``input_ids``, ``input_mask``, ``segment_ids``, ``masked_lm_positions`` / ``_ids`` /
    ``_weights``, ``next_sentence_labels``) unpadded to their real lengths into rows of
    ``max_length``. Masked positions become flat indices into the packed rows; the masked-LM ids
    and weights are kept for every prediction slot (weight 0 where the sample had fewer
    predictions), so the weighted mean over the batch is the padded batch's."""

    max_length: int | None = None  # None: the samples' own (padded) length
    one_row: bool = False  # the batch end to end in one row (see PackedCollator)
    row_multiple: int = ROW_MULTIPLE

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [int(s["input_mask"].sum()) for s in samples]
        width = self.max_length or len(samples[0]["input_ids"])
        if self.one_row:
            width, packs = one_row(lengths, width, self.row_multiple)
        else:
            packs = spfhp(lengths, width)
        rows = len(packs)
        input_ids = torch.zeros((rows, width), dtype=torch.long)
        segments = torch.zeros((rows, width), dtype=torch.long)
        positions = torch.zeros((rows, width), dtype=torch.long)
        sequence_ids = torch.zeros((rows, width), dtype=torch.long)
        cls, masked_positions, masked_ids, masked_weights, nsp = [], [], [], [], []
        for r, pack in enumerate(packs):
            at = 0
            for n_in_row, i in enumerate(pack, 1):
                n, s = lengths[i], samples[i]
                input_ids[r, at : at + n] = torch.as_tensor(s["input_ids"][:n])
                segments[r, at : at + n] = torch.as_tensor(s["segment_ids"][:n])
                positions[r, at : at + n] = torch.arange(n)
                sequence_ids[r, at : at + n] = n_in_row
                cls.append(r * width + at)
                masked_positions.append(torch.as_tensor(s["masked_lm_positions"]) + r * width + at)
                masked_ids.append(torch.as_tensor(s["masked_lm_ids"]))
                masked_weights.append(torch.as_tensor(s["masked_lm_weights"]))
                nsp.append(torch.as_tensor(s["next_sentence_labels"]).reshape(-1)[:1])
                at += n
        return {
            "input_ids": input_ids,
            "segment_ids": segments,
            "position_ids": positions,
            "sequence_ids": sequence_ids,
            "cls_positions": torch.tensor(cls, dtype=torch.long),
            "masked_lm_positions": torch.cat(masked_positions),
            "masked_lm_ids": torch.cat(masked_ids),
            "masked_lm_weights": torch.cat(masked_weights),
            "next_sentence_labels": torch.cat(nsp),
        }
