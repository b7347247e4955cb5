"""``nbzoo bench`` on real length distributions: padding, stock at its best, and packing.

Each case draws a pool of sentences (or pre-training samples) whose token lengths follow a
distribution modelled from published figures (``nbzoo/length_histograms.json``, each with its
source; MLPerf's Wikipedia lengths are nbzoo's model of BERT's sampling, calibrated to the 50 %
padding Krell et al. state, not their histogram), or a padding sweep, and trains four paths on
the same sentences:

- ``stock_seed``: transformers as the seed runs it: every sequence padded to ``max_length``,
  eager attention (the seed's transformers 4.28 had no SDPA), batches in the sampler's order;
- ``stock_best``: transformers at its best without packing: length-grouped batches (what
  ``Trainer(group_by_length=True)`` does: sorted by length within mega-batches of 50 batches),
  dynamic padding to the longest in the batch (a multiple of 8), SDPA, bf16 autocast on
  accelerators, ``torch.compile`` where it works (not on a CPU);
- ``nbzoo_plain``: ``packing = "plain"``: the sentences of ``stock_seed``'s steps packed into
  rows of ``max_length`` (``nbzoo.packing``: SPFHP, a block-diagonal attention mask -- SDPA's,
  or FlexAttention's under ``torch.compile`` on CUDA --, per-sequence heads), BERT's MLM head on
  the labelled positions;
- ``nbzoo``: ``packing = "length"``, nbzoo at its best: the sentences of ``stock_best``'s steps
  (the same grouping: ``nbzoo.length_grouping``), each step laid end to end in one row (a
  multiple of 8 long, as stock pads) and attended per sequence (``nbzoo.varlen_attention``:
  torch's varlen FlashAttention on CUDA in bf16 without attention dropout, else each sequence
  padded to the step's longest for SDPA), otherwise as ``nbzoo_plain``.

Every path trains on the same sentences: one mega-batch is drawn, grouped by length, and
``batches`` of its batches evenly spaced in length order are timed (a sample stratified by
length); the padded and plain paths take the same sentences in the order they were drawn.
The paths alternate step by step (who goes first rotates every round), for ``rounds`` rounds
over those batches, so that a busy machine slows all of them alike. Throughput is sequences
per second per round; a record holds each path's median over the rounds, and each ratio's
median and interquartile range over the rounds (the ratio taken within each round).
``loss_rel_diff`` holds the first batch's loss (eval mode, dropout off) packed against padded,
the same sentences: float rounding. ``goal`` is issue 27's target for the case.
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

import numpy as np
import torch

from nbzoo import (
    bert_sample_lengths,
    length_grouping,
    metrics,
    packing,
    paths,
    perf,
)
from nbzoo.device import Runtime, accelerator_name, cpu_description

MASK_FRACTION = 0.15
GROUPED_BATCHES = 50  # transformers' LengthGroupedSampler sorts mega-batches of 50 batches
PATHS = ("stock_seed", "stock_best", "nbzoo_plain", "nbzoo")
SWEEP = (0, 25, 50, 75, 90)  # padding percentages of the padding sweep
SWEEP_BATCHES = (8, 32)  # batch 8, and the seeds' 32 (01, 03)
ROUNDS = 5  # rounds over a case's timed batches (the CPU shapes of the big cases take fewer)
ROW_MULTIPLE = packing.ROW_MULTIPLE  # stock pads to a multiple of it, nbzoo's one-row steps too


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
    batch_size: int  # sequences per optimizer step (every path)
    batches: int  # timed steps per path per round
    pretraining: bool = False
    cpu: dict[str, Any] = field(default_factory=dict)  # smaller shapes on a CPU, named
    goal: tuple[str, float] = ("stock_best", 1.0)  # nbzoo's median ratio over that path, at least


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
            "albert_base_sst2", "ALBERT-base, SST-2 lengths, max 128",
            "AlbertForSequenceClassification", _albert_base, "sst2_128", 32, 8,
            cpu={"batches": 4, "rounds": 3}, goal=("stock_seed", 5.0),
        ),
        LengthCase(
            "bert_large_mlperf512", "BERT-Large MLM+NSP, MLPerf Wikipedia lengths, max 512",
            "BertForPreTraining", _bert_large, "wikipedia_phase2_512", 12, 8, pretraining=True,
            cpu={"batches": 2, "rounds": 3, "config": {"num_hidden_layers": 2}},
            goal=("stock_seed", 1.7),
        ),
    ]  # fmt: skip
    for batch in SWEEP_BATCHES:
        for pct in SWEEP:
            cases.append(
                LengthCase(
                    f"albert_base_pad{pct:02d}_b{batch}",
                    f"ALBERT-base, {pct} % padding at 128, batch {batch}",
                    "AlbertForSequenceClassification", _albert_base, f"padding_{pct}", batch,
                    6 if batch < 32 else 4, cpu={"config": {"num_hidden_layers": 2}},
                    goal=("stock_best", 0.97 if pct == 0 else 1.0),
                )
            )  # fmt: skip
    return {c.name: c for c in cases}


CASES = _cases()
GROUPS = {
    "real_lengths": ["albert_base_sst2", "bert_large_mlperf512"],
    "padding_sweep": [f"albert_base_pad{p:02d}_b{b}" for b in SWEEP_BATCHES for p in SWEEP],
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


def timed_steps(lengths: list[int], batch_size: int, n_batches: int):
    """(grouped, arrival, picked): ``n_batches`` of the pool's length-grouped batches, evenly
    spaced in length order (``picked``: their numbers), and the same sentences in the order they
    were drawn, cut into batches as the sampler would."""
    groups = length_grouping.GroupedBatches(
        range(len(lengths)), lengths, batch_size, mult=GROUPED_BATCHES
    )
    picked = sorted(
        {round(i * (len(groups) - 1) / max(1, n_batches - 1)) for i in range(n_batches)}
    )
    grouped = [groups[i] for i in picked]
    chosen = sorted(i for g in grouped for i in g)
    arrival = [chosen[i : i + batch_size] for i in range(0, len(chosen), batch_size)]
    return grouped, arrival, picked


def padded_batches(items, steps, multiple: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Each step's items padded to ``max_length`` (``multiple`` None: as the seed pads), or to
    the step's longest sequence rounded up to ``multiple`` (dynamic padding)."""
    out = []
    for idx in steps:
        batch = torch.utils.data.default_collate([items[i] for i in idx])
        if multiple is not None:
            full = batch["input_ids"].shape[1]
            longest = int(batch["attention_mask"].sum(dim=1).max())
            width = min(full, -(-longest // multiple) * multiple)
            batch = {k: (v[:, :width].contiguous() if v.ndim == 2 else v) for k, v in batch.items()}
        out.append(batch)
    return out


def packed_batches(case: LengthCase, items, steps, max_length: int, one_row: bool):
    """nbzoo: each step's sentences packed into rows of ``max_length`` (``plain``), or laid end
    to end in one row (``length``: :func:`nbzoo.packing.one_row`)."""
    labels = dict(token_labels=("labels",), sequence_labels=("next_sentence_label",))
    collate = packing.PackedCollator(
        max_length, one_row=one_row, row_multiple=ROW_MULTIPLE,
        **(labels if case.pretraining else {}),
    )  # fmt: skip
    out = []
    for idx in steps:
        batch = collate([items[i] for i in idx])
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
    round_seconds: list[float] = field(default_factory=list)
    sequences: int = 0  # per round
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
FALLS_BACK = ("flex_attention",)  # to SDPA's block-diagonal mask


def _falling_back(path: Path_, run: Callable[[], Any]) -> Any:
    """``run()``; where it fails, fall back (recording why) and run again: first off
    torch.compile, then (nbzoo) from FlexAttention to SDPA's block-diagonal mask."""
    while True:
        try:
            return run()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            path.optimizer.zero_grad(set_to_none=True)
            if path.module is not path.model:
                path.error = (path.error or "") + f"compile: {error}; "
                path.module, path.mode = path.model, path.mode.replace(COMPILED, "")
            elif (attention := path.model.config._attn_implementation) in FALLS_BACK:
                path.error = (path.error or "") + f"{attention}: {error}; "
                path.model.set_attn_implementation("sdpa")
                path.mode = path.mode.replace(attention, "sdpa")
            else:
                raise


def _eval_loss(path: Path_, rt: Runtime) -> float:
    """The path's loss on its first batch, dropout off, under the path's autocast."""
    ctx = rt.autocast() if path.autocast else contextlib.nullcontext()

    def loss() -> float:
        with torch.no_grad(), ctx:
            return float(path.model(**path.batches[0]).loss)

    path.model.eval()
    try:
        return _falling_back(path, loss)
    finally:
        path.model.train()


def median_iqr(values: list[float]) -> dict[str, Any]:
    """Median and interquartile range (numpy's 25th and 75th percentiles) of per-round values."""
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "iqr": [float(q1), float(q3)], "rounds": list(values)}


RATIOS = {  # name -> (numerator path, denominator path)
    "nbzoo_vs_stock_seed": ("nbzoo", "stock_seed"),
    "nbzoo_vs_stock_best": ("nbzoo", "stock_best"),
    "nbzoo_plain_vs_stock_best": ("nbzoo_plain", "stock_best"),
    "nbzoo_vs_nbzoo_plain": ("nbzoo", "nbzoo_plain"),
    "stock_best_vs_stock_seed": ("stock_best", "stock_seed"),
}


QUICK = {  # --quick: toy sizes of every case (tests, the CPU run of bench/gpu_check.sh)
    "batch_size": 4,
    "batches": 2,
    "rounds": 2,
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
    rounds: int | None = None,
) -> dict[str, Any]:
    """Measure one case: the four paths, interleaved step by step, on the same sentences."""
    import transformers

    on_cpu = rt.kind == "cpu"
    shape = QUICK if quick else case.cpu if on_cpu else {}
    batch_size = shape.get("batch_size", case.batch_size)
    n_batches = shape.get("batches", case.batches)
    rounds = rounds or shape.get("rounds", ROUNDS)
    config = case.config(shape.get("config", {}))
    pool_lengths, max_length, source = sample_lengths(
        case.distribution, GROUPED_BATCHES * batch_size, seed
    )
    pool = make_pool(case, config, pool_lengths, max_length, seed)
    grouped, arrival, picked = timed_steps(pool_lengths, batch_size, n_batches)
    lengths = [pool_lengths[i] for g in grouped for i in g]
    torch.manual_seed(0)
    state = getattr(transformers, case.model_class)(config).state_dict()

    def fresh(attention: str, nbzoo: bool = False) -> torch.nn.Module:
        model = getattr(transformers, case.model_class)(config)
        model.load_state_dict(state)
        model.set_attn_implementation(attention)
        model._nbzoo_sparse_mlm = nbzoo  # BERT: the MLM head on labelled positions (perf path)
        return model.to(rt.device).train()

    amp = rt.precision in ("bf16", "fp16") and not on_cpu
    suffix = f", {rt.precision}" if amp else ""
    compile_ = (not on_cpu) if compile_ is None else compile_
    plain_attention = packing.attention_implementation(rt.kind, mode="plain", compiled=compile_)
    length_attention = packing.attention_implementation(rt.kind, mode="length")
    made = {
        "stock_seed": (fresh("eager"), padded_batches(pool, arrival),
                       "padded to max_length, eager attention"),
        "stock_best": (fresh("sdpa"), padded_batches(pool, grouped, ROW_MULTIPLE),
                       f"length-grouped, dynamic padding (multiple of {ROW_MULTIPLE}), sdpa"),
        "nbzoo_plain": (fresh(plain_attention, nbzoo=True),
                        packed_batches(case, pool, arrival, max_length, False),
                        f"sampler's order, packed (SPFHP) into rows of {max_length}, "
                        f"{plain_attention} block-diagonal"),
        "nbzoo": (fresh(length_attention, nbzoo=True),
                  packed_batches(case, pool, grouped, max_length, True),
                  f"length-grouped, each step one row (a multiple of {ROW_MULTIPLE}), "
                  f"{length_attention} attention per sequence"),
    }  # fmt: skip
    paths_ = {}
    for name, (model, batches, mode) in made.items():
        module = model
        if compile_ and name != "stock_seed":
            module, mode = torch.compile(model, dynamic=True), mode + COMPILED
        paths_[name] = Path_(
            name, model, module, perf.make_optimizer(model, rt),
            [rt.to_device(b) for b in batches], amp, mode + suffix,
        )  # fmt: skip
    real_tokens = sum(lengths)
    computed = {n: sum(int(b["input_ids"].numel()) for b in p.batches) for n, p in paths_.items()}
    load_before = os.getloadavg()
    record: dict[str, Any] = {
        "case": case.name,
        "title": case.title,
        "model_class": case.model_class,
        "length_distribution": case.distribution,
        "source": source,
        "max_length": max_length,
        "batch_size": batch_size,
        "sequences": len(lengths),
        "rounds": rounds,
        "shape": _shape_note(shape, batch_size, n_batches, rounds),
        "config_overrides": shape.get("config", {}),
        "mean_length": real_tokens / len(lengths),
        "padding_fraction": packing.padding_fraction(lengths, max_length),
        "padding_left": {n: 1 - real_tokens / computed[n] for n in PATHS},
        "rows": {
            n: sum(int(b["input_ids"].shape[0]) for b in p.batches) for n, p in paths_.items()
        },
        "row_lengths": {
            n: [int(b["input_ids"].shape[1]) for b in paths_[n].batches]
            for n in ("stock_best", "nbzoo")
        },
        "tokens_computed": computed,
        "grouping": f"{len(grouped)} of the {len(pool) // batch_size} length-grouped batches of "
        f"one mega-batch of {len(pool)} sequences (nbzoo.length_grouping, as transformers' "
        f"LengthGroupedSampler), evenly spaced in length order: {picked}; stock_seed and "
        "nbzoo_plain take the same sentences in the order they were drawn",
        "row_multiple": ROW_MULTIPLE,
        "precision": rt.precision if amp else "fp32",
        "warmup": warmup,
    }
    with packing.packed_training(paths_["nbzoo"].model, rt.kind):
        # the same sentences, padded and packed: the first batch's loss, dropout off
        record["loss_rel_diff"] = {
            f"{packed}_vs_{padded}": _rel_diff(
                _eval_loss(paths_[packed], rt), _eval_loss(paths_[padded], rt)
            )
            for packed, padded in (("nbzoo_plain", "stock_seed"), ("nbzoo", "stock_best"))
        }
        for p in paths_.values():  # warm-up (compiles), untimed
            for w in range(warmup):
                _falling_back(p, lambda p=p, w=w: _step(p, p.batches[w % len(p.batches)], rt))
        for r in range(rounds):  # who goes first rotates every round
            order = [paths_[PATHS[(r + k) % len(PATHS)]] for k in range(len(PATHS))]
            for p in order:
                p.round_seconds.append(0.0)
            for i in range(len(grouped)):  # interleaved: one step of each path in turn
                for p in order:
                    seconds = _step(p, p.batches[i], rt)
                    p.times.append(seconds)
                    p.round_seconds[-1] += seconds
    load_after = os.getloadavg()
    rates = {}
    for name, p in paths_.items():
        p.sequences = sum(_sequences(b) for b in p.batches)
        rates[name] = [p.sequences / s for s in p.round_seconds]
        summary = median_iqr(rates[name])
        record[name] = {
            "mode": p.mode,
            "sequences_per_round": p.sequences,
            "samples_per_second": summary["median"],
            "samples_per_second_iqr": summary["iqr"],
            "round_samples_per_second": summary["rounds"],
            "step_seconds": p.times,
            **({"fallback_errors": p.error} if p.error else {}),
        }
    record["ratios"] = {
        name: median_iqr([a / b for a, b in zip(rates[top], rates[bottom], strict=True)])
        for name, (top, bottom) in RATIOS.items()
    }
    against, at_least = case.goal
    got = record["ratios"][f"nbzoo_vs_{against}"]["median"]
    record["goal"] = {"against": against, "at_least": at_least, "met": got >= at_least}
    record["machine"] = {
        **({"cpu": cpu_description()} if on_cpu else {}),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_before": round(load_before[0], 2),
        "load_average_1min_after": round(load_after[0], 2),
    }
    return record


def _rel_diff(got: float, ref: float) -> float:
    return abs(got - ref) / abs(ref)


def _shape_note(shape: dict[str, Any], batch_size: int, n_batches: int, rounds: int) -> str:
    config = ", ".join(f"{k}={v}" for k, v in shape.get("config", {}).items())
    where = "quick shape" if shape is QUICK else "CPU shape" if shape else "full shape"
    note = f"{where}: {rounds} rounds of {n_batches} steps of {batch_size}"
    return note + (f", {config}" if config else "")


def output_dir(rt_kind: str, out: str | None = None) -> Path:
    if out:
        return paths.resolve(out)
    return paths.results_dir() / "bench" / "lengths" / rt_kind


def finish(record: dict[str, Any], rt: Runtime, run: dict[str, Any]) -> dict[str, Any]:
    """Stamp a case's record with the device, versions, and ``run``: the invocation it belongs
    to (``started``, ``command``), which the table keeps together."""
    record["device"] = rt.kind
    record["device_name"] = (
        record["machine"]["cpu"]["model_name"]
        if "cpu" in record["machine"]
        else accelerator_name(rt)
    )
    record["versions"] = metrics._versions()
    record["run"] = dict(run)
    record["finished_at"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    return record


def run_stamp(command: str) -> dict[str, Any]:
    """What ties the records of one invocation together."""
    return {"started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "command": command}
