"""TEST TOOLING: stand-in ``atc``, ``npu-smi`` and ``ais_bench`` for machines without CANN.

CANN's ATC converter and the ais_bench runner need an Ascend toolkit and NPU driver, which cannot
be installed here. So that notebook 02's OM flow runs end to end anyway (in the tests and in
``make rehearse``), :func:`write` puts stand-ins into a folder:

``bin/atc``        checks its argument vector against the seed's ATC lines (seeds/002_albert.md,
                   "执行ATC命令": the seq-128 form, and the seq-16 form with
                   ``--op_precision_mode``), checks that the ONNX model holds only standard ONNX
                   operators with the static shapes of ``--input_shape``, and writes
                   ``<--output>.om``: a stand-in container (magic line, JSON header, the ONNX bytes),
                   not an Ascend model.
``bin/npu-smi``    prints the seed's ``npu-smi info`` example (two 910A chips).
``python/ais_bench``  ``python3 -m ais_bench``: checks its argument vector against the seed's
                   ais_bench line, runs the stand-in ``.om``'s ONNX graph on ONNX Runtime (CPU) and
                   writes what ais_bench writes: one ``{input stem}_{output index}.npy`` per sample
                   under ``<--output>/<--output_dirname>/`` and ``<--output_dirname>_summary.json``
                   beside it (``filesinfo``, ``NPU_compute_time`` in ms, ``throughput``, ``args``...),
                   with ais_bench's batching (natural file order, last batch padded with its first
                   file, padded rows not written).

Every call is appended to ``argv.jsonl`` in the folder (``{"tool", "argv", "cwd"}``) so a test
can compare it with the seed's lines byte for byte. The files start with :data:`MARKER`, which is
how :mod:`nbzoo.export.om` tells a stand-in from the real tools and says so.

    python -m nbzoo.export.cann_standins /tmp/cann   # writes them, prints the two exports:
    export PATH=/tmp/cann/bin:$PATH PYTHONPATH=/tmp/cann/python:$PYTHONPATH
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nbzoo import safe_write

MARKER = "nbzoo-cann-standin"
OM_MAGIC = b"NBZOO-STANDIN-OM 1\n"  # first line of a stand-in .om; a real .om is never this

# The seed's lines (seeds/002_albert.md), verbatim: the stand-ins accept these and nothing else,
# with only the model's name, batch, sequence length, folder and chip name varying.
SEED_ATC_SEQ128_BS32 = (
    "atc --input_format=ND --framework=5 --model=./outputs/albert_seq128_bs32_opt.onnx "
    "--output=./outputs/albert_seq128_bs32 --log=error --soc_version=${chip_name} "
    '--input_shape="input_ids:32,128;attention_mask:32,128;token_type_ids:32,128" '
    '--optypelist_for_implmode="Gelu" --op_select_implmode=high_performance'
)
SEED_ATC_SEQ16_BS64 = (
    "atc --input_format=ND --framework=5 --model=./outputs/albert_seq16_bs64_opt.onnx "
    "--output=./outputs/albert_seq16_bs64 --log=error --soc_version=${chip_name} "
    '--input_shape="input_ids:64,16;attention_mask:64,16;token_type_ids:64,16" '
    "--op_precision_mode=precision.ini"
)
SEED_AIS_BENCH_SEQ128_BS32 = (
    "python3 -m ais_bench --model outputs/albert_seq128_bs32.om --input "
    "./preprocessed_data_seq128/input_ids,./preprocessed_data_seq128/attention_mask,"
    "./preprocessed_data_seq128/token_type_ids --output results --output_dirname seq128_bs32 "
    "--outfmt NPY --batchsize 32"
)
SEED_NPU_SMI = """\
+-------------------|-----------------|------------------------------------------------------+
| NPU     Name      | Health          | Power(W)     Temp(C)           Hugepages-Usage(page) |
| Chip    Device    | Bus-Id          | AICore(%)    Memory-Usage(MB)                        |
+===================+=================+======================================================+
| 0       910A     | OK              | 15.8         42                0    / 0              |
| 0       0         | 0000:82:00.0    | 0            1074 / 21534                            |
+===================+=================+======================================================+
| 1       910A     | OK              | 15.4         43                0    / 0              |
| 0       1         | 0000:89:00.0    | 0            1070 / 21534                            |
+===================+=================+======================================================+
"""


def seed_atc_argv(seq: int, batch: int, folder: str = "./outputs/", chip: str = "${chip_name}"):
    """The seed's ATC line for (seq, batch) as an argument vector (the shell's word splitting):
    the seq-16 form for seq 16, the seq-128 form otherwise."""
    line, (s, b) = (
        (SEED_ATC_SEQ16_BS64, (16, 64)) if seq == 16 else (SEED_ATC_SEQ128_BS32, (128, 32))
    )
    line = line.replace(f"albert_seq{s}_bs{b}", f"albert_seq{seq}_bs{batch}")
    line = line.replace(f":{b},{s}", f":{batch},{seq}").replace("${chip_name}", chip)
    return shlex.split(line.replace("./outputs/", folder))


def seed_ais_bench_argv(seq: int, batch: int) -> list[str]:
    """The seed's ais_bench line for (seq, batch) as an argument vector."""
    line = SEED_AIS_BENCH_SEQ128_BS32.replace("seq128", f"seq{seq}").replace("bs32", f"bs{batch}")
    return shlex.split(line.replace("--batchsize 32", f"--batchsize {batch}"))


