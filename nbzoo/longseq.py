"""Shared pieces of the long-sequence masked-LM notebooks (04 Reformer, 05 Longformer).

Model building from a preset (a tiny model from a config, or a checkpoint with config
overrides), masked-LM evaluation with its baselines (most-frequent-token accuracy and unigram
perplexity on the same masked positions), the memory / time-per-step measurement against
sequence length, and the Longformer attention pattern as a dense matrix for plotting.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nbzoo import metrics, progress
from nbzoo.device import Runtime

TINY = "tiny"  # model_name of the demo presets: built from ``model_config``, trained from scratch


# ----------------------------------------------------------------------------- models


def _token_ids(tokenizer) -> dict[str, int]:
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def reformer_config(model_config: Mapping[str, Any], tokenizer, block_size: int):
    """A ``ReformerConfig`` for masked LM over ``block_size`` tokens: bidirectional
    (``is_decoder=False``), axial position shape checked against the block size."""
    from transformers import ReformerConfig

    values = {"max_position_embeddings": block_size, **model_config, "is_decoder": False}
    values.update(_token_ids(tokenizer))
    config = ReformerConfig(**values)
    if config.axial_pos_embds and math.prod(config.axial_pos_shape) != block_size:
        raise ValueError(
            f"model_config.axial_pos_shape {list(config.axial_pos_shape)} multiplies to "
            f"{math.prod(config.axial_pos_shape)}, but Reformer trains only when it equals the "
            f"sequence length (block_size = {block_size})"
        )
    return config


def longformer_config(model_config: Mapping[str, Any], tokenizer, block_size: int):
    """A ``LongformerConfig`` for masked LM over ``block_size`` tokens (RoBERTa-style positions
    start after the padding index, hence ``+ 2``)."""
    from transformers import LongformerConfig

    values = {"max_position_embeddings": block_size + 2, "type_vocab_size": 1, **model_config}
    values.update(_token_ids(tokenizer))
    return LongformerConfig(**values)


def build_mlm_model(
    kind: str,
    model_name: str,
    model_config: Mapping[str, Any],
    tokenizer,
    block_size: int,
) -> torch.nn.Module:
    """A masked-LM model: ``model_name == "tiny"`` builds it from ``model_config``; otherwise the
    checkpoint (hub id or local path) is loaded with ``model_config`` as overrides, keeping every
    weight whose shape still fits (``ignore_mismatched_sizes``)."""
    from transformers import (
        AutoConfig,
        LongformerForMaskedLM,
        ReformerForMaskedLM,
    )

    classes = {"reformer": ReformerForMaskedLM, "longformer": LongformerForMaskedLM}
    builders = {"reformer": reformer_config, "longformer": longformer_config}
    if kind not in classes:
        raise ValueError(f"kind must be reformer or longformer; got {kind!r}")
    if model_name == TINY:
        return classes[kind](builders[kind](model_config, tokenizer, block_size))
    base = AutoConfig.from_pretrained(model_name).to_dict()
    for key in ("architectures", "transformers_version", "_name_or_path", "model_type"):
        base.pop(key, None)
    config = builders[kind]({**base, **model_config}, tokenizer, block_size)
    model, info = classes[kind].from_pretrained(
        model_name, config=config, ignore_mismatched_sizes=True, output_loading_info=True
    )
    reinit_mismatched(model, info.get("mismatched_keys", []), classes[kind](config))
    return model


def reinit_mismatched(model: torch.nn.Module, keys, fresh: torch.nn.Module) -> list[str]:
    """Give every weight whose checkpoint shape did not fit the value a fresh model starts with.

    transformers 5 leaves some of them uninitialised: with another vocabulary than the checkpoint's,
    ``lm_head.bias`` of Longformer and Reformer came back as NaN (found by ``make rehearse``), so
    the full presets trained on NaN logits."""
    names = [k if isinstance(k, str) else k[0] for k in keys]
    own, new = model.state_dict(), fresh.state_dict()
    with torch.no_grad():
        for name in names:
            if name in own and name in new and own[name].shape == new[name].shape:
                own[name].copy_(new[name])
    return names


def full_attention_twin(config) -> torch.nn.Module:
    """A standard full-attention masked LM (RoBERTa, eager softmax(QKᵀ)V) with the same width,
    depth, heads and feed-forward size as a Reformer or Longformer config, for the scaling plot."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    if config.model_type == "reformer":
        heads, hidden = config.num_attention_heads, config.hidden_size
        ffn, layers = config.feed_forward_size, len(config.attn_layers)
    else:
        heads, hidden = config.num_attention_heads, config.hidden_size
        ffn, layers = config.intermediate_size, config.num_hidden_layers
    twin = RobertaConfig(
        vocab_size=config.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=config.max_position_embeddings + 2,
        type_vocab_size=1,
        pad_token_id=config.pad_token_id,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    twin._attn_implementation = "eager"
    return RobertaForMaskedLM(twin)


def set_hash_seed(model: torch.nn.Module, seed: int | None) -> int:
    """Fix (or, with None, free) the LSH rotations of every Reformer LSH layer; returns how many
    layers were set. With the ``reformer_lsh_seeded`` patch a fixed seed gives fixed rotations
    without reseeding torch's global generator."""
    n = 0
    for module in model.modules():
        if type(module).__name__ == "LSHSelfAttention":
            module.hash_seed = seed
            n += 1
    return n


# ----------------------------------------------------------------------------- evaluation


@dataclass
class Unigram:
    """Token frequencies of the training blocks: the baselines a masked LM must beat."""

    counts: np.ndarray  # per vocabulary id, special tokens zeroed

    @classmethod
    def fit(cls, blocks: torch.Tensor, vocab_size: int, special_ids: Iterable[int]) -> Unigram:
        counts = np.bincount(blocks.flatten().numpy(), minlength=vocab_size).astype(np.float64)
        counts[list(special_ids)] = 0.0
        return cls(counts)

    @property
    def most_frequent(self) -> int:
        return int(self.counts.argmax())

    def log_probs(self) -> np.ndarray:
        """Add-one smoothed unigram log-probabilities (every token gets some mass)."""
        smoothed = self.counts + 1.0
        return np.log(smoothed / smoothed.sum())


@torch.no_grad()
def evaluate_mlm(
    model: torch.nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    rt: Runtime,
    unigram: Unigram,
    forward: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Masked-LM metrics over pre-masked batches (``labels`` = -100 where not masked):
    ``masked_token_accuracy`` (the seeds' Acc@1), ``perplexity`` (exp of the mean cross-entropy
    on masked tokens), and on the very same positions ``baseline_accuracy`` (always the training
    set's most frequent token) and ``unigram_perplexity`` (the smoothed unigram model)."""
    was_training = model.training
    model.eval()
    preds, labels_all, nll_sum, n = [], [], 0.0, 0
    for batch in progress.eval_bar(batches, "evaluate", disable=not rt.is_main):
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with rt.autocast():
            logits = (
                forward(model, rt.to_device(inputs))
                if forward
                else model(**rt.to_device(inputs)).logits
            )
        logits = logits.float().cpu()
        keep = labels != metrics.IGNORE_INDEX
        nll_sum += float(
            torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
        )
        n += int(keep.sum())
        preds.append(logits.argmax(-1).numpy())
        labels_all.append(labels.numpy())
    model.train(was_training)
    pred, lab = np.concatenate(preds), np.concatenate(labels_all)
    masked = lab[lab != metrics.IGNORE_INDEX]
    return {
        "masked_token_accuracy": metrics.masked_token_accuracy(pred, lab),
        "baseline_accuracy": metrics.masked_token_accuracy(
            np.full_like(lab, unigram.most_frequent), lab
        ),
        "perplexity": metrics.perplexity(nll_sum / n),
        "unigram_perplexity": metrics.perplexity(float(-unigram.log_probs()[masked].mean())),
        "masked_tokens": float(n),
    }


# ----------------------------------------------------------------------------- scaling


def saved_activation_bytes(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Run ``fn`` (a forward pass) and count the bytes autograd keeps for the backward pass,
    each storage once. This is the activation memory reversible layers and chunking save; it
    is measured the same way on every device (a CPU has no allocator statistics)."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[(t.device.type, storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def measure_step(
    model: torch.nn.Module, input_ids: torch.Tensor, rt: Runtime, repeats: int = 5
) -> dict[str, float]:
    """Time of one training step (forward + backward): the median of ``repeats`` steps after a
    warm-up one, with their spread (slowest - fastest), so that a busy machine shows as a wide
    spread rather than a changed figure; and the step's activation memory."""
    model.train()
    input_ids = input_ids.to(rt.device)
    labels = input_ids.clone()

    def forward():
        with rt.autocast():
            return model(input_ids=input_ids, labels=labels).loss

    loss, saved = saved_activation_bytes(forward)  # also the warm-up step
    loss.backward()
    model.zero_grad(set_to_none=True)
    rt.synchronize()
    rt.reset_peak_memory()
    seconds = []
    for _ in range(repeats):
        tick = time.perf_counter()
        forward().backward()
        rt.synchronize()
        seconds.append(time.perf_counter() - tick)
        model.zero_grad(set_to_none=True)
    row = {
        "seconds_per_step": float(np.median(seconds)),
        "seconds_spread": float(max(seconds) - min(seconds)),
        "activation_MiB": saved / 2**20,
    }
    if (peak := rt.peak_memory_bytes()) is not None:
        row["peak_MiB"] = peak / 2**20
    return row


def scaling_table(
    builders: Mapping[str, Callable[[int], torch.nn.Module]],
    seq_lengths: Sequence[int],
    rt: Runtime,
    batch_size: int = 1,
    vocab_size: int = 100,
    repeats: int = 5,
    seed: int = 0,
):
    """Memory and time per training step against sequence length, one row per (model, length).
    ``builders[name](seq_len)`` returns a fresh model for that length."""
    import pandas as pd

    rows = []
    g = torch.Generator().manual_seed(seed)
    for seq_len in seq_lengths:
        ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=g)
        for name, build in builders.items():
            torch.manual_seed(seed)
            model = build(seq_len).to(rt.device)
            rows.append(
                {"model": name, "seq_len": seq_len, **measure_step(model, ids, rt, repeats)}
            )
            del model
    return pd.DataFrame(rows)


def plot_scaling(table, title: str = "cost of one training step"):
    import matplotlib.pyplot as plt

    columns = [c for c in ("activation_MiB", "peak_MiB", "seconds_per_step") if c in table]
    fig, axes = plt.subplots(1, len(columns), figsize=(4.6 * len(columns), 3.4), squeeze=False)
    labels = {
        "activation_MiB": "activations kept for backward (MiB)",
        "peak_MiB": "peak device memory (MiB)",
        "seconds_per_step": "seconds per step",
    }
    for ax, col in zip(axes[0], columns, strict=True):
        for name, part in table.groupby("model", sort=False):
            ax.plot(part["seq_len"], part[col], marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="sequence length", title=labels[col])
        ax.set_xticks(sorted(table["seq_len"].unique()))
        ax.set_xticklabels([str(s) for s in sorted(table["seq_len"].unique())])
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- longformer


def longformer_attention_matrix(
    local: torch.Tensor, global_: torch.Tensor | None, global_index: Sequence[int], window: int
) -> np.ndarray:
    """Dense (L, L) attention weights of one head from Longformer's ``output_attentions``.

    ``local``: (L, C + window + 1) — C columns of weights to the global tokens (the first
    ``len(global_index)`` of them used, in sequence order), then the window from -window/2 to
    +window/2; ``global_``: (L, C) — the weights *of* each global token to every position
    (``global_attentions``, transposed as the model returns it); ``global_index``: the positions
    of the global tokens."""
    local = local.float().cpu().numpy()
    seq_len, half = local.shape[0], window // 2
    columns = local.shape[1] - window - 1
    dense = np.zeros((seq_len, seq_len), dtype=np.float32)
    rows = np.arange(seq_len)
    for j in range(-half, half + 1):
        keys = rows + j
        inside = (keys >= 0) & (keys < seq_len)
        dense[rows[inside], keys[inside]] += local[rows[inside], columns + half + j]
    for g, pos in enumerate(global_index):
        dense[:, pos] += local[:, g]
        if global_ is not None:
            dense[pos, :] = global_[:, g].float().cpu().numpy()
    return dense


@dataclass
class GlobalOnTokens:
    """Wraps a collator: tokens whose id is in ``token_ids`` (e.g. every ``<s>``) get global
    attention (``global_attention_mask``), as Longformer gives to task tokens."""

    collator: Callable[[list], dict]
    token_ids: tuple[int, ...]

    def __call__(self, examples: list) -> dict:
        batch = self.collator(examples)
        original = torch.stack([e["input_ids"] for e in examples])
        batch["global_attention_mask"] = torch.isin(original, torch.tensor(self.token_ids)).long()
        return batch


# ----------------------------------------------------------------------------- reformer


def axial_factors(seq_len: int) -> list[int]:
    """Two factors of ``seq_len``, as close to its square root as possible (axial positions)."""
    first = max(d for d in range(1, math.isqrt(seq_len) + 1) if seq_len % d == 0)
    return [first, seq_len // first]


def axial_parameters(config) -> dict[str, int]:
    """Position-embedding parameters: axial (as configured) against one vector per position."""
    axial = sum(
        n * d for n, d in zip(config.axial_pos_shape, config.axial_pos_embds_dim, strict=True)
    )
    return {
        "axial": axial,
        "one per position": math.prod(config.axial_pos_shape) * config.hidden_size,
    }


@torch.no_grad()
def lsh_bucket_agreement(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, float]:
    """How LSH groups similar vectors: over the LSH layers, heads and hash rounds, the share of
    pairs of positions holding the *same token* that fall into one bucket, against the share
    of all pairs (about 1 / number of buckets)."""
    captured = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: captured.append(out.buckets))
        for m in model.modules()
        if type(m).__name__ == "LSHSelfAttention"
    ]
    was_training = model.training
    try:
        model.eval()(input_ids=input_ids)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    # pairs counted from how often each value occurs (n values alike make n² - n ordered pairs):
    # the L × L comparison matrices would take 16 M entries per row at 4096 tokens
    length = input_ids.shape[-1]
    agree_same, agree_all = [], []
    for buckets in captured:  # (B, H, hashes, L), offset per hash round
        kinds = int(buckets.max()) + 1
        alike = same = together = 0
        for b, rows in enumerate(buckets.flatten(1, -2)):
            tokens = input_ids[b].to(rows.device)
            alike_tokens = _pairs_alike(tokens)
            for row in rows:
                alike += alike_tokens
                same += _pairs_alike(tokens * kinds + row)
                together += _pairs_alike(row)
        agree_same.append(same / alike if alike else float("nan"))
        agree_all.append(together / (buckets[..., 0].numel() * length * (length - 1)))
    return {
        "same token, same bucket": float(np.mean(agree_same)),
        "any two tokens, same bucket": float(np.mean(agree_all)),
    }


def _pairs_alike(values: torch.Tensor) -> int:
    """Ordered pairs (i, j), i != j, with ``values[i] == values[j]``."""
    counts = torch.unique(values, return_counts=True)[1].long()
    return int((counts * counts).sum()) - values.numel()


def reformer_at_length(config, seq_len: int) -> torch.nn.Module:
    """A fresh ``ReformerForMaskedLM`` with ``config``'s architecture for ``seq_len`` tokens:
    axial positions refactored to multiply to ``seq_len``, buckets as the paper recommends
    (about two per chunk, a power of two)."""
    from transformers import ReformerConfig, ReformerForMaskedLM

    values = config.to_dict()
    chunk = config.lsh_attn_chunk_length
    values.update(
        axial_pos_shape=axial_factors(seq_len),
        max_position_embeddings=seq_len,
        num_buckets=max(2, 2 ** (2 * seq_len // chunk).bit_length() // 2),
    )
    return ReformerForMaskedLM(ReformerConfig(**values))
