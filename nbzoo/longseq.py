"""Shared pieces of the long-sequence masked-LM notebooks (04 Reformer, 05 Longformer).

Model building from a preset (a tiny model from a config, or a checkpoint with config
overrides), masked-LM evaluation with its baselines (most-frequent-token accuracy and unigram
perplexity on the same masked positions, with their standard errors), the memory / time-per-step
measurement against sequence length with its verdicts (:func:`crossover`), the Longformer
attention pattern as a dense matrix for plotting, and its one-graph capture
(:func:`compile_whole`). Reformer's ideas one by one: :mod:`nbzoo.lsh` and
:mod:`nbzoo.reformer_costs`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nbzoo import metrics, progress, verdicts
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
    _check_buckets(values.get("num_buckets"))
    config = ReformerConfig(**values)
    if config.axial_pos_embds and math.prod(config.axial_pos_shape) != block_size:
        raise ValueError(
            f"model_config.axial_pos_shape {list(config.axial_pos_shape)} multiplies to "
            f"{math.prod(config.axial_pos_shape)}, but Reformer trains only when it equals the "
            f"sequence length (block_size = {block_size})"
        )
    return config


def _check_buckets(num_buckets: Any) -> None:
    """LSH hashes by a rotation into +-b/2 directions: every bucket count must be even."""
    if num_buckets is None:  # the config's default
        return
    factors = num_buckets if isinstance(num_buckets, list | tuple) else [num_buckets]
    if not factors or not all(isinstance(b, int) and b >= 2 and b % 2 == 0 for b in factors):
        raise ValueError(
            f"num_buckets must be an even number >= 2 (or a list of them, a factorised hash), "
            f"got {num_buckets!r}"
        )


def longformer_config(model_config: Mapping[str, Any], tokenizer, block_size: int):
    """A ``LongformerConfig`` for masked LM over ``block_size`` tokens (RoBERTa-style positions
    start after the padding index, hence ``+ 2``)."""
    from transformers import LongformerConfig

    window = model_config.get("attention_window")
    windows = window if isinstance(window, list | tuple) else [window]
    if window is not None and not all(
        isinstance(w, int) and w >= 2 and w % 2 == 0 for w in windows
    ):
        raise ValueError(
            f"attention_window must be an even number >= 2 (w/2 tokens on each side), got {window!r}"
        )
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


def unigram_perplexity(
    batches: Sequence[Mapping[str, torch.Tensor]], unigram: Unigram
) -> verdicts.Estimate:
    """The unigram model's perplexity on the masked positions of ``batches``, with its standard
    error: exp of the mean negative log-likelihood m over n tokens, whose standard error
    sd / sqrt(n) carries to the perplexity as exp(m) * sd / sqrt(n) (the delta method)."""
    labels = torch.cat([b["labels"].flatten() for b in batches]).numpy()
    nll = -unigram.log_probs()[labels[labels != metrics.IGNORE_INDEX]]
    if nll.size < 2:
        raise ValueError("the test batches hold fewer than two masked tokens")
    value = math.exp(float(nll.mean()))
    se = value * float(nll.std(ddof=1)) / math.sqrt(nll.size)
    return verdicts.Estimate(
        "the unigram model", value, "perplexity", int(nll.size), standard_error=se
    )


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
    on masked tokens, with its ``perplexity_standard_error``), and on the very same positions
    ``baseline_accuracy`` (always the training set's most frequent token) and
    ``unigram_perplexity`` (the smoothed unigram model)."""
    was_training = model.training
    model.eval()
    preds, labels_all, nll_sum, nll_squares, n = [], [], 0.0, 0.0, 0
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
        nll = torch.nn.functional.cross_entropy(
            logits[keep], labels[keep], reduction="none"
        ).double()
        nll_sum += float(nll.sum())
        nll_squares += float((nll * nll).sum())
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
        # the delta method: exp(mean) * sd / sqrt(n), as for the unigram model's
        "perplexity_standard_error": metrics.perplexity(nll_sum / n)
        * math.sqrt(max(nll_squares / n - (nll_sum / n) ** 2, 0.0) * n / max(n - 1, 1) / n),
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


