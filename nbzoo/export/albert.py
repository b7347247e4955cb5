"""ALBERT's offline-inference flow (the second half of seeds/002_albert.md) on top of the generic
export and runner modules: the seed's file names, its export shapes, the stage pipeline
export → simplify → optimize, PyTorch-eager timing on the runner's batches, and the sweep
seq × batch × stage that notebook 02 tabulates.
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

from nbzoo import infer
from nbzoo.data import albert_preprocess
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


def build_stages(
    model,
    features: Mapping[str, np.ndarray],
    folder: str | os.PathLike,
    opset: int = onnx_export.DEFAULT_OPSET,
    parity_samples: int = 64,
) -> Stages:
    """The seed's pipeline on the dynamic-shape model: export → ``_sim`` → ``_opt`` (ORT's
    fused transformer kernels), each checked against PyTorch on real samples."""
    cfg = model.config
    raw = export(model, features, folder, None, opset)
    sim = onnx_export.simplify(raw)
    opt = onnx_export.optimize(
        sim, model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size
    )
    paths = {"onnx": raw, "onnx_sim": sim, "onnx_opt": opt.path}
    sample = {k: v[:parity_samples] for k, v in features.items()}
    parity = {name: onnx_export.parity_check(model, p, sample) for name, p in paths.items()}
    return Stages(paths, opt.fused, parity)


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
):
    """For every sequence length × batch size: PyTorch eager and each ONNX stage (through the
    ais_bench-style runner, outputs written and read back by the postprocess) → accuracy,
    throughput, latency and the largest logit difference from PyTorch. Returns a DataFrame."""
    import pandas as pd

    rows = []
    threads = threads or torch.get_num_threads()
    for seq_len, data_dir in data_dirs.items():
        features, labels = albert_preprocess.load_features(data_dir)
        for bs in batch_sizes:
            ref, stats = torch_predict(model, features, bs, loop, warmup)
            rows.append(_row("pytorch_eager", seq_len, bs, ref, labels, stats, ref))
            for name, path in stages.items():
                summary = infer.run(
                    path,
                    albert_preprocess.input_dirs(data_dir),
                    output=output_root,
                    output_dirname=f"{name}_seq{seq_len}_bs{bs}",
                    outfmt="NPY",
                    batchsize=bs,
                    loop=loop,
                    warmup_count=warmup,
                    ep="cpu",
                    threads=threads,
                    spinning=spinning,
                )
                logits = albert_preprocess.read_outputs(summary.output_dir, len(labels))
                stats = {**summary.latency_ms, "throughput": summary.throughput}
                rows.append(_row(name, seq_len, bs, logits, labels, stats, ref))
    return pd.DataFrame(rows)


def _row(stage, seq_len, bs, logits, labels, stats, ref) -> dict:
    return {
        "stage": stage,
        "seq": seq_len,
        "batch": bs,
        "accuracy": float((logits.argmax(-1) == labels).mean()),
        "samples/s": stats["throughput"],
        "latency p50 (ms)": stats["p50"],
        "latency p99 (ms)": stats["p99"],
        "max |Δlogit| vs PyTorch": float(np.abs(logits.astype(np.float64) - ref).max()),
    }


# --- the headline speed-up --------------------------------------------------------------------


def speedup(
    model,
    onnx_path: str | os.PathLike,
    features: Mapping[str, np.ndarray],
    batch_size: int,
    n_batches: int = 4,
    rounds: int = 3,
    threads: int | None = None,
    spinning: bool = True,
) -> dict[str, float]:
    """ONNX Runtime samples/s over PyTorch eager samples/s on the same batches and thread count,
    measured in alternating rounds (so that a noisy neighbour slows both alike); each side's
    throughput is its median over the rounds. ``spinning=False`` makes ORT's idle threads sleep,
    as ``OMP_WAIT_POLICY=PASSIVE`` does for PyTorch's."""
    threads = threads or torch.get_num_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    data = batches(features, batch_size)[:n_batches]
    backend = infer.OrtBackend(onnx_path, ep="cpu", threads=threads, spinning=spinning)
    device = next(model.parameters()).device
    tfeeds = [{k: torch.from_numpy(v).to(device) for k, v in b.items()} for b in data]
    model.eval()
    ort_sps, torch_sps = [], []
    try:
        with torch.inference_mode():
            model(**tfeeds[0])
            backend(data[0])
            for _ in range(rounds):
                tick = time.perf_counter()
                for feed in tfeeds:
                    model(**feed)
                torch_sps.append(len(data) * batch_size / (time.perf_counter() - tick))
                tick = time.perf_counter()
                for feed in data:
                    backend(feed)
                ort_sps.append(len(data) * batch_size / (time.perf_counter() - tick))
    finally:
        torch.set_num_threads(previous)
    onnx_sps, eager_sps = float(np.median(ort_sps)), float(np.median(torch_sps))
    return {
        "onnx_speedup": onnx_sps / eager_sps,
        "onnx_samples_per_second": onnx_sps,
        "torch_samples_per_second": eager_sps,
        "threads": threads,
        "batch_size": batch_size,
        "seq_len": int(features[INPUT_NAMES[0]].shape[1]),
        "rounds": rounds,
        "batches_per_round": len(data),
        "ort_spinning": spinning,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "load_average_1min": os.getloadavg()[0],
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
