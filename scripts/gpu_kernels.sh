#!/usr/bin/env bash
# Kernels on the GPU in one go: tune the dispatch table (GEMM families incl. the Hopper flat GEMM, attention tiles)
# under a time budget, then the kernels' bf16 GPU tests; optionally the kernel benchmark.
#   bash scripts/gpu_kernels.sh [OUT_DIR]      (on the device machine OUT is set; results land there)
# Writes into OUT: <gpu>.json (the table, e.g. nvidia-h200.json: commit it to kernels/tables/), tune.log,
# pytest_gpu.log; with BENCH=1 also the kernel benchmark's kernels_<gpu>_<date>.json/.md and bench.log.
# Knobs: TUNE_BUDGET_S (default 150: the whole tune, compilation included), TUNE_ARGS (more tuner options, e.g.
# "--only o down"), TEST_TIMEOUT_S (default 300), BENCH=1, BENCH_ARGS.
# The tuner runs first: its parallel compilation fills Triton's cache for the tests and the benchmark; the table
# is also copied into the user cache, where default_table (hence the tests and the benchmark) looks first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/kernels_out}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed (continuing)"
if ! python -c "import vla_accel.kernels" 2>/dev/null; then
  # not installed (no network / build backend there): map the package dir by hand, in this copy only
  ln -sfn ../kernels vla_accel/kernels
  python -c "import vla_accel.kernels" || { echo "vla_accel.kernels not importable"; exit 1; }
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
slug=$(python -c "import torch; from vla_accel.kernels.table import gpu_slug; print(gpu_slug(torch.cuda.get_device_name()))")
cache=$(python -c "import torch; from vla_accel.kernels.table import user_table_path as p; print(p(torch.cuda.get_device_name()))")
start=$(date +%s)
budget=${TUNE_BUDGET_S:-150}
# the budget bounds compilation (at most half of it) and timing; `timeout` is the backstop (budget + 90 s)
timeout $((budget + 90)) python -m vla_accel.runtime.tune --preset 7b --budget-s "$budget" --out "$OUT/$slug.json" \
  ${TUNE_ARGS:-} > "$OUT/tune.log" 2>&1
echo "tune rc=$? after $(( $(date +%s) - start )) s"
grep -E "^(compil|wrote)|not timed" "$OUT/tune.log"; tail -n 30 "$OUT/tune.log"
if [ -f "$OUT/$slug.json" ]; then mkdir -p "$(dirname "$cache")" && cp "$OUT/$slug.json" "$cache"; fi
timeout "${TEST_TIMEOUT_S:-300}" python -m pytest -q -m gpu tests/test_kernels_*.py -p no:cacheprovider \
  > "$OUT/pytest_gpu.log" 2>&1
echo "pytest rc=$? after $(( $(date +%s) - start )) s"; tail -n 15 "$OUT/pytest_gpu.log"
if [ -n "${BENCH:-}" ]; then
  python -m benchmarks.kernels --out "$OUT" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  echo "bench rc=$? after $(( $(date +%s) - start )) s"; tail -n 60 "$OUT/bench.log"
fi
