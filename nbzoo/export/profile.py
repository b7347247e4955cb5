"""Where an ONNX model's time goes, kernel by kernel: ONNX Runtime's own profiler (the session
option ``enable_profiling``, which records every kernel's start and duration as Chrome-trace
JSON), summed per operator type. Generic over models: it reads only the trace.

ONNX Runtime optimizes every graph again when it loads it (fusing LayerNorm, GELU, MatMul + scale
into its own kernels, at ``ORT_ENABLE_ALL``), so a profile shows the kernels that actually run --
not the nodes of the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class KernelProfile:
    """One model's profile: per operator type, the milliseconds per run and the kernels per run.
    Each kernel counts with its fastest run: the profiler measures wall time, and on a busy
    machine a kernel the scheduler interrupts takes longer without doing more work; the fastest
    of several runs is the one nobody interrupted."""

    model: str
    runs: int
    kernels_per_run: int
    run_ms: float  # the fastest run, as the profiler measured it
    op_ms: dict[str, float]  # operator type → ms per run (each kernel's fastest run), largest first
    op_calls: dict[str, int]  # operator type → kernels of that type per run


def _trace_events(path: Path) -> list[dict]:
    events = json.loads(path.read_text(encoding="utf-8"))
    return events if isinstance(events, list) else events.get("traceEvents", [])


def summarize(events: list[dict], model: str = "", skip: int = 0) -> KernelProfile:
    """A profile from ONNX Runtime's trace events: ``model_run`` (one per run) and the nodes'
    ``*_kernel_time`` events, which follow their run's order; the first ``skip`` runs (warm-up)
    left out."""
    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    kernels = [
        e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
    ]
    if len(runs) <= skip:
        raise ValueError(f"{model or 'profile'}: the trace holds {len(runs)} runs, {skip} skipped")
    per_run = len(kernels) // len(runs)
    kernels, runs = kernels[skip * per_run : per_run * len(runs)], runs[skip:]
    fastest: dict[tuple[int, str], float] = {}  # (position in the run, op) → fastest ms
    for i, event in enumerate(kernels):
        key = (i % per_run, event["args"]["op_name"])
        ms = event["dur"] / 1000.0
        fastest[key] = min(fastest.get(key, ms), ms)
    op_ms: dict[str, float] = {}
    calls: dict[str, int] = {}
    for (_, op), ms in fastest.items():
        op_ms[op] = op_ms.get(op, 0.0) + ms
        calls[op] = calls.get(op, 0) + 1
    return KernelProfile(
        model=model,
        runs=len(runs),
        kernels_per_run=per_run,
        run_ms=min(runs) / 1000.0,
        op_ms=dict(sorted(op_ms.items(), key=lambda kv: -kv[1])),
        op_calls=calls,
    )


def profile(
    path: str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    runs: int = 10,
    threads: int = 1,
    spinning: bool = False,
) -> KernelProfile:
    """Run ``path`` on ``feeds`` ``runs`` times (after one warm-up run, left out) under ONNX
    Runtime's profiler on the CPU; the trace goes to a temporary folder and is removed."""
    import onnxruntime as ort

    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    with tempfile.TemporaryDirectory(prefix="nbzoo-profile-") as folder:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            session.run(None, dict(feeds))
        trace = Path(session.end_profiling())
        return summarize(_trace_events(trace), Path(path).name, skip=1)
