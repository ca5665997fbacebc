#!/usr/bin/env bash
# The one GPU run of the accelerated runtime: install, GPU tests, end-to-end benchmark.
#
#   VLA_COMMIT=$(git rev-parse HEAD) OUT=/tmp/out bash scripts/gpu_e2e.sh [extra benchmarks.e2e args]
#
# Needs: a CUDA GPU, torch + triton + transformers + pyyaml installed (no hydra / omegaconf / robosuite), and
# the LIBERO trace recorded on a CPU machine (python -m benchmarks.record_trace --out .devcarry/...npz),
# passed in $TRACE (default .devcarry/libero_spatial_t0.npz). Writes into $OUT:
#   gpu_tests.log  e2e/e2e.json  e2e/e2e.md  bench.log
# Stages: SKIP_TESTS=1 / SKIP_E2E=1 leave one out. (Old-vs-new comparison in one call: scripts/gpu_compare.sh.)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/vla_accel_gpu}
TRACE=${TRACE:-.devcarry/libero_spatial_t0.npz}
mkdir -p "$OUT/e2e"
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/bench.log"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/bench.log"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2

if [ -z "${SKIP_TESTS:-}" ]; then
  python3 -m pytest -q -m gpu tests/test_runtime_gpu.py -p no:cacheprovider --timeout 600 2>&1 | tee "$OUT/gpu_tests.log" \
    | tail -15 || status=1
fi
if [ -z "${SKIP_E2E:-}" ]; then
  python3 -m benchmarks.e2e --trace "$TRACE" --out "$OUT/e2e" --commit "${VLA_COMMIT:-}" "$@" 2>&1 \
    | tee -a "$OUT/bench.log" | grep -v -e '^\[' -e Warning || status=1
fi
exit $status