# --- writing the stand-ins --------------------------------------------------------------------


@dataclass
class StandIns:
    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def python(self) -> Path:
        return self.root / "python"

    @property
    def log(self) -> Path:
        return self.root / "argv.jsonl"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: os.environ) with the stand-ins first on PATH and PYTHONPATH."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = os.pathsep.join(filter(None, [str(self.bin), env.get("PATH", "")]))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.python), env.get("PYTHONPATH")]))
        return env

    def calls(self, tool: str | None = None) -> list[dict]:
        """The recorded calls, oldest first (``tool``: atc | npu-smi | ais_bench)."""
        if not self.log.exists():
            return []
        rows = [json.loads(line) for line in self.log.read_text().splitlines() if line]
        return [r for r in rows if tool is None or r["tool"] == tool]


def _launcher(entry: str) -> str:
    return (
        f"#!{sys.executable}\n# {MARKER}: test tooling written by nbzoo.export.cann_standins, "
        "not CANN\nimport sys\n\nfrom nbzoo.export import cann_standins\n\n"
        f"sys.exit(cann_standins.{entry}(sys.argv))\n"
    )


WRITER = "nbzoo.export.cann_standins"


def write(folder: str | os.PathLike) -> StandIns:
    """Write the stand-ins into ``folder``: a folder nbzoo creates or marked (nbzoo.safe_write),
    where only stand-ins an earlier call wrote are replaced -- a folder holding anything of the
    user's (their own ``bin/atc``) is refused, never written."""
    out = StandIns(Path(folder).resolve())
    root = safe_write.claim(
        out.root,
        WRITER,
        hint="name an empty or new folder for the stand-ins, or move this one away",
    )
    files = {
        "bin/atc": _launcher("atc_main"),
        "bin/npu-smi": _launcher("npu_smi_main"),
        "python/ais_bench/__init__.py": (
            f'"""{MARKER}: test tooling written by nbzoo.export.cann_standins, not ais_bench."""\n'
        ),
        "python/ais_bench/__main__.py": _launcher("ais_bench_main").split("\n", 1)[1],
    }
    for rel in files:
        root.check(rel)  # every file before the first is written
    for rel, text in files.items():
        with root.file(rel) as tmp:
            tmp.write_text(text)
            if rel.startswith("bin/"):
                tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return out


def _record(tool: str, argv: Sequence[str]) -> None:
    log = _root_of(tool) / "argv.jsonl"
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps({"tool": tool, "argv": list(argv), "cwd": os.getcwd()}) + "\n")


def _root_of(tool: str) -> Path:
    """The stand-ins' folder: above bin/atc, or above python/ais_bench/__init__.py."""
    if tool == "ais_bench":
        return Path(sys.modules["ais_bench"].__file__).resolve().parents[2]
    return Path(sys.argv[0]).resolve().parents[1]


def _fail(tool: str, message: str, code: int = 2) -> int:
    print(f"[{tool} stand-in] ERROR: {message}", file=sys.stderr)
    return code


def _mismatch(got: Sequence[str], want: Sequence[str]) -> str:
    lines = [f"  got:  {shlex.join(got)}", f"  seed: {shlex.join(want)}"]
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        if g != w:
            lines.append(f"  first difference at argument {i}: {g!r} vs the seed's {w!r}")
            break
    else:
        lines.append(f"  {len(got)} arguments vs the seed's {len(want)}")
    return "\n".join(lines)


# --- atc --------------------------------------------------------------------------------------


