"""Offline inference over folders of per-sample files, with ais_bench's command line.

    python -m nbzoo.infer --model albert_seq128_bs32_opt.onnx \\
        --input data/input_ids,data/attention_mask,data/token_type_ids \\
        --output results --output_dirname seq128_bs32 --outfmt NPY --batchsize 32

A ``.om`` model goes to ais_bench itself (Ascend, when ais_bench is installed); a ``.onnx``
model runs on ONNX Runtime (CUDA execution provider when there is one, else the CPU). The
behaviour follows ais_bench (Ascend/tools, ais-bench_workload/tool/ais_bench/ais_bench/infer):

* each ``--input`` folder feeds one model input, in order; files are taken in natural order
  (``2.npy`` before ``10.npy``) and concatenated along axis 0 into batches;
* the last partial batch is padded with copies of its own first file, and the padded rows'
  outputs are dropped;
* output ``k`` of the sample read from ``.../input_ids/123.npy`` is written as ``123_k.npy``
  (``.bin``: raw bytes; ``.txt``: rows of numbers) under ``<output>/<output_dirname>``; the
  summary goes to ``<output>/<output_dirname>_summary.json``;
* ``--loop`` runs each batch that many times (each timed), after ``--warmup_count`` untimed runs
  on the first batch; throughput is ``1000 * batchsize / mean latency (ms)``.

Unlike ais_bench, everything is checked before the first inference (one message naming the file
at fault), folders are matched to the model's inputs by name (``--match_inputs position`` maps
them by order, as ais_bench does), and outputs are written to a hidden temporary folder that is
renamed into place only when complete. An existing ``<output_dirname>`` is replaced only when it
carries nbzoo's marker and every file in it is an earlier run's (nbzoo.safe_write: never a
folder of the user's, whatever its files are called), its ``_summary.json`` only when that
marker lists it; two input files that would name the same output file (``3.npy`` and
``3.bin``) are refused. A write that fails (a full disk, a read-only folder) leaves nothing
behind and ends in one line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nbzoo import safe_write

FORMATS = ("NPY", "BIN", "TXT")
SUFFIXES = (".npy", ".bin")

_ORT_DTYPES = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


class InferError(ValueError):
    """Bad input to the runner; the message names the file or folder and what was expected."""


@dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    shape: list[int | str | None]  # ints where static, a name or None where dynamic


@dataclass
class SampleFile:
    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]


# --- files ------------------------------------------------------------------------------------


def natural_sort(paths: Sequence[Path]) -> list[Path]:
    """ais_bench's order: digit runs compare as numbers, the rest case-insensitively."""

    def key(p: Path):
        return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(p))]

    return sorted(sorted(paths, key=str), key=key)


def list_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InferError(f"{folder}: --input folder does not exist")
    files = [p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file()]
    if not files:
        raise InferError(f"{folder}: no .npy or .bin files in this --input folder")
    return natural_sort(files)


