"""The seed's OM flow after ATC: ``python3 -m ais_bench`` over the preprocessed folders, and the
postprocess of what ais_bench writes.

The seed (seeds/002_albert.md, "执行推理") runs, from the model's folder::

    python3 -m ais_bench --model outputs/albert_seq128_bs32.om \\
        --input ./preprocessed_data_seq128/input_ids,./preprocessed_data_seq128/attention_mask,./preprocessed_data_seq128/token_type_ids \\
        --output results --output_dirname seq128_bs32 --outfmt NPY --batchsize 32

ais_bench (Ascend/tools, ais-bench_workload/tool/ais_bench/ais_bench/infer: ``io_oprations.
save_tensors_to_file`` and ``summary.report``) then leaves:

* ``results/seq128_bs32/{stem}_{k}.npy``: output ``k`` of the sample whose first input file is
  ``{stem}.npy`` (``123.npy`` → ``123_0.npy``); rows of the padded last batch are not written;
* ``results/seq128_bs32_summary.json``: ``filesinfo`` (sample id → ``infiles``, ``outfiles``),
  ``NPU_compute_time`` (min / max / mean / median / ``percentile(99%)`` / count, ms per batch),
  ``npu_compute_time_list``, ``throughput`` (``1000 * batchsize / mean``), ``args``, ``pid``.

:func:`find_tools` says which tools this machine has: CANN's own, the stand-ins of
:mod:`nbzoo.export.cann_standins` (test tooling, recognised by their marker), or none.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nbzoo.export import cann_standins


class OmError(RuntimeError):
    """ais_bench failed or left outputs the postprocess cannot read; the message says which."""


# --- which tools -----------------------------------------------------------------------------


@dataclass
class Tool:
    name: str
    path: str | None
    kind: str  # "CANN" | "stand-in" | "absent"

    def describe(self) -> str:
        if self.kind == "absent":
            return "not found"
        if self.kind == "stand-in":
            return f"stand-in (test tooling, nbzoo.export.cann_standins): {self.path}"
        return f"installed: {self.path}"


def _kind(path: str | None) -> str:
    if path is None:
        return "absent"
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return "CANN"
    return "stand-in" if cann_standins.MARKER.encode() in head else "CANN"


def find_tools() -> dict[str, Tool]:
    """``atc`` and ``npu-smi`` on PATH; ``ais_bench`` importable (the seed runs
    ``python3 -m ais_bench``; subprocesses inherit PYTHONPATH)."""
    tools = {}
    for name in ("atc", "npu-smi"):
        path = shutil.which(name)
        tools[name] = Tool(name, path, _kind(path))
    spec = importlib.util.find_spec("ais_bench")
    origin = spec.origin if spec is not None else None
    tools["ais_bench"] = Tool("ais_bench", origin, _kind(origin))
    return tools


def flow_kind(tools: dict[str, Tool]) -> str:
    """``CANN`` (the real tools), ``stand-ins``, ``mixed`` or ``skipped`` (atc or ais_bench absent)."""
    kinds = {tools["atc"].kind, tools["ais_bench"].kind}
    if "absent" in kinds:
        return "skipped"
    if kinds == {"CANN"}:
        return "CANN"
    return "stand-ins" if kinds == {"stand-in"} else "mixed"


# --- the run ---------------------------------------------------------------------------------


def ais_bench_command(
    model: str,
    inputs: Sequence[str],
    output: str,
    output_dirname: str,
    batchsize: int,
    outfmt: str = "NPY",
    python: str = sys.executable,
) -> list[str]:
    """The seed's ais_bench flags, in its order; paths as given (the seed's are relative to the
    model's folder, e.g. ``outputs/albert_seq128_bs32.om``)."""
    return [
        python,
        "-m",
        "ais_bench",
        "--model",
        model,
        "--input",
        ",".join(inputs),
        "--output",
        output,
        "--output_dirname",
        output_dirname,
        "--outfmt",
        outfmt,
        "--batchsize",
        str(batchsize),
    ]


