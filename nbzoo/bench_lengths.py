"""``nbzoo bench`` on real length distributions: padding, stock at its best, and packing.

Each case draws a pool of sentences (or pre-training samples) whose token lengths follow a
distribution modelled from published figures (``nbzoo/length_histograms.json``, each with its
source; MLPerf's Wikipedia lengths are nbzoo's model of BERT's sampling, calibrated to the 50 %
padding Krell et al. state, not their histogram), or a padding sweep, and trains three paths on the same pool, step by step in alternation (so that a busy,
shared machine slows all three alike):

- ``stock_seed``: transformers as the seed runs it: every sequence padded to ``max_length``,
  eager attention (the seed's transformers 4.28 had no SDPA), batches in the sampler's order;
- ``stock_best``: transformers at its best without packing: length-grouped batches (what
  ``Trainer(group_by_length=True)`` does: sorted by length within mega-batches of 50 batches),
  dynamic padding to the longest in the batch (a multiple of 8), SDPA, bf16 autocast on
  accelerators, ``torch.compile`` where it works (not on a CPU);
- ``nbzoo``: the same sentences per step as ``stock_seed``, packed into rows of
  ``max_length`` (``nbzoo.packing``: SPFHP, block-diagonal attention, per-sequence heads), SDPA
  (FlexAttention document masks on CUDA), BERT's MLM head on the labelled positions only.

Throughput is sequences per second over the whole pool. ``ratio_vs_padded`` is nbzoo over
stock as the seed runs it, ``ratio_vs_stock_best`` nbzoo over stock at its best. The first
batch's loss (eval mode, dropout off) of nbzoo and stock as the seed agree to float rounding:
the same sentences, packed or padded (``loss_rel_diff``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from nbzoo import bert_sample_lengths, metrics, packing, paths, perf
from nbzoo.device import Runtime, accelerator_name

MASK_FRACTION = 0.15
GROUPED_BATCHES = 50  # transformers' LengthGroupedSampler sorts mega-batches of 50 batches
PATHS = ("stock_seed", "stock_best", "nbzoo")
SWEEP = (0, 25, 50, 75, 90)  # padding percentages of the padding sweep


def histograms() -> dict[str, Any]:
    text = resources.files("nbzoo").joinpath("length_histograms.json").read_text("utf-8")
    return json.loads(text)


def sample_lengths(name: str, n: int, seed: int) -> tuple[list[int], int, str]:
    """``n`` token lengths drawn from distribution ``name``: (lengths, max_length, source)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if name.startswith("padding_"):
        pct = int(name.removeprefix("padding_"))
        return sweep_lengths(pct, 128, n, rng), 128, f"padding sweep: {SWEEP_SOURCE}"
    spec = histograms()[name]
    max_length = int(spec["max_length"])
    if "bert_create_pretraining_data" in spec:  # nbzoo's model of the MLPerf data, see its source
        model = spec["bert_create_pretraining_data"]
        lengths = bert_sample_lengths.sample_lengths(model, n, rng)
    else:
        ln = spec["lognormal"]
        mu = math.log(ln["mean"]) - ln["sigma"] ** 2 / 2  # so that the mean is ln["mean"]
        raw = np.rint(rng.lognormal(mu, ln["sigma"], size=n))
        lengths = np.clip(raw, ln["min"], max_length)
    return [int(x) for x in lengths], max_length, spec["source"]


SWEEP_SOURCE = (
    "lengths uniform within +-50 % of (1 - padding) x 128, at least 3 and at most 128, so that "
    "a batch padded to 128 holds about that share of padding (0 %: every sequence 128 long)"
)


def sweep_lengths(pct: int, max_length: int, n: int, rng) -> list[int]:
    mean = (1 - pct / 100) * max_length
    if pct == 0:
        return [max_length] * n
    raw = rng.uniform(0.5 * mean, 1.5 * mean, size=n)
    return [int(min(max_length, max(3, round(x)))) for x in raw]


# ----------------------------------------------------------------------------- cases