def atc_main(argv: Sequence[str]) -> int:
    """Stand-in ATC: accept only the seed's line for the model's shape, then wrap the ONNX."""
    args = ["atc", *argv[1:]]
    _record("atc", args)
    opts = dict(a[2:].partition("=")[::2] for a in args[1:] if a.startswith("--"))
    shape = re.fullmatch(r"input_ids:(\d+),(\d+);.*", opts.get("input_shape", ""))
    model = re.fullmatch(r"(.*?)albert_seq\d+_bs\d+_opt\.onnx", opts.get("model", ""))
    if not shape or not model:
        return _fail("atc", f"not the seed's ATC line:\n  {shlex.join(args)}")
    batch, seq = int(shape.group(1)), int(shape.group(2))
    want = seed_atc_argv(seq, batch, model.group(1), opts.get("soc_version", ""))
    if args != want:
        return _fail(
            "atc", "the arguments differ from the seed's ATC line\n" + _mismatch(args, want)
        )
    if not re.fullmatch(r"Ascend\w+", opts["soc_version"]):
        return _fail("atc", f"--soc_version={opts['soc_version']}: not an Ascend chip name")
    if "op_precision_mode" in opts:
        ini = Path(opts["op_precision_mode"])
        if not ini.is_file() or not ini.read_text().startswith(("[ByOpType]", "[ByNodeName]")):
            return _fail("atc", f"{ini}: no precision file ([ByOpType] / [ByNodeName]) here")

    import onnx

    path = Path(opts["model"])
    if not path.is_file():
        return _fail("atc", f"--model={path}: no such file")
    proto = onnx.load(str(path))
    foreign = sorted(
        {f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")}
    )
    if foreign:
        return _fail(
            "atc", f"{path}: operators outside standard ONNX, ATC cannot convert: {foreign}"
        )
    shapes = dict(
        (name, [int(d) for d in dims.split(",")])
        for name, _, dims in (p.partition(":") for p in opts["input_shape"].split(";"))
    )
    for inp in proto.graph.input:
        dims = [
            d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim
        ]
        if inp.name not in shapes or dims != shapes[inp.name]:
            return _fail(
                "atc",
                f"{path}: input {inp.name!r} has shape {dims}, --input_shape says {shapes.get(inp.name)}",
            )
    header = {
        "soc_version": opts["soc_version"],
        "source": str(path),
        "input_shape": shapes,
        "standin": MARKER,
    }
    om = Path(opts["output"] + ".om")
    om.parent.mkdir(parents=True, exist_ok=True)
    tmp = om.with_name(f".{om.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(OM_MAGIC + json.dumps(header).encode() + b"\n" + path.read_bytes())
    os.replace(tmp, om)
    print(f"ATC run success (stand-in: {om} wraps the ONNX graph; it is not an Ascend model)")
    return 0


def read_om(path: str | os.PathLike) -> tuple[dict, bytes]:
    """A stand-in .om's header and ONNX bytes."""
    data = Path(path).read_bytes()
    if not data.startswith(OM_MAGIC):
        raise ValueError(f"{path}: not a stand-in .om (a real one needs an Ascend NPU)")
    header, _, onnx_bytes = data[len(OM_MAGIC) :].partition(b"\n")
    return json.loads(header), onnx_bytes


def npu_smi_main(argv: Sequence[str]) -> int:
    _record("npu-smi", ["npu-smi", *argv[1:]])
    if argv[1:] != ["info"]:
        return _fail("npu-smi", "the stand-in knows only `npu-smi info`")
    sys.stdout.write(SEED_NPU_SMI)
    return 0


# --- ais_bench --------------------------------------------------------------------------------


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"([0-9]+)", text)]


