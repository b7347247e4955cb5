"""``nbzoo bench``: stock transformers against nbzoo's perf path, side by side, in one process.

    nbzoo bench [CASE ...] [--device auto|cuda|npu|cpu] [--steps N] [--quick]
    python -m nbzoo.bench --table [--update-readme bench/README.md]

For each case the model is built from its config (no download) with fixed seeds; the stock
baseline (transformers as installed, bf16 autocast, SDPA where the model has it, fused AdamW,
``torch.compile``; eager as the fallback, and whichever is faster is the baseline) and nbzoo's
perf path (``nbzoo.perf``) then train on the same batch from the same initial weights. The
result goes to ``results/bench/<case>.json`` (``--quick``: ``results/bench/quick/``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nbzoo import metrics, paths, perf
from nbzoo.device import Runtime, accelerator_name, setup

ISSUE_GOALS = {  # issue 10's goals for the perf path (targets, not measurements)
    "albert_base_cls": {"ratio": 1.3, "mfu": 0.40},
    "roberta_base_cls": {"ratio": 1.4},
    "bert_large_pretrain_128": {"ratio": 1.5, "mfu": 0.40},
    "bert_large_pretrain_512": {"ratio": 1.5},
    "longformer_base_mlm_4096": {"ratio": 2.0},
    "reformer_lm_4096": {"ratio": 3.0},
}
MAX_LOSS_REL_DIFF = 1e-2
MASK_FRACTION = 0.15


@dataclass
class Case:
    """One benchmark: a model config, its batch, and the perf path's settings."""

    name: str
    title: str
    model_class: str  # attribute of transformers
    config: Callable[[bool], Any]  # quick -> PretrainedConfig
    shape: Callable[[bool], tuple[int, int]]  # quick -> (batch, seq)
    batch: Callable[[Any, int, int, torch.Generator], dict[str, torch.Tensor]]
    perf: Callable[[bool, int, int], perf.PerfConfig]


# ----------------------------------------------------------------------------- batches


def _tokens(config, batch: int, seq: int, g: torch.Generator, low: int = 5) -> torch.Tensor:
    """Random token ids above the special tokens (pad, bos, eos, mask live at low ids or
    are avoided explicitly)."""
    return torch.randint(low, config.vocab_size - 1, (batch, seq), generator=g)


def _mask_tokens(ids: torch.Tensor, mask_id: int, g: torch.Generator):
    """15 % of positions per row (rounded) get a label and [MASK] in the input; the rest -100."""
    batch, seq = ids.shape
    n = int(round(MASK_FRACTION * seq))
    labels = torch.full_like(ids, metrics.IGNORE_INDEX)
    inputs = ids.clone()
    for row in range(batch):
        pos = torch.randperm(seq, generator=g)[:n]
        labels[row, pos] = ids[row, pos]
        inputs[row, pos] = mask_id
    return inputs, labels


def classification_batch(config, batch: int, seq: int, g: torch.Generator) -> dict:
    ids = _tokens(config, batch, seq, g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, config.num_labels, (batch,), generator=g),
    }