@dataclass
class LengthCase:
    name: str
    title: str
    model_class: str
    config: Callable[[dict[str, Any]], Any]  # overrides -> PretrainedConfig
    distribution: str
    batch_size: int  # sequences per optimizer step (all three paths)
    batches: int  # steps per path over the pool
    pretraining: bool = False
    cpu: dict[str, Any] = field(default_factory=dict)  # smaller shapes on a CPU, named


def _albert_base(overrides):
    from transformers import AlbertConfig

    from nbzoo.standins import ALBERT_BASE_V2  # albert-base-v2's config.json

    return AlbertConfig(**{**ALBERT_BASE_V2, "num_labels": 2, **overrides})


def _bert_large(overrides):
    from transformers import BertConfig

    from nbzoo.pretraining import BERT_LARGE

    return BertConfig(**{**BERT_LARGE, **overrides})


def _cases() -> dict[str, LengthCase]:
    cases = [
        LengthCase(
            "albert_base_sst2",
            "ALBERT-base, SST-2 lengths, max 128",
            "AlbertForSequenceClassification",
            _albert_base,
            "sst2_128",
            32,
            8,
            cpu={"batches": 4},
        ),
        LengthCase(
            "bert_large_mlperf512",
            "BERT-Large MLM+NSP, MLPerf Wikipedia lengths, max 512",
            "BertForPreTraining",
            _bert_large,
            "wikipedia_phase2_512",
            12,
            8,
            pretraining=True,
            cpu={"batch_size": 4, "batches": 3, "config": {"num_hidden_layers": 2}},
        ),
    ]
    for pct in SWEEP:
        cases.append(
            LengthCase(
                f"albert_base_pad{pct:02d}", f"ALBERT-base, {pct} % padding at 128",
                "AlbertForSequenceClassification", _albert_base, f"padding_{pct}", 32, 6,
                cpu={"batch_size": 8, "batches": 6, "config": {"num_hidden_layers": 2}},
            )
        )  # fmt: skip
    return {c.name: c for c in cases}


CASES = _cases()
GROUPS = {
    "real_lengths": ["albert_base_sst2", "bert_large_mlperf512"],
    "padding_sweep": [f"albert_base_pad{p:02d}" for p in SWEEP],
}


# ----------------------------------------------------------------------------- data


def make_pool(case: LengthCase, config, lengths: list[int], max_length: int, seed: int):
    """Items as a tokenizer + ``EncodedGlue`` / the MLPerf reader give them: padded to
    ``max_length`` with an attention mask, random tokens; pre-training samples have A/B segments,
    15 % of their tokens masked and labelled, and an NSP label."""
    g = torch.Generator().manual_seed(seed)
    pad = config.pad_token_id or 0
    low = 999 if case.pretraining else 5
    items = []
    for n in lengths:
        ids = torch.full((max_length,), pad, dtype=torch.long)
        ids[:n] = torch.randint(low, config.vocab_size - 1, (n,), generator=g)
        mask = torch.zeros(max_length, dtype=torch.long)
        mask[:n] = 1
        types = torch.zeros(max_length, dtype=torch.long)
        item = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        if case.pretraining:
            types[int(torch.randint(1, n, (1,), generator=g)) if n > 1 else 0 : n] = 1
            labels = torch.full((max_length,), metrics.IGNORE_INDEX, dtype=torch.long)
            k = max(1, round(MASK_FRACTION * n))
            pos = torch.randperm(n, generator=g)[:k]
            labels[pos] = ids[pos]
            ids[pos] = 103
            item["labels"] = labels
            item["next_sentence_label"] = torch.randint(0, 2, (), generator=g)
        else:
            item["labels"] = torch.randint(0, config.num_labels, (), generator=g)
        items.append(item)
    return items