def measure_steps(
    models: Mapping[str, torch.nn.Module], input_ids: torch.Tensor, rt: Runtime, repeats: int = 5
) -> dict[str, dict[str, Any]]:
    """One training step (forward + backward) of each model on ``input_ids``: the activation
    memory it keeps for backward (counted in a warm-up step), and ``repeats`` timed steps taken
    in alternating rounds (A, B, A, B, ...) so that a neighbour on a busy machine slows every
    model alike. Each row: the seconds of every step, their median and quartiles (the IQR that
    :func:`nbzoo.verdicts.timing` compares), the activation MiB and, on a GPU, the peak MiB."""
    input_ids = input_ids.to(rt.device)
    labels = input_ids.clone()

    def step(model):
        with rt.autocast():
            return model(input_ids=input_ids, labels=labels).loss

    rows: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        model.train()
        rt.synchronize()
        rt.reset_peak_memory()
        loss, saved = saved_activation_bytes(lambda model=model: step(model))  # the warm-up
        loss.backward()
        model.zero_grad(set_to_none=True)
        rt.synchronize()
        rows[name] = {"activation_MiB": saved / 2**20, "seconds": []}
        if (peak := rt.peak_memory_bytes()) is not None:
            rows[name]["peak_MiB"] = peak / 2**20
    for _ in range(repeats):
        for name, model in models.items():
            tick = time.perf_counter()
            step(model).backward()
            rt.synchronize()
            rows[name]["seconds"].append(time.perf_counter() - tick)
            model.zero_grad(set_to_none=True)
    for row in rows.values():
        q1, median, q3 = np.percentile(row["seconds"], [25, 50, 75])
        row.update(seconds_per_step=float(median), seconds_q1=float(q1), seconds_q3=float(q3))
    return rows


def measure_step(
    model: torch.nn.Module, input_ids: torch.Tensor, rt: Runtime, repeats: int = 5
) -> dict[str, Any]:
    """:func:`measure_steps` of one model."""
    return measure_steps({"model": model}, input_ids, rt, repeats)["model"]


def scaling_table(
    builders: Mapping[str, Callable[[int], torch.nn.Module]],
    seq_lengths: Sequence[int],
    rt: Runtime,
    batch_size: int = 1,
    vocab_size: int = 100,
    repeats: int = 5,
    seed: int = 0,
):
    """Memory and time per training step against sequence length, one row per (model, length),
    the models of one length timed in alternating rounds (:func:`measure_steps`).
    ``builders[name](seq_len)`` returns a fresh model for that length."""
    import pandas as pd

    rows = []
    g = torch.Generator().manual_seed(seed)
    for seq_len in seq_lengths:
        ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=g)
        models = {}
        for name, build in builders.items():
            torch.manual_seed(seed)
            models[name] = build(seq_len).to(rt.device)
        for name, row in measure_steps(models, ids, rt, repeats).items():
            rows.append({"model": name, "seq_len": seq_len, **row})
        del models
    return pd.DataFrame(rows)


def step_timings(table, model: str) -> dict[int, verdicts.Estimate]:
    """The timings of one model of a :func:`scaling_table`, per sequence length."""
    part = table[table["model"] == model]
    if part.empty:
        raise ValueError(f"no model {model!r} in the table; it has {sorted(set(table['model']))}")
    return {
        int(row.seq_len): verdicts.timing(model, row.seconds, unit="s") for row in part.itertuples()
    }


@dataclass
class Crossover:
    """Where one model's training step becomes faster than another's, from their IQRs."""

    by_length: dict[int, verdicts.Verdict]  # per sequence length
    first_faster: int | None  # the first length from which ``a`` is faster at every length
    a: str
    b: str

    def text(self) -> str:
        lengths = sorted(self.by_length)
        slower = [n for n in lengths if self.by_length[n].leader == self.b]
        unclear = [n for n in lengths if not self.by_length[n].significant]
        parts = []
        if slower:
            parts.append(f"{self.a} is slower than {self.b} at {_lengths(slower)} tokens")
        if unclear:
            parts.append(f"no clear difference at {_lengths(unclear)} tokens")
        if self.first_faster is not None:
            parts.append(f"{self.a} is faster from {self.first_faster} tokens on")
        else:
            parts.append(f"{self.a} is not faster at any measured length up to {lengths[-1]}")
        return "; ".join(parts) + " (interquartile ranges of the timed steps apart or not)."


def _lengths(values: Sequence[int]) -> str:
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def crossover(table, a: str, b: str) -> Crossover:
    """Compare the step times of models ``a`` and ``b`` of a :func:`scaling_table` at every
    length (:func:`nbzoo.verdicts.compare`, lower is better) and find where ``a`` turns faster."""
    ta, tb = step_timings(table, a), step_timings(table, b)
    found = {
        n: verdicts.compare(ta[n], tb[n], higher_is_better=False, what=f"{n} tokens")
        for n in sorted(ta)
    }
    first = None
    for n in sorted(found, reverse=True):
        if found[n].leader != a:
            break
        first = n
    return Crossover(found, first, a, b)


