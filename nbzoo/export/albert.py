"""ALBERT's offline-inference flow (the second half of seeds/002_albert.md) on top of the generic
export and runner modules: the seed's file names, its export shapes, the stage pipeline
export → simplify → optimize → int8 (dynamic quantization of the optimized graph), the static models
and the OM step (ATC, ais_bench, postprocess), PyTorch-eager timing on the runner's batches, and
the sweep seq × batch × stage that notebook 02 tabulates.

Timings are medians of repeated measurements with their interquartile range, so that one slow
batch on a busy machine does not move a conclusion.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nbzoo import infer, progress
from nbzoo.data import albert_preprocess
from nbzoo.export import atc, om, quantize
from nbzoo.export import onnx as onnx_export

INPUT_NAMES = albert_preprocess.INPUT_NAMES
OUTPUT_NAMES = ("logits",)
DYNAMIC_AXES = {name: {0: "batch", 1: "seq"} for name in INPUT_NAMES} | {"logits": {0: "batch"}}


def model_stem(seq_len: int | None, batch_size: int | None) -> str:
    """The seed's names: ``albert_seq128_bs32``; ``albert_dynamic`` for the dynamic-shape model."""
    if seq_len is None and batch_size is None:
        return "albert_dynamic"
    return f"albert_seq{seq_len}_bs{batch_size}"


@contextlib.contextmanager
def eager_attention(model) -> Iterator[None]:
    """Export with the plain attention (MatMul, Softmax, MatMul): the form ORT's fusion knows.
    transformers' SDPA path exports to a graph that ORT's attention fusion does not match."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def dummy_inputs(features: Mapping[str, np.ndarray], batch_size: int) -> dict[str, torch.Tensor]:
    """``batch_size`` real samples (repeated when there are fewer) as export inputs."""
    n = len(features[INPUT_NAMES[0]])
    rows = np.arange(batch_size) % n
    return {k: torch.from_numpy(np.ascontiguousarray(features[k][rows])) for k in INPUT_NAMES}


def export(
    model,
    features: Mapping[str, np.ndarray],
    folder: str | os.PathLike,
    batch_size: int | None = None,
    opset: int = onnx_export.DEFAULT_OPSET,
) -> Path:
    """``albert_seq{S}_bs{B}.onnx`` (static, S from ``features``) or, with ``batch_size=None``,
    ``albert_dynamic.onnx`` (dynamic batch and length)."""
    seq_len = features[INPUT_NAMES[0]].shape[1]
    dynamic = batch_size is None
    stem = model_stem(None if dynamic else seq_len, batch_size)
    model = model.eval().cpu()
    with eager_attention(model):
        return onnx_export.export_onnx(
            model,
            dummy_inputs(features, 2 if dynamic else batch_size),
            Path(folder) / f"{stem}.onnx",
            INPUT_NAMES,
            OUTPUT_NAMES,
            dynamic_axes=DYNAMIC_AXES if dynamic else None,
            opset=opset,
        )


@dataclass
class Stages:
    paths: dict[str, Path]  # stage name → model file, in pipeline order
    fused: dict[str, int]  # ORT's fused-operator counts of the optimized stage
    parity: dict[str, float]  # stage → max |logit difference| against PyTorch


FP32_STAGES = ("onnx", "onnx_sim", "onnx_opt")


def build_stages(
    model,
    features: Mapping[str, np.ndarray],
    folder: str | os.PathLike,
    opset: int = onnx_export.DEFAULT_OPSET,
    parity_samples: int = 64,
    int8: bool = True,
    show_progress: bool = True,
) -> Stages:
    """The seed's pipeline on the dynamic-shape model: export → ``_sim`` → ``_opt`` (ORT's
    fused transformer kernels), each checked against PyTorch on real samples; with ``int8`` also
    ``_int8``, ORT's dynamic quantization of the optimized graph (its fused Attention becomes
    QAttention, the way ORT's quantization guide does it for transformers)."""
    cfg = model.config
    steps = ["export", "simplify", "optimize"] + (["quantize int8"] if int8 else []) + ["parity"]
    bar = progress.bar(total=len(steps), desc="ONNX export", disable=not show_progress)
    try:
        bar.set_postfix_str("export", refresh=False)
        raw = export(model, features, folder, None, opset)
        bar.update()
        bar.set_postfix_str("simplify", refresh=False)
        sim = onnx_export.simplify(raw)
        bar.update()
        bar.set_postfix_str("optimize", refresh=False)
        opt = onnx_export.optimize(
            sim, model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size
        )
        bar.update()
        paths = {"onnx": raw, "onnx_sim": sim, "onnx_opt": opt.path}
        if int8:
            bar.set_postfix_str("quantize int8", refresh=False)
            paths["onnx_int8"] = quantize.quantize_dynamic(
                opt.path, opt.path.with_name(f"{raw.stem}_int8{raw.suffix}")
            )
            bar.update()
        bar.set_postfix_str("parity", refresh=False)
        sample = {k: v[:parity_samples] for k, v in features.items()}
        ref = onnx_export.torch_outputs(model, sample, INPUT_NAMES, OUTPUT_NAMES)
        parity = {
            name: onnx_export.parity_check(model, p, sample, OUTPUT_NAMES, reference=ref)
            for name, p in paths.items()
        }
        bar.update()
    finally:
        bar.close()
    return Stages(paths, opt.fused, parity)