def bert_pretraining_batch(config, batch: int, seq: int, g: torch.Generator) -> dict:
    ids, labels = _mask_tokens(_tokens(config, batch, seq, g, low=999), 103, g)
    return {
        "input_ids": ids,
        "token_type_ids": (torch.arange(seq) >= seq // 2).long().expand(batch, -1).clone(),
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "next_sentence_label": torch.randint(0, 2, (batch,), generator=g),
    }


def roberta_mlm_batch(config, batch: int, seq: int, g: torch.Generator) -> dict:
    mask_id = config.vocab_size - 1  # <mask> is the last id of RoBERTa's vocabulary
    ids, labels = _mask_tokens(_tokens(config, batch, seq, g), mask_id, g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def causal_lm_batch(config, batch: int, seq: int, g: torch.Generator) -> dict:
    ids = _tokens(config, batch, seq, g, low=3)
    return {"input_ids": ids, "labels": ids.clone()}


# ----------------------------------------------------------------------------- configs


def _albert(quick: bool):
    from transformers import AlbertConfig

    size = (
        dict(embedding_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128, vocab_size=1000)
        if quick
        else dict(embedding_size=128, hidden_size=768, num_hidden_layers=12,
                  num_attention_heads=12, intermediate_size=3072, vocab_size=30000)
    )  # fmt: skip
    # albert-base-v2's config.json
    return AlbertConfig(
        **size,
        hidden_act="gelu_new",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.1,
        max_position_embeddings=512,
        type_vocab_size=2,
        num_labels=2,
    )


def _roberta(quick: bool):
    from transformers import RobertaConfig

    size = (
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             vocab_size=1000)
        if quick
        else dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072, vocab_size=50265)
    )  # fmt: skip
    # roberta-base's config.json
    return RobertaConfig(
        **size,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
        num_labels=2,
    )


def _bert_large(quick: bool):
    from transformers import BertConfig

    from nbzoo.pretraining import BERT_LARGE  # MLPerf v0.7's bert_config.json

    quick_size = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=1200,
    )  # fmt: skip
    return BertConfig(**{**BERT_LARGE, **(quick_size if quick else {})})


def _longformer(quick: bool):
    from transformers import LongformerConfig

    size = (
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             vocab_size=1000, attention_window=16, max_position_embeddings=66)
        if quick
        else dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072, vocab_size=50265, attention_window=512,
                  max_position_embeddings=4098)
    )  # fmt: skip
    # allenai/longformer-base-4096's config.json
    return LongformerConfig(
        **size,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
    )


def _reformer(quick: bool):
    from transformers import ReformerConfig

    # google/reformer-crime-and-punishment's config.json (the seed's checkpoint), with the axial
    # position shape factorising the benchmark's sequence length as training requires.
    seed = dict(
        attention_head_size=64,
        attn_layers=["local", "lsh", "local", "lsh", "local", "lsh"],
        axial_pos_embds_dim=[64, 192],
        axial_pos_shape=[64, 64],
        feed_forward_size=512,
        hidden_size=256,
        num_attention_heads=2,
        num_buckets=[64, 128],
        local_attn_chunk_length=64,
        lsh_attn_chunk_length=64,
        vocab_size=320,
    )
    if quick:
        seed.update(
            attention_head_size=16,
            attn_layers=["local", "lsh", "local", "lsh"],
            axial_pos_embds_dim=[8, 24],
            axial_pos_shape=[8, 8],
            feed_forward_size=64,
            hidden_size=32,
            num_buckets=[2, 4],
            local_attn_chunk_length=16,
            lsh_attn_chunk_length=16,
        )
    return ReformerConfig(
        **seed,
        axial_norm_std=1.0,
        axial_pos_embds=True,
        chunk_size_feed_forward=0,
        chunk_size_lm_head=0,
        eos_token_id=2,
        pad_token_id=0,
        hidden_act="relu",
        hidden_dropout_prob=0.05,
        local_attention_probs_dropout_prob=0.05,
        lsh_attention_probs_dropout_prob=0.0,
        local_num_chunks_after=0,
        local_num_chunks_before=1,
        lsh_num_chunks_after=0,
        lsh_num_chunks_before=1,
        num_hashes=1,
        is_decoder=True,
        layer_norm_eps=1e-12,
        # training never uses the generation cache; with it on, every step fills one
        use_cache=False,
    )


def _perf_default(quick: bool, batch: int, seq: int) -> perf.PerfConfig:
    return perf.PerfConfig()


def _perf_mlm(quick: bool, batch: int, seq: int) -> perf.PerfConfig:
    return perf.PerfConfig(mlm_budget=perf.mlm_budget(batch, seq, MASK_FRACTION))


