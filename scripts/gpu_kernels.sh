#!/usr/bin/env bash
# Kernels on the GPU in one go: tune the dispatch table (GEMM and attention), run the bf16 GPU tests, benchmark.
#   bash scripts/gpu_kernels.sh [OUT_DIR]      (on the device machine OUT is set; results land there)
# The tuner runs first: its parallel compilation fills Triton's cache for the tests and the benchmark.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/kernels_out}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed (continuing)"
if ! python -c "import vla_accel.kernels" 2>/dev/null; then
  # not installed (no network / build backend there): map the package dir by hand, in this copy only
  pip install --no-deps --no-build-isolation -e . 2>&1 | tail -n 3
  ln -sfn ../kernels vla_accel/kernels
  python -c "import vla_accel.kernels" || { echo "vla_accel.kernels not importable"; exit 1; }
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
start=$(date +%s)
# attention tiles are tuned on batch 1 and the ragged batch of 8 (worst ratio to SDPA); TUNE_ARGS passes more
# options (e.g. TUNE_ARGS="--only o" to re-tune fewer GEMM shapes)
# no --out: the table goes to the user's cache, where default_table (the tests, the benchmark) looks first
python -m vla_accel.runtime.tune --preset 7b ${TUNE_ARGS:-} > "$OUT/tune.log" 2>&1
echo "tune rc=$? after $(( $(date +%s) - start )) s"; grep -E "^attention:" "$OUT/tune.log"; tail -n 25 "$OUT/tune.log"
python -c "import torch; from vla_accel.kernels.table import user_table_path as p; print(p(torch.cuda.get_device_name()))" \
  | xargs -I{} cp {} "$OUT/table.json"
python -m pytest -q -m gpu tests/test_kernels_gpu.py -p no:cacheprovider > "$OUT/pytest_gpu.log" 2>&1
echo "pytest rc=$? after $(( $(date +%s) - start )) s"; tail -n 12 "$OUT/pytest_gpu.log"
python -m benchmarks.kernels --out "$OUT" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
echo "bench rc=$? after $(( $(date +%s) - start )) s"; tail -n 60 "$OUT/bench.log"