def seed_batches(items, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Stock as the seed runs it: the sampler's order, every sequence padded to max_length."""
    groups = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    return [torch.utils.data.default_collate(g) for g in groups]


def best_batches(items, batch_size: int, multiple: int = 8) -> list[dict[str, torch.Tensor]]:
    """Stock at its best: length-grouped batches (mega-batches of 50 batches sorted by length,
    as transformers' ``LengthGroupedSampler``), each padded to its longest (a multiple of 8)."""
    lengths = [int(it["attention_mask"].sum()) for it in items]
    mega = 50 * batch_size
    order: list[int] = []
    for start in range(0, len(items), mega):
        chunk = list(range(start, min(start + mega, len(items))))
        order += sorted(chunk, key=lambda i: -lengths[i])
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = min(
            items[0]["input_ids"].numel(), -(-max(lengths[i] for i in idx) // multiple) * multiple
        )
        batch = torch.utils.data.default_collate([items[i] for i in idx])
        out.append({k: (v[:, :width].contiguous() if v.ndim == 2 else v) for k, v in batch.items()})
    return out


def packed_batches(case: LengthCase, items, batch_size: int, max_length: int):
    """nbzoo: the same sentences per step as the seed's batches, packed into rows."""
    if case.pretraining:
        collate = packing.PackedCollator(
            max_length, token_labels=("labels",), sequence_labels=("next_sentence_label",)
        )
    else:
        collate = packing.PackedCollator(max_length)
    out = []
    for i in range(0, len(items), batch_size):
        batch = collate(items[i : i + batch_size])
        batch.pop("packed_order")
        out.append(batch)
    return out


# ----------------------------------------------------------------------------- running


@dataclass
class Path_:
    name: str
    model: torch.nn.Module
    module: Any
    optimizer: torch.optim.Optimizer
    batches: list[dict[str, torch.Tensor]]
    autocast: bool
    mode: str
    times: list[float] = field(default_factory=list)
    sequences: int = 0
    error: str | None = None


def _sequences(batch: dict[str, torch.Tensor]) -> int:
    key = "next_sentence_label" if "next_sentence_label" in batch else "labels"
    return int(batch[key].shape[0])


def _step(path: Path_, batch, rt: Runtime) -> float:
    ctx = rt.autocast() if path.autocast else contextlib.nullcontext()
    rt.synchronize()
    tick = time.perf_counter()
    with ctx:
        out = path.module(**batch)
    out.loss.backward()
    path.optimizer.step()
    path.optimizer.zero_grad(set_to_none=True)
    rt.synchronize()
    return time.perf_counter() - tick


COMPILED = ", torch.compile(dynamic=True)"


def _warm_up(path: Path_, batch, rt: Runtime) -> None:
    """One untimed step; where it fails, fall back (recording why): first off torch.compile,
    then (nbzoo) from FlexAttention to SDPA's block-diagonal mask."""
    while True:
        try:
            _step(path, batch, rt)
            return
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            path.optimizer.zero_grad(set_to_none=True)
            if path.module is not path.model:
                path.error = (path.error or "") + f"compile: {error}; "
                path.module, path.mode = path.model, path.mode.replace(COMPILED, "")
            elif path.model.config._attn_implementation == "flex_attention":
                path.error = (path.error or "") + f"flex_attention: {error}; "
                path.model.set_attn_implementation("sdpa")
                path.mode = path.mode.replace("flex_attention", "sdpa")
            else:
                raise


def _eval_loss(model, batch, rt: Runtime) -> float:
    model.eval()
    with torch.no_grad():
        value = float(model(**batch).loss)
    model.train()
    return value


QUICK = {  # --quick: toy sizes of every case (tests, the CPU run of bench/gpu_check.sh)
    "batch_size": 4,
    "batches": 2,
    "config": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=1200,
    ),
}  # fmt: skip


def run_length_case(
    case: LengthCase,
    rt: Runtime,
    warmup: int = 1,
    compile_: bool | None = None,
    seed: int = 0,
    quick: bool = False,
) -> dict[str, Any]:
    """Measure one case: the three paths, interleaved step by step over the same pool."""
    import transformers

    on_cpu = rt.kind == "cpu"
    shape = QUICK if quick else case.cpu if on_cpu else {}
    batch_size = shape.get("batch_size", case.batch_size)
    n_batches = shape.get("batches", case.batches)
    config = case.config(shape.get("config", {}))
    # One mega-batch (50 batches) is drawn: stock at its best sorts it by length, as its
    # sampler would, and times n_batches of its batches spread evenly over the sorted order (a
    # sample stratified by length); the other two paths take the first n_batches batches.
    mega = GROUPED_BATCHES * batch_size
    pool_lengths, max_length, source = sample_lengths(case.distribution, mega, seed)
    pool = make_pool(case, config, pool_lengths, max_length, seed)
    items, lengths = pool[: batch_size * n_batches], pool_lengths[: batch_size * n_batches]
    grouped = best_batches(pool, batch_size)
    picked = sorted(
        {round(i * (len(grouped) - 1) / max(1, n_batches - 1)) for i in range(n_batches)}
    )
    best = [grouped[i] for i in picked]
    compile_ = (not on_cpu) if compile_ is None else compile_
    torch.manual_seed(0)
    state = getattr(transformers, case.model_class)(config).state_dict()

    def fresh(attention: str) -> torch.nn.Module:
        model = getattr(transformers, case.model_class)(config)
        model.load_state_dict(state)
        model.set_attn_implementation(attention)
        return model.to(rt.device).train()

    def optimizer(model):
        return perf.make_optimizer(model, rt)

    amp = rt.precision in ("bf16", "fp16") and not on_cpu
    seed_model = fresh("eager")
    best_model = fresh("sdpa")
    nbzoo_attention = packing.attention_implementation(rt.kind)
    nbzoo_model = fresh(nbzoo_attention)
    nbzoo_model._nbzoo_sparse_mlm = True  # MLM head on labelled positions (perf path)
    best_module = best_model
    best_mode = f"length-grouped, dynamic padding, sdpa{', ' + rt.precision if amp else ''}"
    nbzoo_module = nbzoo_model
    nbzoo_mode = f"packed (SPFHP) into rows of {max_length}, {nbzoo_attention} block-diagonal"
    nbzoo_mode += f", {rt.precision}" if amp else ""
    if compile_:
        best_module = torch.compile(best_model, dynamic=True)
        best_mode += COMPILED
        nbzoo_module = torch.compile(nbzoo_model, dynamic=True)
        nbzoo_mode += COMPILED
    seed_mode = "padded to max_length, eager attention" + (f", {rt.precision}" if amp else "")
    paths_ = {
        "stock_seed": Path_("stock_seed", seed_model, seed_model, optimizer(seed_model),
                            [rt.to_device(b) for b in seed_batches(items, batch_size)],
                            amp, seed_mode),
        "stock_best": Path_("stock_best", best_model, best_module, optimizer(best_model),
                            [rt.to_device(b) for b in best], amp, best_mode),
        "nbzoo": Path_("nbzoo", nbzoo_model, nbzoo_module, optimizer(nbzoo_model),
                       [rt.to_device(b) for b in packed_batches(case, items, batch_size, max_length)],
                       amp, nbzoo_mode),
    }  # fmt: skip
    load_before = os.getloadavg()
    record: dict[str, Any] = {
        "case": case.name,
        "title": case.title,
        "model_class": case.model_class,
        "length_distribution": case.distribution,
        "source": source,
        "max_length": max_length,
        "batch_size": batch_size,
        "sequences": len(items),
        "shape": _shape_note(shape, batch_size, n_batches),
        "config_overrides": shape.get("config", {}),
        "mean_length": sum(lengths) / len(lengths),
        "padding_fraction": packing.padding_fraction(lengths, max_length),
        "rows_packed": sum(int(b["input_ids"].shape[0]) for b in paths_["nbzoo"].batches),
        "rows_padded": len(items),
        "stock_best_batches": f"{len(best)} of the {len(grouped)} length-grouped batches of "
        f"{len(pool)} sequences, evenly spaced in length order: {picked}",
        "tokens_computed": {
            name: sum(int(b["input_ids"].numel()) for b in p.batches) for name, p in paths_.items()
        },
        "precision": rt.precision if amp else "fp32",
        "warmup": warmup,
    }
    record["packed_padding_fraction"] = 1 - sum(lengths) / (record["rows_packed"] * max_length)
    # the same sentences, padded and packed: the first batch's loss, dropout off
    with packing.packed_training(nbzoo_model, rt.kind):
        seed_loss = _eval_loss(seed_model, paths_["stock_seed"].batches[0], rt)
        nbzoo_loss = _eval_loss(nbzoo_model, paths_["nbzoo"].batches[0], rt)
        record["loss_rel_diff"] = abs(nbzoo_loss - seed_loss) / abs(seed_loss)
        for p in paths_.values():  # warm-up (compiles), untimed
            for w in range(warmup):
                _warm_up(p, p.batches[w % len(p.batches)], rt)
        for i in range(n_batches):  # interleaved: one step of each path in turn
            for p in paths_.values():
                batch = p.batches[i % len(p.batches)]
                p.times.append(_step(p, batch, rt))
                p.sequences += _sequences(batch)
    load_after = os.getloadavg()
    for name, p in paths_.items():
        total = sum(p.times)
        record[name] = {
            "mode": p.mode,
            "sequences": p.sequences,
            "samples_per_second": p.sequences / total,
            "seconds": total,
            "step_seconds": p.times,
            **({"fallback_errors": p.error} if p.error else {}),
        }
    s, b, n = (record[k]["samples_per_second"] for k in PATHS)
    record["ratio_vs_padded"] = n / s
    record["ratio_vs_stock_best"] = n / b
    record["stock_best_vs_padded"] = b / s
    record["machine"] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_before": round(load_before[0], 2),
        "load_average_1min_after": round(load_after[0], 2),
    }
    return record