def _perf_reformer(quick: bool, batch: int, seq: int) -> perf.PerfConfig:
    # Reformer's step is launch-bound: CUDA graphs over the whole (now unbroken) graph.
    return perf.PerfConfig(compile_mode="reduce-overhead")


CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case(
            "albert_base_cls",
            "ALBERT-base, classification",
            "AlbertForSequenceClassification",
            _albert,
            lambda q: (4, 32) if q else (128, 128),
            classification_batch,
            _perf_default,
        ),
        Case(
            "roberta_base_cls",
            "RoBERTa-base, classification",
            "RobertaForSequenceClassification",
            _roberta,
            lambda q: (4, 32) if q else (128, 128),
            classification_batch,
            _perf_default,
        ),
        Case(
            "bert_large_pretrain_128",
            "BERT-Large pretraining (MLM+NSP), seq 128",
            "BertForPreTraining",
            _bert_large,
            lambda q: (4, 32) if q else (64, 128),
            bert_pretraining_batch,
            _perf_mlm,
        ),
        Case(
            "bert_large_pretrain_512",
            "BERT-Large pretraining (MLM+NSP), seq 512",
            "BertForPreTraining",
            _bert_large,
            lambda q: (2, 64) if q else (12, 512),
            bert_pretraining_batch,
            _perf_mlm,
        ),
        Case(
            "longformer_base_mlm_4096",
            "Longformer-base MLM, seq 4096",
            "LongformerForMaskedLM",
            _longformer,
            lambda q: (2, 64) if q else (2, 4096),
            roberta_mlm_batch,
            _perf_mlm,
        ),
        Case(
            "reformer_lm_4096",
            "Reformer (seed config) LM, seq 4096",
            "ReformerModelWithLMHead",
            _reformer,
            lambda q: (2, 64) if q else (8, 4096),
            causal_lm_batch,
            _perf_reformer,
        ),
    ]
}


# ----------------------------------------------------------------------------- running


def _build(case: Case, quick: bool, rt: Runtime):
    import transformers

    config = case.config(quick)
    batch_size, seq = case.shape(quick)
    g = torch.Generator().manual_seed(1234)
    batch = case.batch(config, batch_size, seq, g)
    torch.manual_seed(0)
    model = getattr(transformers, case.model_class)(config)
    return config, batch, model


def _fresh_model(case: Case, config, state: dict[str, torch.Tensor], rt: Runtime):
    import transformers

    model = getattr(transformers, case.model_class)(config)
    model.load_state_dict(state)
    return model.to(rt.device).train()


def _free(rt: Runtime) -> None:
    torch._dynamo.reset()
    gc.collect()
    if rt.kind == "cuda":
        torch.cuda.empty_cache()


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _no_dropout_loss(model: torch.nn.Module, batch: dict, rt: Runtime) -> float:
    """The loss of an eager forward in eval mode (dropout off) with gradients enabled (the
    path a training step takes); the same RNG seed before each, for Reformer's LSH hashing."""
    model.eval()
    torch.manual_seed(0)
    with torch.enable_grad(), rt.autocast():
        loss = perf._default_loss(model, batch)
    value = float(loss.detach())
    del loss
    model.train()
    model.zero_grad(set_to_none=True)
    return value


def _stock_modes(rt: Runtime, compile_ok: bool, has_sdpa: bool) -> list[tuple[str, bool]]:
    attn = "sdpa" if has_sdpa else "model's own attention"
    label = f"{rt.precision} autocast + {attn} + {'fused ' if rt.kind == 'cuda' else ''}AdamW"
    modes = []
    if compile_ok:
        modes.append((f"{label} + torch.compile", True))
    modes.append((label, False))
    return modes


ORDERS = ("stock-first", "nbzoo-first")
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