def ais_bench_main(argv: Sequence[str]) -> int:
    """Stand-in ``python3 -m ais_bench``: the seed's flags only; outputs in ais_bench's layout."""
    args = ["python3", "-m", "ais_bench", *argv[1:]]
    _record("ais_bench", [*getattr(sys, "orig_argv", args)[:3], *argv[1:]])
    p = argparse.ArgumentParser(prog="python3 -m ais_bench")
    for flag in ("--model", "--input", "--output", "--output_dirname", "--outfmt"):
        p.add_argument(flag, required=True)
    p.add_argument("--batchsize", type=int, required=True)
    opts = p.parse_args(argv[1:])
    stem = re.fullmatch(r"(?:.*/)?albert_seq(\d+)_bs(\d+)\.om", opts.model)
    if not stem:
        return _fail("ais_bench", f"--model {opts.model}: not one of the seed's albert_seq*_bs*.om")
    want = seed_ais_bench_argv(int(stem.group(1)), int(stem.group(2)))
    if args != want:
        return _fail(
            "ais_bench", "the arguments differ from the seed's line\n" + _mismatch(args, want)
        )

    import numpy as np
    import onnxruntime as ort

    try:
        _, onnx_bytes = read_om(opts.model)
    except (OSError, ValueError) as exc:
        return _fail("ais_bench", str(exc))
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    descs = session.get_inputs()
    folders = opts.input.split(",")
    if len(folders) != len(descs):
        return _fail(
            "ais_bench", f"{len(folders)} input folders, the model has {len(descs)} inputs"
        )
    files = []
    for folder in folders:
        names = [f for f in os.listdir(folder) if f.lower().endswith((".npy", ".bin"))]
        files.append([os.path.join(folder, f) for f in sorted(sorted(names), key=_natural_key)])
    if clash := _same_output_name(files[0], opts.outfmt.lower()):
        return _fail("ais_bench", clash)
    # ais_bench: files per batch = the input tensor's size / one file's size; last batch padded
    per_file = np.load(files[0][0]).shape[0]
    per_batch = opts.batchsize // per_file
    out_dir = Path(opts.output) / opts.output_dirname
    summary_name = f"{opts.output_dirname}_summary.json"
    fmt = opts.outfmt.lower()
    times, filesinfo = [], {}
    n = len(files[0])
    try:
        with safe_write.new_folder(
            out_dir, f"{WRITER} (ais_bench)", hint="move it away", beside=[summary_name]
        ) as tmp:
            session.run(None, _feed(descs, files, 0, per_batch, n))  # ais_bench's one warm-up
            for b in range(-(-n // per_batch)):
                feed = _feed(descs, files, b, per_batch, n)
                tick = time.perf_counter()
                outputs = session.run(None, feed)
                times.append((time.perf_counter() - tick) * 1000.0)
                for j in range(per_batch):
                    i = b * per_batch + j
                    if i >= n:  # a padding row
                        continue
                    infiles = [fs[i] for fs in files]
                    record = filesinfo.setdefault(i, {"infiles": infiles, "outfiles": []})
                    for k, out in enumerate(outputs):
                        part = np.array_split(np.asarray(out), per_batch, axis=0)[j]
                        name = f"{_output_stem(infiles[0])}_{k}.{fmt}"
                        if fmt == "npy":
                            np.save(tmp / name, part)
                        else:
                            part.tofile(tmp / name)
                        record["outfiles"].append(str(out_dir / name))
    except safe_write.NotOursError as exc:
        return _fail("ais_bench", str(exc))
    t = np.asarray(times)
    stats = {
        "min": float(t.min()), "max": float(t.max()), "mean": float(t.mean()),
        "median": float(np.median(t)), "percentile(99%)": float(np.percentile(t, 99)),
        "count": len(times),
    }  # fmt: skip
    zero = dict.fromkeys(stats, 0.0) | {"count": 0}
    summary = {
        "filesinfo": filesinfo,
        "args": [sys.argv[0], *argv[1:]],
        "NPU_compute_time": stats,
        "H2D_latency": zero,
        "D2H_latency": zero,
        "throughput": 1000.0 * opts.batchsize / stats["mean"],
        "npu_compute_time_list": times,
        "pid": os.getpid(),
        "standin": f"{MARKER}: ONNX Runtime on the CPU, not an Ascend NPU",
    }
    safe_write.write_beside(out_dir, summary_name, json.dumps(summary).encode(), WRITER)
    print(f"[INFO] throughput 1000*batchsize.mean({opts.batchsize})/NPU_compute_time.mean"
          f"({stats['mean']}): {summary['throughput']} (stand-in: ONNX Runtime on the CPU)")  # fmt: skip
    return 0


def _output_stem(infile: str) -> str:
    """ais_bench's name for a sample's outputs: its first input file's name up to the first dot
    (ais_bench/infer/io_oprations.py, save_tensors_to_file: ``basename(f).split('.')[0]``)."""
    return os.path.basename(infile).split(".")[0]


def _same_output_name(infiles: Sequence[str], fmt: str) -> str | None:
    """Two samples whose outputs ais_bench's naming would write to one file (``s.0.npy`` and
    ``s.1.npy`` both give ``s_0``): real ais_bench overwrites one with the other and lists the
    file twice; the stand-in refuses before writing anything."""
    seen: dict[str, str] = {}
    for path in infiles:
        stem = _output_stem(path)
        if stem in seen:
            return (
                f"{seen[stem]} and {os.path.basename(path)} would both be written as {stem}_0.{fmt} "
                "(ais_bench names a sample's outputs after its first input file up to the first "
                "dot); rename the input files"
            )
        seen[stem] = os.path.basename(path)
    return None


def _feed(descs, files, b, per_batch, n):
    import numpy as np

    first = b * per_batch
    rows = [i if i < n else first for i in range(first, first + per_batch)]  # pad: the first file
    return {
        desc.name: np.concatenate([np.load(fs[i]) for i in rows])
        for desc, fs in zip(descs, files, strict=True)
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m nbzoo.export.cann_standins",
        description="TEST TOOLING: write stand-in atc, npu-smi and ais_bench into FOLDER.",
    )
    p.add_argument("folder")
    folder = p.parse_args(argv).folder
    try:
        out = write(folder)
    except safe_write.NotOursError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only folder, a full disk
        print(f"error: {safe_write.write_error(folder, exc)}", file=sys.stderr)
        return 1
    print(f"export PATH={shlex.quote(str(out.bin))}:$PATH")
    print(f"export PYTHONPATH={shlex.quote(str(out.python))}${{PYTHONPATH:+:$PYTHONPATH}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
