"""Device selection (npu → cuda → cpu), precision policy, seeding and distributed set-up.

torch_npu is optional. Since torch 2.x, installed device backends are auto-loaded when torch is
imported; a machine with torch_npu but without CANN would then fail on ``import torch``. We turn
the auto-loading off before torch is imported and import torch_npu ourselves, inside a guard.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from nbzoo import cpus  # noqa: E402

DEVICES = ("auto", "cpu", "cuda", "npu")
KINDS = ("cpu", "cuda", "npu")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "O0", "O1", "O2")

# The seeds use apex opt levels; each has a native counterpart here:
#   O0 → fp32;
#   O1 → fp16: autocast to fp16 over fp32 weights, dynamic loss scaling;
#   O2 → an fp16 model over fp32 master weights, dynamic loss scaling (nbzoo.amp.MasterWeights).
# bf16 (autocast to bfloat16, no loss scaling) is a choice of its own, no apex level.
APEX_LEVELS = {"O0": "fp32", "O1": "fp16", "O2": "O2"}
# O2's weights, gradients and loss scaling without fp16 arithmetic: what a CPU without fast fp16
# runs for a per-device-kind O2 (see choose_precision); the model is fp16, each forward computes
# with fp32 copies of its weights.
O2_FP32_COMPUTE = "O2-fp32-compute"
DESCRIPTIONS = {
    "fp32": "fp32",
    "bf16": "bf16 autocast over fp32 weights",
    "fp16": "fp16 autocast over fp32 weights (apex O1)",
    "O2": "fp16 model over fp32 master weights (apex O2)",
    O2_FP32_COMPUTE: "fp16 model over fp32 master weights, computed in fp32 (apex O2 without fp16 "
    "arithmetic)",
}
# Half formats a CPU multiplies matrices in with its own instructions (oneDNN's kernels). Without
# them PyTorch runs fp16 / bf16 matrix products on its reference GEMM, 30 to 50 times slower than
# fp32 (fp16 on an AMD EPYC with AVX-512 but no AVX512-FP16: 2.9 GFLOP/s against 85 in fp32).
# the paths whose gradients are fp16 (or stand in for such a level): dynamic loss scaling applies
LOSS_SCALED = ("fp16", "O2", O2_FP32_COMPUTE)
FAST_HALF_FLAGS = {"fp16": ("avx512_fp16", "amx_fp16"), "bf16": ("avx512_bf16", "amx_bf16")}

_npu_import_error: str | None = None


def _import_torch_npu() -> bool:
    """Import torch_npu if it is installed and usable; remember why not otherwise."""
    global _npu_import_error
    if hasattr(torch, "npu") and getattr(torch.npu, "is_available", None):
        return True
    try:
        import torch_npu  # noqa: F401
    except Exception as exc:  # ImportError, or CANN libraries missing at load time
        _npu_import_error = f"{type(exc).__name__}: {exc}"
        return False
    return True


def npu_available() -> bool:
    return _import_torch_npu() and bool(torch.npu.is_available())


def resolve_device(name: str = "auto") -> str:
    """Map ``auto`` to the best device present; check an explicit choice exists."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {name!r}")
    if name == "auto":
        if npu_available():
            return "npu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device='cuda' but torch sees no CUDA GPU (torch.cuda.is_available() is False)"
        )
    if name == "npu" and not npu_available():
        why = _npu_import_error or "torch.npu.is_available() is False"
        raise RuntimeError(f"device='npu' but no usable Ascend NPU: {why}")
    return name


@dataclass(frozen=True)
class CpuHalf:
    """The half formats this CPU multiplies matrices in fast (``fast``), and in words what showed
    it (``evidence``: the flags found, or why none counts)."""

    fast: frozenset[str]
    evidence: str


