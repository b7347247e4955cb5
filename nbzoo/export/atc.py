"""ONNX → Ascend offline model (.om) with CANN's ATC, exactly as the seed's commands write it.

The seed (seeds/002_albert.md, "执行ATC命令") converts every ``albert_seq{S}_bs{B}_opt.onnx`` with

    atc --input_format=ND --framework=5 --model=... --output=... --log=error
        --soc_version=${chip_name} --input_shape="input_ids:B,S;attention_mask:B,S;token_type_ids:B,S"
        --optypelist_for_implmode="Gelu" --op_select_implmode=high_performance

and, for sequence length 16, replaces the last two options by ``--op_precision_mode=precision.ini``.
The chip name comes from ``npu-smi info``. Where ``atc`` is not on PATH (every machine without
CANN) :func:`run_atc` does not pretend: it returns the command and says that the step was skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Options whose values the seed writes in double quotes (lists: shapes, operator types).
_QUOTED = ("input_shape", "optypelist_for_implmode")

# precision.ini for the seq-16 models. The seed passes --op_precision_mode=precision.ini but does
# not print the file. The one in its reference code (ModelZoo-PyTorch, ACL_PyTorch/contrib/nlp/
# albert/precision.ini) is [ByNodeName]: Gelu in high_performance for 10 named nodes of its own
# graph (Mul_105/Gelu ... Mul_1139/Gelu), leaving two of the 12 layers at ATC's default,
# high_precision. Those node names belong to a graph rewritten by its magiconnx optimizer, not to
# ours, so we write CANN's per-type form ([ByOpType] optype=mode) with the mode the seed leaves to
# the rest: high precision for Gelu at the short length.
SEQ16_PRECISION_MODES = {"Gelu": "high_precision"}

ALBERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def input_shape_arg(shapes: Mapping[str, Sequence[int]]) -> str:
    """``{"input_ids": (32, 128), ...}`` → ``input_ids:32,128;...`` (ATC's --input_shape)."""
    return ";".join(
        f"{name}:{','.join(str(int(d)) for d in dims)}" for name, dims in shapes.items()
    )


def atc_command(
    model: str | os.PathLike,
    output: str | os.PathLike,
    input_shapes: Mapping[str, Sequence[int]],
    soc_version: str,
    *,
    precision_ini: str | os.PathLike | None = None,
    optypelist_for_implmode: str = "Gelu",
    op_select_implmode: str = "high_performance",
    log: str = "error",
) -> list[str]:
    """The ATC argument vector, options in the seed's order. With ``precision_ini`` the per-op
    precision file replaces the implmode options (ATC does not take both)."""
    argv = [
        "atc",
        "--input_format=ND",
        "--framework=5",  # 5: ONNX
        f"--model={model}",
        f"--output={output}",
        f"--log={log}",
        f"--soc_version={soc_version}",
        f"--input_shape={input_shape_arg(input_shapes)}",
    ]
    if precision_ini is not None:
        argv.append(f"--op_precision_mode={precision_ini}")
    else:
        argv += [
            f"--optypelist_for_implmode={optypelist_for_implmode}",
            f"--op_select_implmode={op_select_implmode}",
        ]
    return argv


def albert_atc_command(
    model: str | os.PathLike,
    output: str | os.PathLike,
    batch_size: int,
    seq_len: int,
    soc_version: str,
    precision_ini: str | os.PathLike = "precision.ini",
) -> list[str]:
    """The seed's command for one ALBERT model: seq 16 uses ``--op_precision_mode``."""
    shapes = {name: (batch_size, seq_len) for name in ALBERT_INPUTS}
    return atc_command(
        model,
        output,
        shapes,
        soc_version,
        precision_ini=precision_ini if seq_len == 16 else None,
    )


def format_command(argv: Sequence[str]) -> str:
    """One shell line, quoting as the seed does (list-valued options in double quotes)."""
    parts = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("-") in _QUOTED:
            parts.append(f'{key}="{value}"')
        elif re.search(r"[\s;\"'$`\\|&<>()]", arg) and not arg.startswith("--soc_version=${"):
            parts.append("'" + arg.replace("'", "'\\''") + "'")
        else:
            parts.append(arg)
    return " ".join(parts)


def write_precision_ini(
    path: str | os.PathLike, modes: Mapping[str, str] = SEQ16_PRECISION_MODES
) -> Path:
    """CANN's operator precision file: ``[ByOpType]`` then ``OpType=mode`` per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("[ByOpType]\n" + "".join(f"{k}={v}\n" for k, v in modes.items()))
    os.replace(tmp, path)
    return path


def parse_npu_smi(text: str) -> str | None:
    """The ATC soc version from ``npu-smi info``: the first NPU row's Name (``910A`` →
    ``Ascend910A``; ``310P3`` → ``Ascend310P3``)."""
    for line in text.splitlines():
        m = re.match(r"^\|\s*\d+\s+([0-9A-Za-z]+)\s+\|\s*(OK|Warning|Alarm|Critical)", line)
        if m:
            name = m.group(1)
            return name if name.lower().startswith("ascend") else f"Ascend{name}"
    return None


def detect_soc_version() -> str | None:
    """Ask ``npu-smi info`` for the chip; None where npu-smi is absent or reports no NPU."""
    if shutil.which("npu-smi") is None:
        return None
    try:
        done = subprocess.run(
            ["npu-smi", "info"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_npu_smi(done.stdout)


@dataclass
class AtcRun:
    command: str
    ran: bool
    message: str
    returncode: int | None = None
    om_path: Path | None = None


def run_atc(argv: Sequence[str], cwd: str | os.PathLike | None = None) -> AtcRun:
    """Run ATC when it is installed; otherwise return the command and say it was skipped."""
    line = format_command(argv)
    if shutil.which(argv[0]) is None:
        return AtcRun(
            line,
            ran=False,
            message=f"skipped: `{argv[0]}` is not on PATH (CANN toolkit not installed on this machine)",
        )
    output = next(a.partition("=")[2] for a in argv if a.startswith("--output="))
    om = Path(cwd or ".") / f"{output}.om"
    om.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-20:]
        return AtcRun(
            line, True, "ATC failed:\n" + "\n".join(tail), done.returncode, None
        )  # the caller decides whether this stops the notebook
    return AtcRun(line, True, f"wrote {om}", 0, om if om.exists() else None)


def convert_albert(
    model: str,
    output: str,
    batch_size: int,
    seq_len: int,
    soc_version: str | None = None,
    cwd: str | os.PathLike | None = None,
) -> AtcRun:
    """The seed's ATC step for one model, run in ``cwd`` with the paths as given (strings, so that
    ``./outputs/...`` stays byte for byte the seed's): writes ``precision.ini`` into ``cwd`` for
    seq 16, reads the soc version from npu-smi when not given, runs ATC or reports the skip."""
    if seq_len == 16:
        write_precision_ini(Path(cwd or ".") / "precision.ini")
    soc = soc_version or detect_soc_version() or "${chip_name}"
    argv = albert_atc_command(str(model), str(output), batch_size, seq_len, soc)
    if shutil.which("atc") is not None and soc == "${chip_name}":
        return AtcRun(
            format_command(argv),
            ran=False,
            message="skipped: atc is installed but no soc version was given and npu-smi found no NPU",
        )
    return run_atc(argv, cwd=cwd)