def export_static(
    model,
    features: Mapping[str, np.ndarray],
    folder: str | os.PathLike,
    batch_size: int,
    opset: int = onnx_export.DEFAULT_OPSET,
    source: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """The seed's static model for ATC: ``albert_seq{S}_bs{B}.onnx`` → ``_sim`` → ``_opt``
    (standard ONNX operators only, which is what ATC converts). With ``source``, the dynamic
    export of the same model (``albert_dynamic.onnx``), the static model is that graph with its
    shapes fixed instead of a new trace: simplified, it is the graph the static trace gives."""
    if source is None:
        raw = export(model, features, folder, batch_size, opset)
    else:
        seq_len = features[INPUT_NAMES[0]].shape[1]
        dims = {name: {0: batch_size, 1: seq_len} for name in INPUT_NAMES}
        dims |= {name: {0: batch_size} for name in OUTPUT_NAMES}
        raw = onnx_export.fix_shapes(
            source, Path(folder) / f"{model_stem(seq_len, batch_size)}.onnx", dims
        )
    sim = onnx_export.simplify(raw)
    return {"onnx": raw, "onnx_sim": sim, "onnx_opt": onnx_export.optimize_standard(sim)}


# --- OM: ATC and ais_bench, as the seed runs them from its model folder --------------------------


@dataclass
class OmModel:
    seq: int
    batch: int
    atc: atc.AtcRun
    om: str | None  # relative to the work folder, as the seed's ais_bench line names it


def convert_om(
    work: str | os.PathLike, seq: int, batch: int, soc_version: str | None = None
) -> OmModel:
    """The seed's ATC line in ``work`` for ``outputs/albert_seq{S}_bs{B}_opt.onnx`` (made by
    :func:`export_static` in ``work/outputs``); skipped, and said so, without ATC."""
    stem = model_stem(seq, batch)
    run = atc.convert_albert(
        f"./outputs/{stem}_opt.onnx", f"./outputs/{stem}", batch, seq, soc_version, cwd=work
    )
    return OmModel(seq, batch, run, f"outputs/{stem}.om" if run.om_path else None)


def om_predict(
    work: str | os.PathLike, model: OmModel, samples: int
) -> tuple[np.ndarray, dict[str, float], om.AisBenchRun]:
    """The seed's ais_bench line in ``work`` (outputs in ``results/seq{S}_bs{B}``), then the
    postprocess: the logits of samples ``0..samples-1`` and the run's latency statistics."""
    if model.om is None:
        raise om.OmError(f"albert_seq{model.seq}_bs{model.batch}: no .om ({model.atc.message})")
    data = f"./preprocessed_data_seq{model.seq}"
    argv = om.ais_bench_command(
        model.om,
        [f"{data}/{name}" for name in INPUT_NAMES],
        "results",
        f"seq{model.seq}_bs{model.batch}",
        model.batch,
    )
    run = om.run_ais_bench(argv, work)
    stats = {**run.latency_ms, "throughput": run.throughput}
    return om.read_outputs(run, samples), stats, run


# --- PyTorch eager, timed on the runner's batches -----------------------------------------------


def batches(features: Mapping[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Consecutive batches; the last one padded with its own first sample, as the runner does."""
    n = len(features[INPUT_NAMES[0]])
    out = []
    for lo in range(0, n, batch_size):
        rows = np.arange(lo, min(lo + batch_size, n))
        rows = np.concatenate([rows, np.full(batch_size - len(rows), lo)])
        out.append({k: features[k][rows] for k in INPUT_NAMES})
    return out


def torch_predict(
    model, features: Mapping[str, np.ndarray], batch_size: int, loop: int = 1, warmup: int = 1
) -> tuple[np.ndarray, dict[str, float]]:
    """Logits of every sample and the latency statistics of ``model`` (PyTorch eager, fp32,
    inference mode) over the same padded batches the runner feeds ONNX Runtime."""
    n = len(features[INPUT_NAMES[0]])
    device = next(model.parameters()).device
    model.eval()
    feeds = [
        {k: torch.from_numpy(v).to(device) for k, v in b.items()}
        for b in batches(features, batch_size)
    ]
    times: list[float] = []
    logits = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(**feeds[0])
        for feed in feeds:
            t, out = infer.time_calls(lambda feed=feed: model(**feed).logits, loop)
            times += t
            logits.append(out.float().cpu().numpy())
    return np.concatenate(logits)[:n], infer.latency_stats(times, batch_size)


# --- the sweep ----------------------------------------------------------------------------------


def sweep(
    model,
    stages: Mapping[str, str | os.PathLike],
    data_dirs: Mapping[int, str | os.PathLike],
    batch_sizes: Sequence[int],
    output_root: str | os.PathLike,
    threads: int | None = None,
    loop: int = 1,
    warmup: int = 1,
    spinning: bool = True,
    om_models: Sequence[OmModel] = (),
    work: str | os.PathLike | None = None,
    show_progress: bool = True,
    seq_lengths: Sequence[int] | None = None,
    om_companions: Sequence[str] = ("onnx_opt",),
):
    """For every sequence length × batch size, and at the shape of every converted ``.om``:
    PyTorch eager and each ONNX stage (through the ais_bench-style runner, outputs written and
    read back by the postprocess), and the ``.om`` through ais_bench → accuracy, agreement with
    PyTorch's predictions, median throughput with its interquartile range, latency, the
    largest logit difference from PyTorch and the predicted class of every sample. The grid is ``seq_lengths`` (default: every length in
    ``data_dirs``) × ``batch_sizes``; an ``.om`` shape outside it gets PyTorch, the stages named
    in ``om_companions`` and the ``.om`` only. Returns a DataFrame."""
    import pandas as pd

    threads = threads or torch.get_num_threads()
    oms = {(m.seq, m.batch): m for m in om_models if m.om is not None}
    grid = {(s, b) for s in (seq_lengths or data_dirs) for b in batch_sizes}
    points = sorted(grid | set(oms))

    def stages_at(point):
        return {n: p for n, p in stages.items() if point in grid or n in om_companions}

    total = sum(1 + len(stages_at(p)) + (p in oms) for p in points)
    bar = progress.bar(total=total, desc="sweep", disable=not show_progress)
    rows = []
    # one ONNX Runtime session per stage, run at every shape (the stages have dynamic shapes)
    sessions: dict[str, infer.OrtBackend] = {}

    def session(name):
        if name not in sessions:
            sessions[name] = infer.OrtBackend(
                stages[name], ep="cpu", threads=threads, spinning=spinning
            )
        return sessions[name]

    try:
        loaded: dict[int, tuple] = {}
        for seq_len, bs in points:
            data_dir = data_dirs[seq_len]
            if seq_len not in loaded:
                loaded[seq_len] = albert_preprocess.load_features(data_dir)
            features, labels = loaded[seq_len]
            bar.set_postfix_str(f"seq {seq_len} batch {bs}: pytorch_eager", refresh=False)
            ref, stats = torch_predict(model, features, bs, loop, warmup)
            rows.append(
                _row("pytorch_eager", "PyTorch eager", seq_len, bs, ref, labels, stats, ref)
            )
            bar.update()
            for name, path in stages_at((seq_len, bs)).items():
                bar.set_postfix_str(f"seq {seq_len} batch {bs}: {name}", refresh=False)
                summary = infer.run(
                    path,
                    albert_preprocess.input_dirs(data_dir),
                    output=output_root,
                    output_dirname=f"{name}_seq{seq_len}_bs{bs}",
                    outfmt="NPY",
                    batchsize=bs,
                    loop=loop,
                    warmup_count=warmup,
                    backend=session(name),
                )
                logits = albert_preprocess.read_outputs(summary.output_dir, len(labels))
                stats = {**summary.latency_ms, "throughput": summary.throughput}
                rows.append(_row(name, summary.backend, seq_len, bs, logits, labels, stats, ref))
                bar.update()
            if (seq_len, bs) in oms:
                bar.set_postfix_str(f"seq {seq_len} batch {bs}: om (ais_bench)", refresh=False)
                logits, stats, run = om_predict(work, oms[seq_len, bs], len(labels))
                backend = "ais_bench " + (
                    "(stand-in: ONNX Runtime on the CPU)" if "standin" in run.summary else "(NPU)"
                )
                rows.append(_row("om", backend, seq_len, bs, logits, labels, stats, ref))
                bar.update()
    finally:
        bar.close()
    return pd.DataFrame(rows)


def _row(stage, backend, seq_len, bs, logits, labels, stats, ref) -> dict:
    # median batch latency → samples/s; the quartiles of the latency give its spread
    per_second = 1000.0 * bs / stats["p50"]
    q1, q3 = stats.get("q1", stats["p50"]), stats.get("q3", stats["p50"])
    return {
        "stage": stage,
        "backend": backend,
        "seq": seq_len,
        "batch": bs,
        "accuracy": float((logits.argmax(-1) == labels).mean()),
        "agreement with PyTorch": float((logits.argmax(-1) == ref.argmax(-1)).mean()),
        "samples/s": per_second,
        "samples/s IQR": (1000.0 * bs / q3, 1000.0 * bs / q1),
        "latency p50 (ms)": stats["p50"],
        "latency p99 (ms)": stats["p99"],
        "max |Δlogit| vs PyTorch": float(np.abs(logits.astype(np.float64) - ref).max()),
        "predictions": logits.argmax(-1),  # per sample: for paired comparisons (not recorded)
    }


def with_spread(table, value: str = "samples/s", spread: str = "samples/s IQR", digits: int = 0):
    """``value`` as text ``median [q1–q3]`` per row (for display)."""
    return table.apply(
        lambda r: f"{r[value]:.{digits}f} [{r[spread][0]:.{digits}f}–{r[spread][1]:.{digits}f}]",
        axis=1,
    )


# --- the benchmark at one shape ------------------------------------------------------------------

TORCH = "pytorch_eager"


@dataclass
class Benchmark:
    """Samples/s of PyTorch eager and of each ONNX model at one shape: one figure per model per
    round, the rounds alternating the models on the same batches so that a busy neighbour slows
    all alike; the 1, 5 and 15-minute load averages before and after."""

    samples_per_second: dict[str, list[float]]  # TORCH first, then each model, per round
    seq_len: int
    batch_size: int
    batches_per_round: int
    threads: int
    spinning: bool
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    omp_wait_policy: str = "default"

    @property
    def rounds(self) -> int:
        return len(self.samples_per_second[TORCH])

    def ratios(self, name: str, base: str = TORCH) -> list[float]:
        """``name``'s samples/s over ``base``'s, round by round (paired)."""
        a, b = self.samples_per_second[name], self.samples_per_second[base]
        return [x / y for x, y in zip(a, b, strict=True)]

    def to_dict(self) -> dict[str, object]:
        return {
            "samples_per_second": self.samples_per_second,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "batches_per_round": self.batches_per_round,
            "rounds": self.rounds,
            "threads": self.threads,
            "ort_spinning": self.spinning,
            "omp_wait_policy": self.omp_wait_policy,
            "load_average_before": list(self.load_before),
            "load_average_after": list(self.load_after),
        }


def benchmark(
    model,
    paths: Mapping[str, str | os.PathLike],
    features: Mapping[str, np.ndarray],
    batch_size: int,
    n_batches: int = 4,
    rounds: int = 3,
    threads: int | None = None,
    spinning: bool = True,
) -> Benchmark:
    """PyTorch eager and every ONNX model in ``paths`` on the same ``n_batches`` batches of
    ``features`` with the same thread count, ``rounds`` times. Each round times every one of
    them once, starting one place further along each round, so that neither a neighbour's burst
    nor the position in the round favours one. ``spinning=False`` makes ORT's idle threads
    sleep, as ``OMP_WAIT_POLICY=PASSIVE`` does for PyTorch's."""
    threads = threads or torch.get_num_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    data = batches(features, batch_size)[:n_batches]
    device = next(model.parameters()).device
    tfeeds = [{k: torch.from_numpy(v).to(device) for k, v in b.items()} for b in data]
    model.eval()
    runners = {TORCH: lambda feed_index: model(**tfeeds[feed_index])}
    for name, path in paths.items():
        backend = infer.OrtBackend(path, ep="cpu", threads=threads, spinning=spinning)
        runners[name] = lambda feed_index, backend=backend: backend(data[feed_index])
    samples = len(data) * batch_size
    per_second: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    load_before = os.getloadavg()
    try:
        with torch.inference_mode():
            for run in runners.values():
                run(0)  # warm-up: first-call allocations and ORT's kernel set-up
            for r in range(rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    tick = time.perf_counter()
                    for i in range(len(data)):
                        runners[name](i)
                    per_second[name].append(samples / (time.perf_counter() - tick))
    finally:
        torch.set_num_threads(previous)
    return Benchmark(
        per_second,
        seq_len=int(features[INPUT_NAMES[0]].shape[1]),
        batch_size=batch_size,
        batches_per_round=len(data),
        threads=threads,
        spinning=spinning,
        load_before=load_before,
        load_after=os.getloadavg(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"),
    )


def _quartiles(values: Sequence[float]) -> list[float]:
    return [float(np.percentile(values, 25)), float(np.percentile(values, 75))]


def speedup(
    model,
    onnx_path: str | os.PathLike | Mapping[str, str | os.PathLike],
    features: Mapping[str, np.ndarray],
    batch_size: int,
    n_batches: int = 4,
    rounds: int = 3,
    threads: int | None = None,
    spinning: bool = True,
) -> dict[str, object]:
    """:func:`benchmark` as one flat record (bench/onnx_speedup.py prints it): per model
    ``<name>_speedup`` (the median of the per-round ratios to PyTorch) with its IQR, and each
    side's median samples/s with its IQR; the first model is also reported under ``onnx_``."""
    paths = dict(onnx_path) if isinstance(onnx_path, Mapping) else {"onnx": onnx_path}
    bench = benchmark(model, paths, features, batch_size, n_batches, rounds, threads, spinning)
    result: dict[str, object] = {}
    for i, name in enumerate(paths):
        ratios = bench.ratios(name)
        sps = bench.samples_per_second[name]
        for key in [name] + (["onnx"] if i == 0 and name != "onnx" else []):
            result[f"{key}_speedup"] = float(np.median(ratios))
            result[f"{key}_speedup_iqr"] = _quartiles(ratios)
            result[f"{key}_samples_per_second"] = float(np.median(sps))
            result[f"{key}_samples_per_second_iqr"] = _quartiles(sps)
    torch_sps = bench.samples_per_second[TORCH]
    return result | {
        "torch_samples_per_second": float(np.median(torch_sps)),
        "torch_samples_per_second_iqr": _quartiles(torch_sps),
        "threads": bench.threads,
        "batch_size": batch_size,
        "seq_len": bench.seq_len,
        "rounds": rounds,
        "batches_per_round": bench.batches_per_round,
        "ort_spinning": spinning,
        "omp_wait_policy": bench.omp_wait_policy,
        "load_average_1min": bench.load_after[0],
    }


# --- the fine-tuned model ---------------------------------------------------------------------


@dataclass
class Source:
    model: torch.nn.Module
    tokenizer: object
    dev: object  # nbzoo.data.glue.GlueSplit
    checkpoint: Path
    trained_now: bool


def finetune_config(finetune_preset: str, **overrides):
    """Notebook 01's resolved preset (SST-2 only), without running notebook 01."""
    from nbzoo import presets

    keys = {k for table in presets.load("01_albert_glue").values() for k in table}
    namespace = {k: None for k in keys} | {"task": "sst2"} | overrides
    return presets.resolve("01_albert_glue", finetune_preset, namespace)


def load_or_finetune(checkpoint: str, finetune_preset: str, rt, **overrides) -> Source:
    """The SST-2 classifier fine-tuned by notebook 01: from ``checkpoint`` (or, when empty, where
    01's ``finetune_preset`` saves it) if it is there, else trained now with that preset through
    ``nbzoo.finetune.finetune_glue``. The dev split comes from the same preset's data."""
    from nbzoo import finetune, paths

    cfg = finetune_config(finetune_preset, seed=rt.seed, **overrides)
    data = finetune.prepare_data("sst2", cfg)
    path = paths.resolve(checkpoint) if checkpoint else finetune.checkpoint_path(cfg, "sst2")
    if (path / "config.json").exists():
        model, tokenizer = finetune.load_finetuned(path)
        return Source(model, tokenizer, data["dev"], path, trained_now=False)
    if checkpoint:
        raise FileNotFoundError(f"{path}: no fine-tuned checkpoint (config.json) here")
    run = finetune.finetune_glue("sst2", cfg, rt, data=data)
    model = run.model.cpu().eval()
    return Source(model, run.tokenizer, data["dev"], run.checkpoint, trained_now=True)
