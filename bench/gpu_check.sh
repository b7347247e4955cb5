#!/usr/bin/env bash
# The GPU run of `nbzoo bench` (issue 10), for a session that has a device machine.
# Prepared on a CPU-only machine; first run on a lent GPU on 2026-11-26.
#
# On the development machine, once, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64 -d .whl \
#     transformers==5.24.0 crc32c==2.9.post0
#   .venv/bin/pip wheel --no-deps -w .whl tfrecord==1.14.6      # sdist only: build the wheel here
# (the device image has torch with CUDA and transformers 5.17; the perf patches are checked
# against 5.24 only, so that wheel travels; crc32c and tfrecord are for the MLPerf shards of the
# THOR check; their other requirements are already in the image).
#
# Then through the device tool (one call, within 10 minutes on an H200: about 30 s to start, then
# three phases, each under its own timeout; the defaults below sum to 540 s):
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
# 1. THOR's step cost with the batched preconditioning (bench/thor_gpu_check.py, notebook 06's
#    full-preset path, 60 steps per optimizer and 200 alternating THOR/AdamW steps; the run of
#    2026-11-26 predates the batching: 1.49 x AdamW), at most THOR_SECONDS (default 160);
# 2. the real-length cases and the padding sweep (`nbzoo bench real_lengths padding_sweep`, issue
#    27: ALBERT-base at SST-2 lengths, BERT-Large at MLPerf Wikipedia lengths, ALBERT-base at 0-90 %
#    padding at batch 8 and 32; stock as the seed, stock at its best, nbzoo plain and nbzoo
#    length-packed, interleaved in rounds), all four paths uncompiled (`--compile off`: compiling
#    three paths of twelve cases takes longer than the phase, and stock is compared uncompiled
#    too); nbzoo's length packing attends with torch's varlen FlashAttention
#    (torch.nn.attention.varlen, bf16) where the model has no attention dropout (ALBERT), each
#    sequence padded for SDPA otherwise (BERT-Large); nbzoo plain with SDPA's block-diagonal mask
#    (FlexAttention runs unfused uncompiled); estimated 2-3 minutes on an H100 (never run yet:
#    prepared without a GPU), at most LENGTH_SECONDS (default 220);
# 3. the full-length cases that lost on 2026-11-26 (albert_base_cls, bert_large_pretrain_512),
#    the perf path measured first (`--order nbzoo-first`, to rule the order out), at most
#    BENCH_SECONDS (default 160).
# Every record is written to $OUT as soon as it is complete, so a phase cut short keeps the others.
# Afterwards, here:
#   cp <files_at>/bench/*.json results/bench/; cp <files_at>/thor_gpu_check.json results/bench/
#   mkdir -p results/bench/lengths/cuda; cp <files_at>/lengths/*.json results/bench/lengths/cuda/
#   (the packing patches are checked against torch 2.13: on another torch the preflight below
#   says so, and phase 2's nbzoo paths stop with the patches' version error until tests/
#   test_packing.py and tests/test_length_packing.py pass on that torch and the range is widened)
#   .venv/bin/python -m nbzoo.bench --table --update-readme bench/README.md
#   .venv/bin/python -m nbzoo.bench --table --lengths cuda --update-readme bench/README.md
#   .venv/bin/python bench/thor_gpu_check.py --table --update-readme bench/README.md
# (the lengths table in bench/README.md shows one device's records: the CPU ones are committed.)
#
# Arguments, if given, replace phase 3's cases. Environment:
#   THOR_SECONDS=N, LENGTH_SECONDS=N, BENCH_SECONDS=N   each phase's time (0 skips the phase)
#   DEVICE=cpu QUICK=1 PYTHON=.venv/bin/python          the same three phases at toy size on a
#                                                       CPU (how the script is checked without a GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/nbzoo-out}
mkdir -p "$OUT/bench"
exec > >(tee "$OUT/gpu_check.log") 2>&1

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
# nbzoo from this checkout, and patches/ as the package nbzoo_patches (as pyproject maps it)
mkdir -p /tmp/nbzp && ln -sfn "$PWD/patches" /tmp/nbzp/nbzoo_patches
export PYTHONPATH="$PWD:/tmp/nbzp${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=16 TOKENIZERS_PARALLELISM=false

PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then quick=(--quick); thor=(--tiny --steps 4 --paired-steps 4 --samples 200); else quick=(); thor=(--steps 60 --paired-steps 200); fi
rc=0

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
"$PYTHON" - <<'PY' || exit 1
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
print("transformers", transformers.__version__)
if transformers.__version__ != "5.24.0":
    raise SystemExit("transformers 5.24.0 is needed (the patches are checked against it): carry .whl")
from packaging.version import Version
if not Version("2.13") <= Version(torch.__version__.split("+")[0]) < Version("2.14"):
    print(f"WARNING: torch {torch.__version__}: the packing patches are checked against 2.13 only;"
          " phase 2's nbzoo paths will stop with their version error")
try:
    from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    print("varlen attention: torch.nn.attention.varlen.varlen_attn present")
except ImportError:
    print("varlen attention: absent in this torch; nbzoo packs with FlexAttention / SDPA masks")
PY

if [ "${THOR_SECONDS:-160}" -gt 0 ]; then
  timeout "${THOR_SECONDS:-160}" "$PYTHON" bench/thor_gpu_check.py --device "$DEVICE" "${thor[@]}" \
    --workdir /tmp/thor_gpu_check --json "$OUT/thor_gpu_check.json" || rc=1
  echo "thor_gpu_check: done (rc so far $rc)"
fi

if [ "${LENGTH_SECONDS:-220}" -gt 0 ]; then
  timeout "${LENGTH_SECONDS:-220}" "$PYTHON" -m nbzoo.bench real_lengths padding_sweep \
    --device "$DEVICE" --compile off "${quick[@]}" --out "$OUT/lengths" || rc=1
  "$PYTHON" -m nbzoo.bench --table --lengths "$DEVICE" --out "$OUT/lengths" || true
  echo "real-length cases and padding sweep: done (rc so far $rc)"
fi

# 10 timed steps after 3 warm-up ones: enough for a median inside the phase's time
if [ "${BENCH_SECONDS:-160}" -gt 0 ]; then
  cases=("$@")
  [ ${#cases[@]} -gt 0 ] || cases=(albert_base_cls bert_large_pretrain_512)
  timeout "${BENCH_SECONDS:-160}" "$PYTHON" -m nbzoo.bench "${cases[@]}" --device "$DEVICE" \
    "${quick[@]}" --steps 10 --warmup 3 --order nbzoo-first --out "$OUT/bench" || rc=1
  echo "full-length cases: done (rc so far $rc)"
fi
ls -l "$OUT" "$OUT/bench" "$OUT/lengths" 2>/dev/null
exit $rc