def sdpa_backend(name: str) -> contextlib.AbstractContextManager:
    """A context that pins SDPA to one kernel (``auto``: torch's own choice), for both paths:
    without it, dropping the all-ones mask can make SDPA choose another kernel than stock's."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    if name not in kinds:
        raise ValueError(f"SDPA backend must be one of {', '.join(SDPA_BACKENDS)}; got {name!r}")
    return sdpa_kernel(kinds[name])


def run_case(
    case: Case,
    rt: Runtime,
    steps: int,
    warmup: int,
    quick: bool,
    compile_: bool,
    log=print,
    order: str = "stock-first",
    sdpa: str = "auto",
) -> dict[str, Any]:
    """Measure one case, stock and nbzoo's perf path (in ``order``; SDPA pinned to ``sdpa``
    in both), and return the record."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
    config, batch_cpu, model = _build(case, quick, rt)
    batch_size, seq = case.shape(quick)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del model
    record: dict[str, Any] = {
        "case": case.name,
        "title": case.title,
        "model_class": case.model_class,
        "quick": quick,
        "batch_size": batch_size,
        "seq_len": seq,
        "steps": steps,
        "warmup": warmup,
        "precision": rt.precision,
        "order": order,
        "sdpa_backend": sdpa,
        "loss": "MLM 15% labelled + NSP"
        if case.model_class == "BertForPreTraining"
        else "MLM 15% labelled"
        if "MaskedLM" in case.model_class
        else "causal LM (labels = inputs)"
        if "LMHead" in case.model_class
        else "sequence classification",
    }
    # FLOPs are counted on the stock model, whichever path runs first
    model = _fresh_model(case, config, state, rt)
    perf.set_attention(model, "sdpa")
    stock_batch = rt.to_device(batch_cpu)  # the mask stays: that is what a stock user passes
    record["flops_per_step"] = perf.count_step_flops(model, stock_batch, rt)
    record["flops_counted_on"] = "stock model, one forward + backward (torch.utils.flop_counter)"
    del model, stock_batch
    _free(rt)

    def stock() -> float:
        return _measure_stock(case, config, state, batch_cpu, rt, steps, warmup, compile_, record)

    def nbzoo() -> float:
        return _measure_nbzoo(case, config, state, batch_cpu, rt, steps, warmup, compile_, record)

    with sdpa_backend(sdpa):
        if order == "stock-first":
            stock_eval_loss, perf_eval_loss = stock(), nbzoo()
        else:
            perf_eval_loss = nbzoo()
            stock_eval_loss = stock()

    stock_sps, perf_sps = (
        record["stock"]["samples_per_second"],
        record["nbzoo"]["samples_per_second"],
    )
    record["ratio"] = perf_sps / stock_sps if stock_sps else None
    s_loss, p_loss = record["stock"]["first_loss"], record["nbzoo"]["first_loss"]
    record["loss_rel_diff"] = abs(p_loss - s_loss) / abs(s_loss)
    record["loss_rel_diff_note"] = (
        "first training step of each path from the same weights and batch; dropout is active "
        "in both (different masks)"
    )
    record["loss_rel_diff_no_dropout"] = abs(perf_eval_loss - stock_eval_loss) / abs(
        stock_eval_loss
    )
    record["goal"] = ISSUE_GOALS[case.name]
    record["meets_goal"] = _meets_goal(record, rt, quick)
    return record


def _measure_stock(case, config, state, batch_cpu, rt, steps, warmup, compile_, record) -> float:
    """Stock transformers: every candidate mode, the fastest is the baseline (``record["stock"]``).
    Returns the eager no-dropout loss."""
    stock_batch = rt.to_device(batch_cpu)
    model = _fresh_model(case, config, state, rt)
    attention = perf.set_attention(model, "sdpa")
    flops = record["flops_per_step"]
    stock_eval_loss = _no_dropout_loss(model, stock_batch, rt)
    candidates = []
    for label, use_compile in _stock_modes(rt, compile_, attention != "own"):
        model.load_state_dict(state)
        optimizer = perf.make_optimizer(model, rt)
        module = torch.compile(model, dynamic=False) if use_compile else model
        torch.manual_seed(0)
        try:
            result = perf.measure_training_throughput(
                module, stock_batch, optimizer, rt, steps, warmup, flops_per_step=flops
            )
            candidates.append({"mode": label, **result})
        except Exception as exc:  # a stock mode that fails is recorded, and the next one tried
            candidates.append({"mode": label, "error": _short_error(exc)})
        del optimizer, module
        _free(rt)
    record["stock_attention"] = attention
    working = [c for c in candidates if "error" not in c]
    if not working:
        raise RuntimeError(f"{case.name}: no stock mode ran: {candidates}")
    best = max(working, key=lambda c: c["samples_per_second"])
    record["stock"] = {**best, "candidates": [_brief(c) for c in candidates]}
    del model, stock_batch
    _free(rt)
    return stock_eval_loss