def _shape_note(shape: dict[str, Any], batch_size: int, n_batches: int) -> str:
    config = ", ".join(f"{k}={v}" for k, v in shape.get("config", {}).items())
    where = "quick shape" if shape is QUICK else "CPU shape" if shape else "full shape"
    return f"{where}: {n_batches} steps of {batch_size}" + (f", {config}" if config else "")


def output_dir(rt_kind: str, out: str | None = None) -> Path:
    if out:
        return paths.resolve(out)
    return paths.results_dir() / "bench" / "lengths" / rt_kind


def finish(record: dict[str, Any], rt: Runtime) -> dict[str, Any]:
    record["device"] = rt.kind
    record["device_name"] = accelerator_name(rt)
    record["versions"] = metrics._versions()
    record["finished_at"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    return record


# ----------------------------------------------------------------------------- the table


def read_records(folder: Path) -> list[dict[str, Any]]:
    return metrics.in_order(
        metrics.read_json_records(folder, ("case", "length_distribution", "nbzoo")),
        "case",
        list(CASES),
    )


def table(records: list[dict[str, Any]]) -> str:
    head = (
        "| case | device | shape | length distribution | padding | batch (rows padded → packed) "
        "| stock as seed seq/s | stock best seq/s | nbzoo seq/s | vs padded | vs stock best "
        "| loss rel. diff | load 1 min |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in records:
        m = r["machine"]
        rows.append(
            f"| {r['case']} | {r['device_name']} | {r['shape']} | {r['length_distribution']} "
            f"| {r['padding_fraction']:.0%} → {r['packed_padding_fraction']:.0%} "
            f"| {r['batch_size']} ({r['rows_padded']} → {r['rows_packed']}) "
            f"| {r['stock_seed']['samples_per_second']:.2f} "
            f"| {r['stock_best']['samples_per_second']:.2f} "
            f"| {r['nbzoo']['samples_per_second']:.2f} "
            f"| {r['ratio_vs_padded']:.2f}× | {r['ratio_vs_stock_best']:.2f}× "
            f"| {r['loss_rel_diff']:.1e} "
            f"| {m['load_average_1min_before']:.1f} → {m['load_average_1min_after']:.1f} |"
        )
    return head + "\n".join(rows) + "\n"


README_START, README_END = "<!-- bench-lengths:start -->", "<!-- bench-lengths:end -->"


def render_table(folder: Path) -> str:
    records = read_records(folder)
    if not records:
        return f"No real-length results in `{folder}` yet.\n"
    when = max(r["finished_at"] for r in records)
    note = (
        f"Generated by `python -m nbzoo.bench --table --lengths {records[0]['device']}` from "
        f"{len(records)} file(s) in `{paths.shown(folder)}`; latest run finished {when}.\n\n"
    )
    return note + table(records)
