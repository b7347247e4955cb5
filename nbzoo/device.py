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
from pathlib import Path
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
DESCRIPTIONS = {
    "fp32": "fp32",
    "bf16": "bf16 autocast over fp32 weights",
    "fp16": "fp16 autocast over fp32 weights (apex O1)",
    "O2": "fp16 model over fp32 master weights (apex O2)",
}

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


def resolve_precision(name: str | Mapping[str, str], kind: str) -> str:
    """Map a precision request onto fp32, bf16, fp16 (apex O1) or O2 for the device kind.

    ``name`` is a level, or a level per device kind (``{"cuda": "O1", "npu": "O2", ...}``, as the
    seeds give one per device), of which ``kind``'s applies."""
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
        return self.precision == "O2"

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
        too), disabled under fp32 and bf16, or when ``loss_scale`` is off."""
        enabled = self.precision in ("fp16", "O2") and self.loss_scale
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
    rt = Runtime(
        kind=kind, precision=resolve_precision(precision, kind), seed=seed, loss_scale=loss_scale
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
    seed_everything(seed)
    return rt


def precision_description(rt: Runtime) -> str:
    """What the run computes in, in words (for the environment table)."""
    text = DESCRIPTIONS.get(rt.precision, rt.precision)
    if rt.precision in ("fp16", "O2"):
        text += ", dynamic loss scaling" if rt.loss_scale else ", no loss scaling"
    return text


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


# /proc/cpuinfo flags that decide how fast fp32 / bf16 / int8 training runs on a CPU
SPEED_FLAGS = (
    "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
    "amx_bf16", "amx_int8",
)  # fmt: skip


def cpu_description(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> dict[str, Any]:
    """The CPU a measurement ran on: its ``model name``, the :data:`SPEED_FLAGS` it has, torch's
    reading of its vector level and the CPUs this process may use ("unknown" where unreadable)."""
    model, flags = "unknown", set()
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = set(value.split())
    return {
        "model_name": model if model != "unknown" else platform.processor() or model,
        "flags": [f for f in SPEED_FLAGS if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": cpus.share(),
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