def memory_text(table, a: str, b: str) -> str:
    """The activations two models of a :func:`scaling_table` keep for backward at the longest
    length measured: counted bytes, the same on every run (no spread to compare)."""
    longest = table["seq_len"].max()
    at = table[table["seq_len"] == longest].set_index("model")["activation_MiB"]
    return (
        f"At {longest} tokens {a} keeps {at[a]:.1f} MiB of activations for the backward pass, "
        f"{b} {at[b]:.1f} MiB ({at[b] / at[a]:.1f}× as much)."
    )


def plain_log_axis(ax, which: str, values: Sequence[float], base: int = 2) -> None:
    """Axis ``which`` ("x" or "y") of ``ax`` logarithmic, labelled at ``values`` only, in plain
    numbers: matplotlib's default log axis also labels minor ticks (``3×10^2`` beside ``256``),
    which print over each other."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator, StrMethodFormatter

    getattr(ax, f"set_{which}scale")("log", base=base)
    axis = getattr(ax, f"{which}axis")
    axis.set_major_locator(FixedLocator(sorted(values)))
    axis.set_major_formatter(StrMethodFormatter("{x:g}"))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


def decade_ticks(low: float, high: float) -> list[float]:
    """1, 2, 5 × 10^k between ``low`` and ``high`` (widened to one tick below and above)."""
    ticks = [
        m * 10.0**k for k in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
        for m in (1, 2, 5)
    ]  # fmt: skip
    below = [t for t in ticks if t <= low][-1:]
    above = [t for t in ticks if t >= high][:1]
    return below + [t for t in ticks if low < t < high] + above


def plot_scaling(table, title: str = "cost of one training step"):
    """Memory and time per step against sequence length, both axes logarithmic with plain tick
    labels; the time with the interquartile range of its timed steps as error bars."""
    import matplotlib.pyplot as plt

    columns = [c for c in ("activation_MiB", "peak_MiB", "seconds_per_step") if c in table]
    fig, axes = plt.subplots(
        1, len(columns), figsize=(4.8 * len(columns), 3.6), squeeze=False, layout="constrained"
    )
    labels = {
        "activation_MiB": ("activations kept for backward (MiB)", "memory autograd keeps"),
        "peak_MiB": ("peak device memory (MiB)", "peak memory"),
        "seconds_per_step": ("seconds per step (median, IQR)", "time"),
    }
    lengths = sorted(table["seq_len"].unique())
    for ax, col in zip(axes[0], columns, strict=True):
        for name, part in table.groupby("model", sort=False):
            if col == "seconds_per_step":
                errors = [part[col] - part["seconds_q1"], part["seconds_q3"] - part[col]]
                ax.errorbar(part["seq_len"], part[col], yerr=errors, marker="o", capsize=3,
                            label=name)  # fmt: skip
            else:
                ax.plot(part["seq_len"], part[col], marker="o", label=name)
        plain_log_axis(ax, "x", lengths)
        low = float(table[col].min() if col != "seconds_per_step" else table["seconds_q1"].min())
        high = float(table[col].max() if col != "seconds_per_step" else table["seconds_q3"].max())
        plain_log_axis(ax, "y", decade_ticks(low, high), base=10)
        ax.set(xlabel="sequence length (tokens)", ylabel=labels[col][0], title=labels[col][1])
        ax.legend(fontsize=8)
    fig.suptitle(title)
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


def compile_whole(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Capture ``model`` as one graph with ``torch.compile(fullgraph=True)`` -- a graph break
    (a data-dependent shape, a ``.item()``) raises instead of splitting the model -- and run it
    on ``batch`` (eval mode): the seconds the capture and first run took, and the largest
    difference from eager PyTorch. The ``eager`` backend runs the captured graph with PyTorch's
    own kernels: the capture is what the patches make possible, and it needs no C++ compiler
    (the default backend, inductor, then generates code, which takes minutes on one CPU core)."""
    import torch._dynamo

    was_training = model.training
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    try:
        with torch.no_grad():
            eager = model(**inputs).logits
            torch._dynamo.reset()  # a capture from an earlier run of the cell is not reused
            tick = time.perf_counter()
            compiled = torch.compile(model, fullgraph=True, backend="eager")(**inputs).logits
            seconds = time.perf_counter() - tick
    finally:
        model.train(was_training)
    return {"seconds": seconds, "max_abs_diff": float((compiled - eager).abs().max())}


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