@dataclass
class AisBenchRun:
    command: str
    cwd: Path  # where ais_bench ran: the summary's file names are relative to it
    output_dir: Path
    summary: dict
    stdout: str = ""
    latency_ms: dict[str, float] = field(default_factory=dict)
    throughput: float = 0.0  # ais_bench's: 1000 * batchsize / mean NPU compute time (ms)


def read_summary(path: str | os.PathLike) -> dict:
    """An ais_bench ``*_summary.json``, checked for the fields the postprocess uses."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OmError(f"{path}: ais_bench wrote no summary here") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OmError(f"{path}: not ais_bench's JSON summary ({exc})") from None
    npu = data.get("NPU_compute_time") if isinstance(data, dict) else None
    if not isinstance(npu, dict) or not {"mean", "median", "count"} <= set(npu):
        raise OmError(f"{path}: no NPU_compute_time (mean, median, count) in ais_bench's summary")
    return data


def run_ais_bench(argv: Sequence[str], cwd: str | os.PathLike) -> AisBenchRun:
    """Run ais_bench (``argv`` from :func:`ais_bench_command`) in ``cwd``; read its summary."""
    opts = dict(zip(argv[3::2], argv[4::2], strict=False))
    output_dir = Path(cwd) / opts["--output"] / opts["--output_dirname"]
    summary_path = output_dir.with_name(f"{output_dir.name}_summary.json")
    # a previous run's summary must not pass for this run's when ais_bench dies before writing;
    # it is told apart by its identity, not deleted (it may be a file of the user's)
    before = _identity(summary_path)
    done = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    line = shlex.join(argv)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
        raise OmError(f"ais_bench failed (exit {done.returncode}):\n{line}\n{tail}")
    if before is not None and _identity(summary_path) == before:
        raise OmError(f"{summary_path}: ais_bench exited 0 but left the previous run's summary")
    summary = read_summary(summary_path)
    npu = summary["NPU_compute_time"]
    times = np.asarray(summary.get("npu_compute_time_list") or [npu["median"]], dtype=np.float64)
    latency = {
        "mean": float(npu["mean"]),
        "p50": float(npu["median"]),
        "p99": float(npu.get("percentile(99%)", npu["max"])),
        "q1": float(np.percentile(times, 25)),
        "q3": float(np.percentile(times, 75)),
        "count": int(npu["count"]),
    }
    return AisBenchRun(
        line, Path(cwd), output_dir, summary, done.stdout, latency, float(summary["throughput"])
    )


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def read_outputs(run: AisBenchRun, samples: int, output_index: int = 0) -> np.ndarray:
    """Output ``output_index`` of samples ``0..samples-1`` (input files ``{i}.npy``), stacked.

    The files are those the summary's ``filesinfo`` says this run wrote, named as ais_bench names
    them (``{i}_{k}.npy``); a sample missing from either is an error naming it."""
    info = run.summary.get("filesinfo") or {}
    by_stem: dict[str, str] = {}
    for entry in info.values():
        stem = os.path.basename(entry["infiles"][0]).split(".")[0]
        by_stem[stem] = entry["outfiles"][output_index]
    rows = []
    for i in range(samples):
        name = by_stem.get(str(i))
        if name is None:
            raise OmError(
                f"{run.output_dir}_summary.json: ais_bench reports no output for sample {i} "
                f"({len(by_stem)} samples in filesinfo, {samples} expected)"
            )
        path = Path(name)
        path = path if path.is_absolute() else run.cwd / path
        if path.name != f"{i}_{output_index}{path.suffix}" or not path.exists():
            raise OmError(f"{path}: expected ais_bench's output file {i}_{output_index}.npy here")
        if path.suffix == ".npy":
            row = np.load(path)
        else:
            row = np.fromfile(path, dtype=np.float32)
        rows.append(np.asarray(row, dtype=np.float32).reshape(-1))
    return np.stack(rows)
