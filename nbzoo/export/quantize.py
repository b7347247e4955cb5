"""int8 CPU inference: ONNX Runtime's dynamic quantization of an exported model, and the CPU's
int8 instruction sets that decide what it buys.

Dynamic quantization stores the weights of MatMul, Gather and ORT's fused Attention /
EmbedLayerNormalization in int8 and quantizes each activation on the fly, per tensor, from its own
min / max: no calibration data. ORT's quantization guide quantizes a transformer *after* its
transformer optimizer: the fused Attention becomes QAttention.

A weight the graph hands to several nodes through ``Identity`` nodes (the plain export of ALBERT's
one shared layer: layer 1 reads the weight, layers 2..N read an Identity of it) is quantized only
where a node reads it directly: ORT's quantizer leaves the other uses in fp32 and keeps the fp32
weight beside its int8 copy, so the "int8" file ends up *larger* than the fp32 one. Each use is made
to read the weight itself first (:func:`nbzoo.export.onnx.bypass_weight_identities`); ORT's quantizer
then quantizes each shared weight once, for all its uses.

int8 matrix products pay on CPUs with dot-product instructions: AVX512-VNNI / AVX-VNNI (x86,
``vpdpbusd``), AMX (Sapphire Rapids tiles), ARM's i8mm / dotprod. On plain AVX2 ORT falls back to
``vpmaddubsw``, which can saturate: ORT's quantization guide recommends ``reduce_range`` (7-bit
weights) there, and :func:`quantize_dynamic` turns it on only where no VNNI is found.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

INT8_FLAGS = {
    # /proc/cpuinfo flag → what it gives int8 matrix products
    "avx2": "AVX2 (vpmaddubsw, 16-bit saturating sums)",
    "avx512bw": "AVX-512BW",
    "avx512_vnni": "AVX-512 VNNI (vpdpbusd)",
    "avx_vnni": "AVX-VNNI (vpdpbusd, 256-bit)",
    "amx_int8": "AMX-INT8 (tile matrix multiply)",
    "amx_tile": "AMX tiles",
    "asimddp": "ARM dotprod (sdot/udot)",
    "i8mm": "ARM int8 matrix multiply (smmla)",
}
VNNI_LIKE = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")

# ONNX Runtime's int8 matrix product (MLAS's U8S8 QGEMM, onnxruntime/core/mlas/lib/platform.cpp)
# takes the last of these the CPU has: each later one replaces the earlier. AMX needs both tile
# flags and the kernel's permission (Linux 5.16+), which /proc/cpuinfo does not show.
ORT_INT8_KERNELS = (
    (("avx2",), "AVX2 (vpmaddubsw + vpmaddwd: 16-bit intermediate sums)"),
    (("avx_vnni",), "AVX-VNNI (vpdpbusd, 256-bit)"),
    (("avx512bw",), "AVX-512 core (vpmaddubsw, 512-bit)"),
    (("avx512bw", "avx512_vnni"), "AVX-512 VNNI (vpdpbusd, 512-bit)"),
    (("amx_tile", "amx_int8"), "AMX (tile matrix multiply)"),
)


def cpu_flags(path: str | os.PathLike = "/proc/cpuinfo") -> set[str]:
    """The first CPU's feature flags (x86 ``flags``, ARM ``Features``); empty where unreadable."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def int8_instruction_sets(flags: set[str] | None = None) -> dict[str, object]:
    """What this CPU offers int8 inference: the int8-relevant flags it has (named), whether it has
    a dot-product instruction (VNNI-like), and torch's own reading of the CPU's vector level."""
    flags = cpu_flags() if flags is None else flags
    present = [f for f in INT8_FLAGS if f in flags]
    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError):
        capability = "unknown"
    return {
        "int8_instruction_sets": present,
        "described": "; ".join(INT8_FLAGS[f] for f in present) or "none found",
        "int8_dot_product": any(f in flags for f in VNNI_LIKE),
        "ort_int8_kernel": ort_int8_kernel(flags),
        "torch_cpu_capability": capability,
    }


def ort_int8_kernel(flags: set[str]) -> str:
    """The instructions ONNX Runtime's int8 matrix products use on a CPU with these flags (x86),
    in MLAS's own order of preference; ARM CPUs are named by their dot-product flags."""
    if "asimd" in flags or "asimddp" in flags:
        return "ARM dotprod (sdot / udot)" if "asimddp" in flags else "ARM NEON"
    chosen = "no AVX2: ONNX Runtime's generic SSE kernels"
    for needed, name in ORT_INT8_KERNELS:
        if all(f in flags for f in needed):
            chosen = name
    return chosen


def quantize_dynamic(
    path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    reduce_range: bool | None = None,
    per_channel: bool = False,
) -> Path:
    """``<stem>_int8.onnx``: ORT's dynamic quantization (int8 weights, QInt8), every use of a
    shared weight quantized, each weight once (see the module docstring). ``reduce_range`` None:
    on where the CPU has no int8 dot-product instruction."""
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    from nbzoo.export.onnx import bypass_weight_identities

    path = Path(path)
    out = Path(out) if out is not None else path.with_name(f"{path.stem}_int8{path.suffix}")
    if reduce_range is None:
        reduce_range = not int8_instruction_sets()["int8_dot_product"]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    source = out.with_name(f".{out.name}.source-{os.getpid()}")
    previous = logging.root.manager.disable
    try:
        proto = onnx.load(str(path))
        if bypass_weight_identities(proto):
            onnx.save(proto, str(source))
            path = source
        # ORT logs "Please consider to run pre-processing" on the root logger for every model
        logging.disable(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ort_quantize_dynamic(
                path,
                tmp,
                per_channel=per_channel,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8,
            )
        os.replace(tmp, out)
    finally:
        logging.disable(previous)
        tmp.unlink(missing_ok=True)
        source.unlink(missing_ok=True)
    return out