def _measure_nbzoo(case, config, state, batch_cpu, rt, steps, warmup, compile_, record) -> float:
    """nbzoo's perf path from the same weights and batch (``record["nbzoo"]``). Returns the eager
    no-dropout loss."""
    cfg = case.perf(record["quick"], record["batch_size"], record["seq_len"])
    if not compile_:
        cfg = cfg.with_(compile=False)
    flops = record["flops_per_step"]
    model = _fresh_model(case, config, state, rt)
    handle = perf.enable(model, rt, cfg)
    try:
        perf_batch = perf.prepare_batch(batch_cpu, rt, cfg.drop_full_attention_mask)
        perf_eval_loss = _no_dropout_loss(model, perf_batch, rt)
        optimizer = perf.make_optimizer(model, rt, fused=cfg.fused_optimizer)
        torch.manual_seed(0)
        try:
            result = perf.measure_training_throughput(
                handle.module, perf_batch, optimizer, rt, steps, warmup, flops_per_step=flops
            )
            mode = "; ".join(handle.features)
        except Exception as exc:
            if not cfg.compile:
                raise
            # compile failed: record why and measure the perf path eagerly
            record["nbzoo_compile_error"] = _short_error(exc)
            _free(rt)
            model.load_state_dict(state)
            optimizer = perf.make_optimizer(model, rt, fused=cfg.fused_optimizer)
            torch.manual_seed(0)
            result = perf.measure_training_throughput(
                model, perf_batch, optimizer, rt, steps, warmup, flops_per_step=flops
            )
            mode = "; ".join(f for f in handle.features if not f.startswith("torch.compile"))
        record["nbzoo"] = {"mode": mode, "patches": list(handle.patches), **result}
    finally:
        perf.disable(handle)
    del model, optimizer
    _free(rt)
    return perf_eval_loss


def _brief(candidate: dict[str, Any]) -> dict[str, Any]:
    keys = ("mode", "error", "samples_per_second", "step_seconds", "mfu", "first_loss")
    return {k: candidate[k] for k in keys if k in candidate}


def _meets_goal(record: dict[str, Any], rt: Runtime, quick: bool) -> bool | None:
    """Whether the issue's goal is met; None where it cannot be judged (CPU, --quick)."""
    if quick or rt.kind == "cpu":
        return None
    goal = record["goal"]
    ok = record["ratio"] is not None and record["ratio"] >= goal["ratio"]
    if "mfu" in goal:
        ok = ok and (record["nbzoo"]["mfu"] or 0.0) >= goal["mfu"]
    return bool(ok and record["loss_rel_diff"] <= MAX_LOSS_REL_DIFF)


def _versions() -> dict[str, str]:
    out = metrics._versions()
    out["cuda"] = str(torch.version.cuda)
    return out