def cpu_half_formats(
    flags: set[str] | None = None,
    capability: str | None = None,
    onednn_isa: str | None = None,
) -> CpuHalf:
    """Which of fp16 / bf16 this CPU computes fast: the flags of :data:`FAST_HALF_FLAGS` in
    /proc/cpuinfo, counted only where torch runs AVX-512 kernels (its CPU capability: an AVX2-only
    CPU, or ``ATEN_CPU_CAPABILITY=avx2``, reads AVX2) and oneDNN is not capped below AVX-512
    (``ONEDNN_MAX_CPU_ISA``). Other CPUs (no /proc/cpuinfo, ARM) count as having neither: fp32 is
    fast everywhere."""
    flags = cpus.cpuinfo()[1] if flags is None else set(flags)
    if capability is None:
        capability = torch.backends.cpu.get_cpu_capability()
    if onednn_isa is None:
        onednn_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    if not capability.upper().startswith("AVX512"):
        return CpuHalf(frozenset(), f"torch's CPU capability is {capability}, below AVX-512")
    isa = onednn_isa.strip().upper()
    if isa and isa not in ("ALL", "DEFAULT") and "512" not in isa and "AMX" not in isa:
        return CpuHalf(frozenset(), f"ONEDNN_MAX_CPU_ISA={onednn_isa} caps oneDNN below AVX-512")
    found = {fmt: [f for f in names if f in flags] for fmt, names in FAST_HALF_FLAGS.items()}
    fast = frozenset(fmt for fmt, present in found.items() if present)
    parts = [
        f"{fmt}: {', '.join(present)}"
        if present
        else f"{fmt}: none of {' / '.join(FAST_HALF_FLAGS[fmt])}"
        for fmt, present in found.items()
    ]
    return CpuHalf(fast, "; ".join(parts))


@dataclass(frozen=True)
class Precision:
    """A resolved precision: the level ``asked`` (apex names and ``auto`` resolved), the ``path``
    the run takes, and ``why`` they differ ("" when they do not)."""

    asked: str
    path: str
    why: str = ""


def _asked_level(name: str | Mapping[str, str], kind: str) -> str:
    if isinstance(name, Mapping):
        unknown = sorted(set(name) - set(KINDS))
        if unknown:
            raise ValueError(
                f"precision per device kind: keys must be among {', '.join(KINDS)}; "
                f"got {', '.join(map(repr, unknown))}"
            )
        if kind not in name:
            raise ValueError(
                f"precision gives a level for {', '.join(name) or 'no device kind'} "
                f"but not for {kind}, the device this run uses"
            )
        name = name[kind]
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {name!r}")
    name = APEX_LEVELS.get(name, name)
    if name == "auto":
        if kind == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if kind == "npu":
            return "fp16"
        return "fp32"
    return name


def _nearest_fast_on_cpu(level: str, half: CpuHalf) -> str:
    """The path nearest ``level`` that this CPU computes fast (see :func:`choose_precision`)."""
    if level == "O2":
        return "O2" if "fp16" in half.fast else O2_FP32_COMPUTE
    for fmt in {"fp16": ("fp16", "bf16"), "bf16": ("bf16",)}.get(level, ()):
        if fmt in half.fast:
            return fmt
    return "fp32"


def choose_precision(
    name: str | Mapping[str, str], kind: str, half: CpuHalf | None = None
) -> Precision:
    """Map a precision request onto fp32, bf16, fp16 (apex O1) or O2 for the device kind.

    ``name`` is a level, or a level per device kind (``{"cuda": "O1", "npu": "O2", "cpu": ...}``,
    as the seeds give one per device), of which ``kind``'s applies. A single level is taken as
    asked, on every device. A level per device kind is a preset's table; its CPU entry runs as
    near as this CPU computes fast (``half``: :func:`cpu_half_formats` unless given): fp16 without
    AVX512-FP16 / AMX-FP16 becomes bf16 autocast where the CPU has AVX512-BF16 / AMX-BF16, else
    fp32; bf16 without them fp32; O2 without fast fp16 ``O2-fp32-compute`` (fp16 weights and
    gradients over fp32 master weights, computed in fp32). Loss scaling stays as asked."""
    level = _asked_level(name, kind)
    if kind != "cpu" or not isinstance(name, Mapping):
        return Precision(level, level)
    half = cpu_half_formats() if half is None else half
    path = _nearest_fast_on_cpu(level, half)
    if path == level:
        return Precision(level, level)
    fmt = "bf16" if level == "bf16" else "fp16"
    why = (
        f"the preset's {level} for a CPU would run its {fmt} matrix products on PyTorch's "
        f"reference GEMM on this CPU ({half.evidence}): took {path} ({DESCRIPTIONS[path]}). "
        f"Pass precision={level!r} (one level, not per device kind) to run {level} as asked"
    )
    return Precision(level, path, why)


