#!/usr/bin/env bash
# The GPU run of `nbzoo bench` (issue 10), for a session that has a device machine.
# Prepared on a CPU-only machine and not yet run: no GPU was lent when it was written.
#
# On the development machine, once, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   .venv/bin/pip download --no-deps --only-binary=:all: -d .whl transformers==5.24.0
# (the device image has torch with CUDA and transformers 5.17; the perf patches are checked
# against 5.24 only, so the wheel travels; its other requirements are already in the image).
#
# Then through the device tool (one call, well under its 10-minute limit):
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
# and afterwards, here:
#   cp <files_at>/bench/*.json results/bench/
#   .venv/bin/python -m nbzoo.bench --table --update-readme bench/README.md
#
# Arguments, if given, are the cases to run (default: all six), e.g. to split the work over two
# calls. Each case's JSON is written to $OUT/bench/ as soon as it finishes, so a run cut short
# still returns the cases it completed.
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

# 10 timed steps after 3 warm-up ones: enough for a median, and keeps the compile-heavy run
# of all six cases inside one device call.
timeout 560 python3 -m nbzoo.bench "$@" --device cuda --steps 10 --warmup 3 --out "$OUT/bench"
rc=$?
ls -l "$OUT/bench"
exit $rc