def write_record(record: dict[str, Any], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record['case']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics._plain(record), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def output_dir(quick: bool, out: str | None = None) -> Path:
    if out:
        return paths.resolve(out)
    base = paths.results_dir() / "bench"
    return base / "quick" if quick else base


# ----------------------------------------------------------------------------- the table


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _gib(value: Any) -> str:
    return "–" if value is None else f"{value / 2**30:.1f}"


def read_records(folder: Path) -> list[dict[str, Any]]:
    return metrics.in_order(
        metrics.read_json_records(folder, ("case", "stock")), "case", list(CASES)
    )


def table(records: list[dict[str, Any]]) -> str:
    """A markdown table of bench records."""
    head = (
        "| case | device | batch × seq | stock samples/s (mode) | nbzoo samples/s | ratio "
        "(goal) | MFU stock / nbzoo | peak GiB stock / nbzoo | loss rel. diff |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in records:
        s, n = r["stock"], r["nbzoo"]
        mode = "compile" if "torch.compile" in s["mode"] else "eager"
        rows.append(
            f"| {r['case']} | {s.get('device_name', '?')} | {r['batch_size']} × {r['seq_len']} "
            f"| {_fmt(s['samples_per_second'], '.1f')} ({mode}) "
            f"| {_fmt(n['samples_per_second'], '.1f')} "
            f"| {_fmt(r['ratio'], '.2f')}× ({r['goal']['ratio']}×) "
            f"| {_fmt(s['mfu'], '.0%')} / {_fmt(n['mfu'], '.0%')} "
            f"| {_gib(s['peak_memory_bytes'])} / {_gib(n['peak_memory_bytes'])} "
            f"| {_fmt(r['loss_rel_diff'], '.1e')} |"
        )
    return head + "\n".join(rows) + "\n"


README_START, README_END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def render_table(folder: Path) -> str:
    records = read_records(folder)
    if not records:
        return f"No results in `{paths.shown(folder)}` yet: no GPU run of `nbzoo bench` exists.\n"
    when = max(r.get("finished_at", "") for r in records)
    devices = sorted({r["stock"].get("device_name", "?") for r in records})
    note = (
        f"Generated by `python -m nbzoo.bench --table` from {len(records)} file(s) in "
        f"`{paths.shown(folder)}`; device: {', '.join(devices)}; latest run finished {when}.\n\n"
    )
    return note + table(records)


def update_readme(
    readme: Path, text: str, markers: tuple[str, str] = (README_START, README_END)
) -> None:
    """Replace the text between the two ``markers`` of ``readme`` (atomically)."""
    first, last = markers
    content = readme.read_text(encoding="utf-8")
    start, end = content.find(first), content.find(last)
    if start < 0 or end < start:
        raise ValueError(f"{readme}: markers {first} … {last} not found")
    new = content[: start + len(first)] + "\n" + text + content[end:]
    tmp = readme.with_suffix(readme.suffix + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, readme)


# ----------------------------------------------------------------------------- entry points


def _runtime(device: str, precision: str) -> Runtime | None:
    """The device to measure on, or None after one line saying why it cannot be had (a device
    that is absent, an unknown name or precision)."""
    try:
        return setup(device, precision, seed=0)
    except (ValueError, RuntimeError) as exc:
        print(f"nbzoo bench: {exc}", file=sys.stderr)
        return None


def main(args: argparse.Namespace) -> int:
    """Run the cases named in ``args`` (all when none); the ``nbzoo bench`` sub-command."""
    if args.table and not args.lengths:
        folder = output_dir(args.quick, args.out)
        text = render_table(folder)
        if args.update_readme:
            update_readme(paths.resolve(args.update_readme), text)
        print(text, end="")
        return 0
    from nbzoo import bench_lengths

    if args.table and args.lengths:
        from nbzoo import bench_lengths_table

        folder = bench_lengths.output_dir(args.lengths, args.out)
        text = bench_lengths_table.render_table(folder, args.lengths)
        if args.update_readme:
            update_readme(
                paths.resolve(args.update_readme),
                text,
                (bench_lengths_table.README_START, bench_lengths_table.README_END),
            )
        print(text, end="")
        return 0
    names = [n for c in args.cases for n in bench_lengths.GROUPS.get(c, [c])] or list(CASES)
    if any(n in bench_lengths.CASES for n in names):
        return _main_lengths(args, names)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(
            f"nbzoo bench: unknown case {unknown[0]!r}; choose from: {', '.join(CASES)}",
            file=sys.stderr,
        )
        return 2
    if args.steps < 1:
        print(f"nbzoo bench: --steps must be at least 1, got {args.steps}", file=sys.stderr)
        return 2
    rt = _runtime(args.device, args.precision or "bf16")
    if rt is None:
        return 2
    compile_arg = args.compile
    compile_ = compile_arg == "on" or (
        compile_arg == "auto" and not (args.quick and rt.kind == "cpu")
    )
    warmup = args.warmup or (1 if args.quick else 3)
    if args.quick and rt.kind == "cpu":
        # Tiny shapes gain nothing from threads, and on a shared 2-core machine a second
        # spinning OpenMP thread makes every step several times slower.
        torch.set_num_threads(1)
    folder = output_dir(args.quick, args.out)
    name = accelerator_name(rt)
    print(
        f"nbzoo bench: {len(names)} case(s) on {rt.kind} ({name}), {rt.precision}, "
        f"{args.steps} timed steps after {warmup} warm-up, compile "
        f"{'on' if compile_ else 'off'}{', quick shapes' if args.quick else ''}, "
        f"{args.order}, SDPA {args.sdpa} "
        f"→ {paths.shown(folder)}",
        flush=True,
    )
    records, failed = [], []
    for i, case_name in enumerate(names, 1):
        tick = time.perf_counter()
        try:
            record = run_case(
                CASES[case_name],
                rt,
                args.steps,
                warmup,
                args.quick,
                compile_,
                order=args.order,
                sdpa=args.sdpa,
            )
        except Exception as exc:
            failed.append(case_name)
            print(f"[{i}/{len(names)}] {case_name}: FAILED: {_short_error(exc)}", flush=True)
            if os.environ.get("NBZOO_BENCH_TRACEBACK"):
                traceback.print_exc()
            _free(rt)
            continue
        record["seconds"] = time.perf_counter() - tick
        record["device"] = rt.kind
        record["device_name"] = name
        record["versions"] = _versions()
        record["finished_at"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        path = write_record(record, folder)
        records.append(record)
        print(
            f"[{i}/{len(names)}] {case_name}: stock {record['stock']['samples_per_second']:.1f} "
            f"samples/s, nbzoo {record['nbzoo']['samples_per_second']:.1f} samples/s, ratio "
            f"{record['ratio']:.2f}x, loss rel. diff {record['loss_rel_diff']:.1e} "
            f"({record['seconds']:.0f} s) → {paths.shown(path)}",
            flush=True,
        )
    if records:
        print()
        print(table(records), end="")
    return 1 if failed else 0


def _main_lengths(args: argparse.Namespace, names: list[str]) -> int:
    """The real-length cases (``nbzoo.bench_lengths``): three paths interleaved per case."""
    from nbzoo import bench_lengths

    unknown = [n for n in names if n not in bench_lengths.CASES]
    if unknown:
        print(
            f"nbzoo bench: {unknown[0]!r} cannot run beside real-length cases; choose from: "
            f"{', '.join([*bench_lengths.GROUPS, *bench_lengths.CASES])}",
            file=sys.stderr,
        )
        return 2
    if args.rounds is not None and args.rounds < 1:
        print(f"nbzoo bench: --rounds must be at least 1, got {args.rounds}", file=sys.stderr)
        return 2
    # fp32 on a CPU unless asked: bf16 autocast is emulated on CPUs without AVX512-BF16 / AMX
    rt = _runtime(args.device, args.precision or "auto")
    if rt is None:
        return 2
    compile_ = {"on": True, "off": False}.get(args.compile)
    folder = bench_lengths.output_dir(rt.kind + ("/quick" if args.quick else ""), args.out)
    print(
        f"nbzoo bench: {len(names)} real-length case(s) on {rt.kind} ({accelerator_name(rt)}), "
        f"{torch.get_num_threads()} thread(s), load {os.getloadavg()[0]:.1f} → {paths.shown(folder)}",
        flush=True,
    )
    failed = []
    command = " ".join(
        ["nbzoo bench", *args.cases, "--device", args.device]
        + (["--precision", args.precision] if args.precision else [])
        + (["--rounds", str(args.rounds)] if args.rounds else [])
        + (["--quick"] if args.quick else [])
    )
    run = bench_lengths.run_stamp(command)
    for i, name in enumerate(names, 1):
        tick = time.perf_counter()
        try:
            record = bench_lengths.run_length_case(
                bench_lengths.CASES[name],
                rt,
                warmup=args.warmup or (1 if rt.kind == "cpu" else 3),
                compile_=compile_,
                quick=args.quick,
                rounds=args.rounds,
            )
        except Exception as exc:
            failed.append(name)
            print(f"[{i}/{len(names)}] {name}: FAILED: {_short_error(exc)}", flush=True)
            if os.environ.get("NBZOO_BENCH_TRACEBACK"):
                traceback.print_exc()
            _free(rt)
            continue
        record["seconds"] = time.perf_counter() - tick
        path = write_record(bench_lengths.finish(record, rt, run), folder)
        ratios = record["ratios"]
        print(
            f"[{i}/{len(names)}] {name}: seq/s stock as seed "
            f"{record['stock_seed']['samples_per_second']:.2f}, stock best "
            f"{record['stock_best']['samples_per_second']:.2f}, nbzoo plain "
            f"{record['nbzoo_plain']['samples_per_second']:.2f}, nbzoo "
            f"{record['nbzoo']['samples_per_second']:.2f}: nbzoo "
            f"{ratios['nbzoo_vs_stock_seed']['median']:.2f}x stock as seed, "
            f"{ratios['nbzoo_vs_stock_best']['median']:.2f}x stock best (goal "
            f"{'met' if record['goal']['met'] else 'NOT met'}) "
            f"({record['seconds']:.0f} s) → {paths.shown(path)}",
            flush=True,
        )
        _free(rt)
    return 1 if failed else 0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``nbzoo bench`` and ``python -m nbzoo.bench`` (one list for both)."""
    parser.add_argument(
        "cases", nargs="*",
        help=f"any of: {', '.join(CASES)} (default: all); or real-length cases / groups: "
        "real_lengths, padding_sweep, albert_base_sst2, bert_large_mlperf512, albert_base_padNN_bB",
    )  # fmt: skip
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--precision", default=None,
        help="autocast precision of the paths (default bf16; real-length cases: auto, fp32 on a CPU)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path")
    parser.add_argument(
        "--rounds", type=int, default=None,
        help="real-length cases: rounds over the timed batches (default: the case's, 5 or 3)",
    )  # fmt: skip
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps (default 3; 1 quick)"
    )
    parser.add_argument("--quick", action="store_true", help="small shapes (CPU, CI)")
    parser.add_argument(
        "--compile", choices=["auto", "on", "off"], default="auto",
        help="torch.compile in both paths (auto: off for --quick on a CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--order", choices=ORDERS, default="stock-first",
        help="which path each case measures first (both in one process)",
    )  # fmt: skip
    parser.add_argument(
        "--sdpa", choices=SDPA_BACKENDS, default="auto",
        help="pin scaled_dot_product_attention to one kernel in both paths",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="folder of the JSON files")
    parser.add_argument("--table", action="store_true", help="print the table of stored results")
    parser.add_argument(
        "--lengths", default=None, metavar="DEVICE",
        help="with --table: the real-length records of DEVICE (cpu, cuda) instead",
    )  # fmt: skip
    parser.add_argument(
        "--update-readme", default=None, metavar="PATH",
        help="with --table: write it between the bench-table markers of PATH",
    )  # fmt: skip
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(
        argparse.ArgumentParser(prog="nbzoo bench", description=__doc__.strip().splitlines()[0])
    )


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