def resolve_precision(name: str | Mapping[str, str], kind: str, half: CpuHalf | None = None) -> str:
    """The path :func:`choose_precision` takes."""
    return choose_precision(name, kind, half).path


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Runtime:
    """Where and how a notebook computes."""

    kind: str
    precision: str
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    threads: int = field(default_factory=torch.get_num_threads)
    loss_scale: bool = (
        True  # dynamic loss scaling under fp16 and O2 (06: the seed's enable_lossscale)
    )
    precision_asked: str = ""  # the level asked, where the CPU took another path ("": precision)
    precision_why: str = ""  # why it did

    @property
    def device(self) -> torch.device:
        if self.kind == "cpu":
            return torch.device("cpu")
        return torch.device(self.kind, self.local_rank)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """What autocast computes in; None for fp32 and for O2, whose model is fp16 itself."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def master_weights(self) -> bool:
        """O2: the training loop casts the model to fp16 over fp32 master weights."""
        return self.precision in ("O2", O2_FP32_COMPUTE)

    @property
    def master_compute_dtype(self) -> torch.dtype | None:
        """What an O2 model computes in: its own fp16 (None), or fp32 copies of its weights."""
        return torch.float32 if self.precision == O2_FP32_COMPUTE else None

    @property
    def level(self) -> str:
        """The level asked (the path taken may differ: :func:`choose_precision`)."""
        return self.precision_asked or self.precision

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.amp_dtype is None:
            yield
            return
        with torch.autocast(device_type=self.kind, dtype=self.amp_dtype):
            yield

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A dynamic loss scaler for fp16 gradients (fp16 and O2, on every device kind, the CPU
        too), disabled under fp32 and bf16, or when ``loss_scale`` is off. Where a CPU took a
        faster path for fp16 or O2 (:func:`choose_precision`) the loss is scaled as asked."""
        enabled = self.level in LOSS_SCALED and self.loss_scale
        return torch.amp.GradScaler(self.kind, enabled=enabled)

    def synchronize(self) -> None:
        """Wait for the device's queued work (before reading a clock); a no-op on the CPU."""
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.kind == "npu":
            torch.npu.synchronize()

    def reset_peak_memory(self) -> None:
        """Start a new peak for :meth:`peak_memory_bytes`."""
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "npu":
            torch.npu.reset_peak_memory_stats()

    def peak_memory_bytes(self) -> int | None:
        """Peak allocated device memory since the last reset; None on CPU (no per-run figure)."""
        if self.kind == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "npu":
            return int(torch.npu.max_memory_allocated())
        return None

    def to_device(self, batch: dict) -> dict:
        return {
            k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()
        }