def _npy_header(path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    """dtype and shape from a .npy header; the file must hold exactly the data it announces."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read(f)
            data_start = f.tell()
    except (ValueError, OSError, SyntaxError) as exc:
        raise InferError(f"{path}: not a readable .npy file ({exc})") from None
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise InferError(f"{path}: holds Python objects ({dtype}); only numeric arrays are read")
    expected = data_start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise InferError(
            f"{path}: {state}: {size} bytes, but a {dtype} array of shape {tuple(shape)} "
            f"takes {expected}"
        )
    return dtype, tuple(shape)


def describe_file(path: Path, spec: InputSpec) -> SampleFile:
    """dtype and shape of one sample file; .bin files are raw bytes of the input's dtype."""
    if path.suffix.lower() == ".npy":
        dtype, shape = _npy_header(path)
        return SampleFile(path, dtype, shape)
    rest = spec.shape[1:]
    if not all(isinstance(d, int) for d in rest):
        raise InferError(
            f"{path}: a .bin file needs a model input with static non-batch dimensions; "
            f"input {spec.name!r} has shape {spec.shape}"
        )
    row = int(np.prod(rest, dtype=np.int64)) * spec.dtype.itemsize
    size = path.stat().st_size
    if size == 0 or size % row:
        raise InferError(
            f"{path}: {size} bytes is not a whole number of rows of {rest} {spec.dtype} "
            f"({row} bytes each) for input {spec.name!r}"
        )
    return SampleFile(path, spec.dtype, (size // row, *rest))


def load_file(sample: SampleFile) -> np.ndarray:
    try:
        if sample.path.suffix.lower() == ".npy":
            return np.load(sample.path, allow_pickle=False)
        return np.fromfile(sample.path, dtype=sample.dtype).reshape(sample.shape)
    except (ValueError, OSError) as exc:  # changed since it was checked
        raise InferError(f"{sample.path}: cannot be read ({exc})") from None


def output_stem(path: Path) -> str:
    """The name an input file gives its outputs: the file name without its .npy / .bin suffix
    (``123.npy`` -> ``123_k.npy``, ``a.1.npy`` -> ``a.1_k.npy``)."""
    return path.name[: -len(path.suffix)]


def check_output_names(paths: Sequence[Path]) -> None:
    """Two inputs that would write the same output file are refused (``a.npy`` and ``a.bin``)."""
    seen: dict[str, Path] = {}
    for path in paths:
        stem = output_stem(path)
        if stem in seen:
            raise InferError(
                f"{path} and {seen[stem].name} would both write outputs named {stem}_<k>; "
                "rename one of them"
            )
        seen[stem] = path


def save_output(path: Path, data: np.ndarray, outfmt: str) -> None:
    """Write one output as ais_bench does (NPY: np.save; BIN: raw bytes; TXT: rows of numbers)."""
    if outfmt == "NPY":
        np.save(path, data)
    elif outfmt == "TXT":
        rows = data.reshape(-1, data.shape[-1] if data.ndim else 1)
        fmt = "%f" if np.issubdtype(rows.dtype, np.floating) else "%d"
        with open(path, "wb") as f:
            for row in rows:
                np.savetxt(f, np.c_[row], fmt=fmt, newline=" ")
                f.write(b"\n")
    else:
        data.tofile(path)


# --- the plan: every check before the first inference ------------------------------------------


@dataclass
class Plan:
    specs: list[InputSpec]
    files: list[list[SampleFile]]  # per input, per sample
    batchsize: int
    files_per_batch: int

    @property
    def samples(self) -> int:
        return len(self.files[0])

    @property
    def batches(self) -> int:
        return math.ceil(self.samples / self.files_per_batch)

    def batch_files(self, b: int) -> list[list[SampleFile | None]]:
        """Per input, the files of batch ``b``; None marks a padding slot."""
        lo = b * self.files_per_batch
        out = []
        for files in self.files:
            chunk: list[SampleFile | None] = list(files[lo : lo + self.files_per_batch])
            out.append(chunk + [None] * (self.files_per_batch - len(chunk)))
        return out

    def load_batch(self, b: int) -> dict[str, np.ndarray]:
        feeds = {}
        for spec, chunk in zip(self.specs, self.batch_files(b), strict=True):
            # ais_bench pads with the batch's first file
            arrays = [load_file(f if f is not None else chunk[0]) for f in chunk]
            feeds[spec.name] = np.concatenate(arrays, axis=0)
        return feeds


def make_plan(
    specs: Sequence[InputSpec],
    folders: Sequence[str | os.PathLike],
    batchsize: int | None,
    match_inputs: str = "name",
    model_name: str = "the model",
) -> Plan:
    folders = [Path(f) for f in folders]
    names = [s.name for s in specs]
    if len(folders) != len(specs):
        raise InferError(
            f"{model_name} has {len(specs)} inputs ({', '.join(names)}) but --input gives "
            f"{len(folders)} folders ({', '.join(map(str, folders))})"
        )
    if match_inputs == "name":
        got = [f.name for f in folders]
        if got != names:
            raise InferError(
                f"{model_name}: input names {names} do not match the --input folders {got} "
                "(folder i feeds input i; name them after the inputs, in order, or pass "
                "--match_inputs position)"
            )
    elif match_inputs != "position":
        raise InferError(f"--match_inputs must be name or position; got {match_inputs!r}")
    files = [list_files(f) for f in folders]
    check_output_names(files[0])  # the first input's file names name the outputs
    counts = {str(f): len(fs) for f, fs in zip(folders, files, strict=True)}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise InferError(f"--input folders hold different numbers of samples ({detail})")

    described: list[list[SampleFile]] = []
    seen_dims: dict[str, tuple[int, Path]] = {}  # symbolic dim name → (size, first file)
    for spec, paths in zip(specs, files, strict=True):
        samples = [describe_file(p, spec) for p in paths]
        first = samples[0]
        for s in samples:
            if s.dtype != spec.dtype:
                raise InferError(
                    f"{s.path}: dtype {s.dtype}, but {model_name} input {spec.name!r} expects "
                    f"{spec.dtype}"
                )
            if len(s.shape) != len(spec.shape) or s.shape[0] < 1:
                raise InferError(
                    f"{s.path}: shape {s.shape}, but input {spec.name!r} has shape {spec.shape} "
                    "(one file holds one or more rows along the batch axis)"
                )
            if s.shape != first.shape:
                raise InferError(
                    f"{s.path}: shape {s.shape} differs from {first.path.name}'s {first.shape} "
                    "in the same folder"
                )
            for axis, (want, have) in enumerate(zip(spec.shape[1:], s.shape[1:], strict=True)):
                if isinstance(want, int) and want != have:
                    raise InferError(
                        f"{s.path}: shape {s.shape}, but input {spec.name!r} needs {want} on "
                        f"axis {axis + 1} (model shape {spec.shape})"
                    )
        for want, have in zip(spec.shape[1:], first.shape[1:], strict=True):
            if isinstance(want, str) and want:
                if want in seen_dims and seen_dims[want][0] != have:
                    size, where = seen_dims[want]
                    raise InferError(
                        f"{first.path}: dimension {want!r} is {have} here but {size} in {where}"
                    )
                seen_dims.setdefault(want, (have, first.path))
        described.append(samples)

    rows = {s[0].shape[0] for s in described}
    if len(rows) > 1:
        raise InferError(
            f"--input folders hold files with different numbers of rows per file: {sorted(rows)}"
        )
    rows_per_file = rows.pop()
    static_batch = specs[0].shape[0] if isinstance(specs[0].shape[0], int) else None
    if batchsize is None:
        batchsize = static_batch or rows_per_file
    if static_batch is not None and batchsize != static_batch:
        raise InferError(
            f"{model_name} has a static batch of {static_batch}; --batchsize {batchsize} "
            "does not match it"
        )
    if batchsize % rows_per_file:
        raise InferError(
            f"--batchsize {batchsize} is not a multiple of the {rows_per_file} rows in each file "
            f"(e.g. {described[0][0].path})"
        )
    return Plan(list(specs), described, batchsize, batchsize // rows_per_file)


# --- backends ---------------------------------------------------------------------------------


def ort_session(
    path: str | os.PathLike, threads: int | None = None, device: str = "cpu", spinning: bool = True
):
    """An onnxruntime session on the CPU (``threads`` intra-op threads; ``spinning=False`` lets
    idle worker threads sleep instead of busy-waiting) or a CUDA GPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(
                "device='cuda' but this onnxruntime has no CUDA execution provider "
                "(install onnxruntime-gpu)"
            )
        index = int(device.partition(":")[2] or 0)
        providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)


class OrtBackend:
    """ONNX Runtime: the CUDA execution provider for ``ep="cuda"`` (or ``"auto"`` when this
    onnxruntime has it), else the CPU with ``threads`` intra-op threads."""

    def __init__(
        self,
        model: str | os.PathLike,
        ep: str = "auto",
        device: int = 0,
        threads: int | None = None,
        spinning: bool = True,
    ):
        import onnxruntime as ort

        if ep == "auto":
            ep = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
        try:
            self.session = ort_session(
                model, threads, "cpu" if ep == "cpu" else f"cuda:{device}", spinning
            )
        except RuntimeError as exc:
            raise InferError(str(exc)) from None
        except Exception as exc:  # onnxruntime's own errors: a broken or foreign file
            raise InferError(f"{model}: onnxruntime cannot load this model ({exc})") from None
        self.name = f"onnxruntime ({self.session.get_providers()[0]})"
        self.output_names = [o.name for o in self.session.get_outputs()]

    def input_specs(self) -> list[InputSpec]:
        specs = []
        for i in self.session.get_inputs():
            if i.type not in _ORT_DTYPES:
                raise InferError(f"input {i.name!r} has an unsupported type {i.type}")
            shape = [d if isinstance(d, int) else (d or None) for d in i.shape]
            specs.append(InputSpec(i.name, np.dtype(_ORT_DTYPES[i.type]), shape))
        return specs

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)


def ais_bench_available() -> bool:
    return importlib.util.find_spec("ais_bench") is not None


# --- timing -----------------------------------------------------------------------------------


def time_calls(fn: Callable[[], Any], loop: int) -> tuple[list[float], Any]:
    """Run ``fn`` ``loop`` times; return the wall times in ms and the last result."""
    times, out = [], None
    for _ in range(loop):
        tick = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - tick) * 1000.0)
    return times, out


def latency_stats(times_ms: Sequence[float], batchsize: int) -> dict[str, float]:
    t = np.asarray(times_ms, dtype=np.float64)
    mean = float(t.mean())
    return {
        "min": float(t.min()),
        "max": float(t.max()),
        "mean": mean,
        "median": float(np.median(t)),
        "percentile(99%)": float(np.percentile(t, 99)),
        "count": int(t.size),
        "p50": float(np.percentile(t, 50)),
        "p99": float(np.percentile(t, 99)),
        "q1": float(np.percentile(t, 25)),
        "q3": float(np.percentile(t, 75)),
        "throughput": 1000.0 * batchsize / mean if mean > 0 else 0.0,
    }


# --- the run ----------------------------------------------------------------------------------


@dataclass
class RunSummary:
    model: str
    backend: str
    batchsize: int
    files_per_batch: int
    samples: int
    batches: int
    padded_samples: int
    loop: int
    warmup_count: int
    throughput: float  # ais_bench's: 1000 * batchsize / mean latency (ms)
    samples_per_second: float  # real samples / total timed seconds (padding not counted)
    latency_ms: dict[str, float]
    compute_time_ms: dict[str, float]
    output_dir: str | None
    outfmt: str
    outputs_written: int
    args: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


WRITER = "nbzoo.infer"
_OUTPUT_HINT = "choose another --output_dirname or --output, or move it away"


def _summary_name(final: Path) -> str:
    return f"{final.name}_summary.json"


def _write_summary(final: Path, data: dict) -> None:
    """``<output_dirname>_summary.json`` beside the output folder, listed in its marker."""
    text = json.dumps(data, indent=2) + "\n"
    safe_write.write_beside(final, _summary_name(final), text.encode("utf-8"), WRITER)


def _output_target(output: str | None, output_dirname: str | None) -> Path | None:
    if output is None:
        if output_dirname is not None:
            raise InferError("--output_dirname needs --output (as in ais_bench)")
        return None
    name = output_dirname or time.strftime("%Y_%m_%d-%H_%M_%S")
    if not name or "/" in name or name in (".", ".."):
        raise InferError(f"--output_dirname must be a plain folder name; got {name!r}")
    if Path(output).exists() and not Path(output).is_dir():
        raise InferError(f"--output {output} is a file, not a folder; name a folder")
    return Path(output) / name


def _check_replaceable(final: Path) -> None:
    """An existing output folder is replaced only when it is an earlier run's: absent, empty, or
    marked by nbzoo with every file in it listed unchanged, its summary beside it too. Anything
    else is the user's, and the run stops before writing anything."""
    try:
        safe_write.check_replaceable(
            final, WRITER, what="--output_dirname", hint=_OUTPUT_HINT, beside=[_summary_name(final)]
        )
    except safe_write.NotOursError as exc:
        raise InferError(str(exc)) from None


def _output_folder(final: Path):
    return safe_write.new_folder(
        final, WRITER, what="--output_dirname", hint=_OUTPUT_HINT, beside=[_summary_name(final)]
    )


def run(
    model: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike | None = None,
    output_dirname: str | None = None,
    outfmt: str = "BIN",
    batchsize: int | None = None,
    loop: int = 1,
    warmup_count: int = 1,
    device: int = 0,
    ep: str = "auto",
    threads: int | None = None,
    match_inputs: str = "name",
    args: Sequence[str] = (),
    progress: bool = False,
    spinning: bool = True,
    backend: OrtBackend | None = None,
) -> RunSummary:
    """Run ``model`` over the sample folders ``inputs``; see the module docstring.
    ``spinning=False`` lets ONNX Runtime's idle threads sleep instead of busy-waiting.
    ``backend``: an open :class:`OrtBackend` of ``model`` to run on (a caller running one
    dynamic-shape model at many shapes opens its session once); ``ep``, ``device``, ``threads``
    and ``spinning`` are then the backend's."""
    model = Path(model)
    outfmt = outfmt.upper()
    if outfmt not in FORMATS:
        raise InferError(f"--outfmt must be one of {', '.join(FORMATS)}; got {outfmt!r}")
    if loop < 1 or warmup_count < 0 or (batchsize is not None and batchsize < 1):
        raise InferError("--loop and --batchsize must be positive, --warmup_count non-negative")
    if not model.is_file():
        raise InferError(f"{model}: --model file does not exist")
    final = _output_target(None if output is None else str(output), output_dirname)
    if final is not None:
        _check_replaceable(final)
    if model.suffix == ".om":
        return _run_ais_bench(model, inputs, final, outfmt, batchsize, loop, warmup_count, device)
    if model.suffix != ".onnx":
        raise InferError(f"{model}: --model must be an .onnx or .om file")

    if backend is None:
        backend = OrtBackend(model, ep=ep, device=device, threads=threads, spinning=spinning)
    plan = make_plan(backend.input_specs(), inputs, batchsize, match_inputs, model.name)
    with _output_folder(final) if final is not None else contextlib.nullcontext() as tmp:
        first = plan.load_batch(0)
        for _ in range(warmup_count):
            backend(first)
        all_times: list[float] = []
        written = 0
        batches = range(plan.batches)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"{model.name}", leave=False)
        for b in batches:
            feeds = first if b == 0 else plan.load_batch(b)
            times, outs = time_calls(lambda feeds=feeds: backend(feeds), loop)
            all_times += times
            if tmp is not None:
                written += _save_batch(plan, b, outs, tmp, outfmt)

    stats = latency_stats(all_times, plan.batchsize)
    summary = RunSummary(
        model=str(model),
        backend=backend.name,
        batchsize=plan.batchsize,
        files_per_batch=plan.files_per_batch,
        samples=plan.samples,
        batches=plan.batches,
        padded_samples=plan.batches * plan.files_per_batch - plan.samples,
        loop=loop,
        warmup_count=warmup_count,
        throughput=stats["throughput"],
        samples_per_second=plan.samples * loop / (sum(all_times) / 1000.0),
        latency_ms={k: stats[k] for k in ("mean", "p50", "p99", "q1", "q3")},
        compute_time_ms={
            k: stats[k] for k in ("min", "max", "mean", "median", "percentile(99%)", "count")
        },
        output_dir=None if final is None else str(final),
        outfmt=outfmt,
        outputs_written=written,
        args=list(args),
    )
    if final is not None:
        _write_summary(final, summary.to_dict())
    return summary


def _save_batch(plan: Plan, b: int, outs: list[np.ndarray], folder: Path, outfmt: str) -> int:
    chunk = plan.batch_files(b)[0]
    written = 0
    for k, out in enumerate(outs):
        out = np.asarray(out)
        if out.ndim == 0 or out.shape[0] % plan.files_per_batch:
            raise InferError(
                f"output {k} has shape {out.shape}; its batch axis does not split into "
                f"{plan.files_per_batch} files"
            )
        for j, part in enumerate(np.array_split(out, plan.files_per_batch, axis=0)):
            if chunk[j] is None:  # a padding row
                continue
            stem = output_stem(chunk[j].path)
            save_output(folder / f"{stem}_{k}.{outfmt.lower()}", part, outfmt)
            written += 1
    return written


def _run_ais_bench(model, inputs, final, outfmt, batchsize, loop, warmup_count, device):
    """Hand a .om model to ais_bench (CANN), writing into a temporary folder first."""
    if not ais_bench_available():
        raise InferError(
            f"{model}: .om models run on an Ascend NPU through ais_bench, which is not installed "
            "here; run the .onnx model instead, or install ais_bench and CANN"
        )
    argv = [sys.executable, "-m", "ais_bench", "--model", str(model)]
    argv += ["--input", ",".join(str(i) for i in inputs), "--outfmt", outfmt]
    argv += ["--loop", str(loop), "--warmup_count", str(warmup_count), "--device", str(device)]
    if batchsize is not None:
        argv += ["--batchsize", str(batchsize)]
    record: dict[str, Any] = {}
    written = 0
    with _output_folder(final) if final is not None else contextlib.nullcontext() as tmp:
        if tmp is not None:  # ais_bench writes <tmp>/<name>/ and <tmp>/<name>_summary.json
            argv += ["--output", str(tmp), "--output_dirname", final.name]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise InferError(f"ais_bench failed on {model}:\n{done.stdout[-2000:]}{done.stderr}")
        if tmp is not None:
            raw = tmp / _summary_name(final)
            record = json.loads(raw.read_text()) if raw.exists() else {}
            raw.unlink(missing_ok=True)
            for path in (tmp / final.name).iterdir():  # the outputs become the folder's own
                path.rename(tmp / path.name)
                written += 1
            (tmp / final.name).rmdir()
    npu = record.get("NPU_compute_time", {})
    summary = RunSummary(
        model=str(model),
        backend="ais_bench (Ascend NPU)",
        batchsize=batchsize or 0,
        files_per_batch=0,
        samples=len(record.get("filesinfo", {})),
        batches=npu.get("count", 0),
        padded_samples=0,
        loop=loop,
        warmup_count=warmup_count,
        throughput=float(record.get("throughput", 0.0)),
        samples_per_second=float(record.get("throughput", 0.0)),
        latency_ms={
            "mean": npu.get("mean", 0.0),
            "p50": npu.get("median", 0.0),
            "p99": npu.get("percentile(99%)", 0.0),
        },
        compute_time_ms=npu,
        output_dir=None if final is None else str(final),
        outfmt=outfmt,
        outputs_written=written,
        args=argv,
    )
    if final is not None:
        _write_summary(final, summary.to_dict())
    return summary


# --- command line -----------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a non-negative integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nbzoo.infer",
        description="Offline inference with ais_bench's interface: .om through ais_bench, "
        ".onnx through ONNX Runtime.",
    )
    p.add_argument("--model", "-m", required=True, help="the .onnx or .om model")
    p.add_argument("--input", "-i", required=True, help="folders of samples, comma-separated")
    p.add_argument("--output", "-o", default=None, help="where the output folder goes")
    p.add_argument("--output_dirname", default=None, help="output folder name (default: time)")
    p.add_argument("--outfmt", default="BIN", choices=FORMATS, help="output file format")
    p.add_argument("--batchsize", type=_positive, default=None, help="samples per inference")
    p.add_argument("--loop", "-l", type=_positive, default=1, help="timed runs per batch")
    p.add_argument("--warmup_count", type=_non_negative, default=1, help="untimed runs first")
    p.add_argument("--device", "-d", type=_non_negative, default=0, help="NPU or GPU index")
    p.add_argument("--ep", default="auto", choices=("auto", "cpu", "cuda"), help="ORT provider")
    p.add_argument("--threads", type=_positive, default=None, help="ORT intra-op CPU threads")
    p.add_argument(
        "--match_inputs",
        default="name",
        choices=("name", "position"),
        help="map --input folders to model inputs by folder name (default) or by order",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        summary = run(
            args.model,
            [s for s in args.input.split(",") if s],
            output=args.output,
            output_dirname=args.output_dirname,
            outfmt=args.outfmt,
            batchsize=args.batchsize,
            loop=args.loop,
            warmup_count=args.warmup_count,
            device=args.device,
            ep=args.ep,
            threads=args.threads,
            match_inputs=args.match_inputs,
            args=argv,
        )
    except InferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only folder: nothing half-written is left
        where = Path(args.output) / (args.output_dirname or "") if args.output else Path(".")
        print(f"error: {safe_write.write_error(where, exc)}", file=sys.stderr)
        return 1
    lat = summary.latency_ms
    print(f"backend: {summary.backend}")
    print(
        f"samples: {summary.samples} in {summary.batches} batches of {summary.batchsize} "
        f"({summary.padded_samples} padded)"
    )
    print(f"latency (ms): mean = {lat['mean']:.3f}, p50 = {lat['p50']:.3f}, p99 = {lat['p99']:.3f}")
    print(f"throughput 1000*batchsize/latency.mean: {summary.throughput:.2f} samples/s")
    if summary.output_dir:
        print(f"outputs: {summary.output_dir} ({summary.outputs_written} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
