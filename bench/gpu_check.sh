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
# Then through the device tool (one call; the first run, 2026-11-26 on an H200, needed about
# 30 s to start, 150 s for the THOR check and 70-150 s per bench case, compile included):
#   run(command="THOR_SECONDS=220 BENCH_SECONDS=360 bash bench/gpu_check.sh", carry=[".whl"],
#       timeout_s=600)
# and afterwards, here:
#   cp <files_at>/bench/*.json results/bench/; cp <files_at>/thor_gpu_check.json results/bench/
#   .venv/bin/python -m nbzoo.bench --table --update-readme bench/README.md
#   .venv/bin/python bench/thor_gpu_check.py --table --update-readme bench/README.md
#
# Arguments, if given, are the cases to run (default: all six), e.g. to split the work over two
# calls. Each case's JSON is written to $OUT/bench/ as soon as it finishes, so a run cut short
# still returns the cases it completed. Environment:
#   THOR_SECONDS=N   first run bench/thor_gpu_check.py (notebook 06's full-preset path for a few
#                    steps, issue 12) for at most N seconds; its record goes to $OUT/thor_gpu_check.json
#   BENCH_SECONDS=N  the time given to `nbzoo bench` (default 560)
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

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
python3 - <<'PY' || exit 1
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
print("transformers", transformers.__version__)
if transformers.__version__ != "5.24.0":
    raise SystemExit("transformers 5.24.0 is needed (the perf patches are checked against it): carry .whl")
PY

if [ "${THOR_SECONDS:-0}" -gt 0 ]; then
  timeout "$THOR_SECONDS" python3 bench/thor_gpu_check.py --device cuda \
    --workdir /tmp/thor_gpu_check --json "$OUT/thor_gpu_check.json"
  echo "thor_gpu_check: exit $?"
fi

# 10 timed steps after 3 warm-up ones: enough for a median, and keeps the compile-heavy run
# of all six cases inside one device call.
timeout "${BENCH_SECONDS:-560}" python3 -m nbzoo.bench "$@" --device cuda --steps 10 --warmup 3 --out "$OUT/bench"
rc=$?
ls -l "$OUT/bench"
exit $rc