def setup(
    device: str = "auto",
    precision: str | Mapping[str, str] = "auto",
    seed: int = 0,
    loss_scale: bool = True,
) -> Runtime:
    """Pick the device and precision, seed everything, and join torch.distributed when launched
    by torchrun (WORLD_SIZE > 1). ``loss_scale=False`` trains fp16 without loss scaling."""
    kind = resolve_device(device)
    chosen = choose_precision(precision, kind)
    rt = Runtime(
        kind=kind,
        precision=chosen.path,
        seed=seed,
        loss_scale=loss_scale,
        precision_asked=chosen.asked if chosen.why else "",
        precision_why=chosen.why,
    )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        import torch.distributed as dist

        rt.rank, rt.world_size = int(os.environ["RANK"]), world_size
        rt.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            backend = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[kind]
            dist.init_process_group(backend=backend)
        if kind == "cuda":
            torch.cuda.set_device(rt.local_rank)
        elif kind == "npu":
            torch.npu.set_device(rt.local_rank)
    if kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if rt.precision_why and rt.is_main:
        print(f"precision: {rt.precision_why}", flush=True)
    seed_everything(seed)
    return rt


def precision_description(rt: Runtime) -> str:
    """What the run computes in, in words (for the environment table)."""
    text = DESCRIPTIONS.get(rt.precision, rt.precision)
    if rt.level in LOSS_SCALED:
        text += ", dynamic loss scaling" if rt.loss_scale else ", no loss scaling"
    if rt.precision_asked:
        text += f" (the preset asks {rt.precision_asked}; this CPU computes it slowly)"
    return text


def precision_record(rt: Runtime) -> dict[str, str]:
    """The precision path of a run, for its results record: the level asked, the path taken
    (they differ where a CPU took a faster path) and why."""
    return {
        "asked": rt.level,
        "took": rt.precision,
        "described": precision_description(rt),
        "why": rt.precision_why,
    }


def cann_version() -> str | None:
    """The CANN toolkit version, read from its install tree, or None when CANN is absent."""
    home = os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH")
    candidates = [home] if home else []
    candidates.append("/usr/local/Ascend/ascend-toolkit/latest")
    for root in candidates:
        for name in ("version.cfg", "ascend_toolkit_install.info"):
            path = os.path.join(root, name) if root else ""
            if path and os.path.exists(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        if "version" in line.lower() and "=" in line:
                            return line.split("=", 1)[1].strip().strip('"')
    return None


def accelerator_name(rt: Runtime) -> str:
    if rt.kind == "cuda":
        return torch.cuda.get_device_name(rt.local_rank)
    if rt.kind == "npu":
        return torch.npu.get_device_name(rt.local_rank)
    return platform.processor() or platform.machine()


# /proc/cpuinfo flags that decide how fast fp32 / bf16 / fp16 / int8 training runs on a CPU
SPEED_FLAGS = (
    "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
    "amx_bf16", "amx_fp16", "amx_int8",
)  # fmt: skip


def cpu_description(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> dict[str, Any]:
    """The CPU a measurement ran on: its ``model name``, the :data:`SPEED_FLAGS` it has, torch's
    reading of its vector level, the half formats it computes fast (:func:`cpu_half_formats`),
    the CPUs this process may use, and the variables that cap its vector level where set."""
    model, flags = cpus.cpuinfo(cpuinfo)
    return {
        "model_name": model or platform.processor() or "unknown",
        "flags": [f for f in SPEED_FLAGS if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fast_half_formats": sorted(cpu_half_formats(flags).fast),
        "cpus": cpus.share(),
        **{
            k: os.environ[k]
            for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
            if k in os.environ
        },
    }


def describe(rt: Runtime | None = None):
    """A small table of what this run computes on, for the notebooks' environment cell."""
    import pandas as pd
    import transformers

    from nbzoo import patching

    rt = rt or setup()
    rows = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": f"{rt.kind} ({accelerator_name(rt)})",
        "precision": precision_description(rt),
        "devices (world size)": rt.world_size,
        "cpu threads": rt.threads,
        "torch_npu": _npu_version() or "not installed",
        "CANN": cann_version() or "not found",
        "atc on PATH": "yes" if shutil.which("atc") else "no",
        "active patches": ", ".join(patching.active()) or "none",
    }
    return pd.DataFrame({"value": [str(v) for v in rows.values()]}, index=list(rows))


def _npu_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("torch_npu")
    except metadata.PackageNotFoundError:
        return None
