#!/usr/bin/env bash
# Closed-loop matrix of a trained checkpoint: prune {none, specprune, static_only, dynamic_only} x runtime
# {reference, accel} on libero_object, the held-out official init states, N simulators in parallel.
#
#   CKPT=path/to/checkpoint OUT=$OUT bash scripts/gpu_trained_eval.sh               # GPU machine
#   CKPT=... OUT=/tmp/cpu DEVICE=cpu NUM_ENVS=1 SETTINGS="none:reference specprune:reference" \
#     EPISODES=30-31 bash scripts/gpu_trained_eval.sh                               # the same on a CPU
#
# Needs LIBERO and its assets (source the bundle's env.sh) and, for runtime=accel, CUDA + Triton.
# Episodes run in rounds of ROUND episodes per task: every setting gets round 1 before any gets round 2,
# so when BUDGET_S runs out the settings have comparable samples. A running setting is stopped at the
# budget; its finished episodes count (vla-accel-eval writes each one as it ends). Resumable: the same
# WORK continues.
#
# Env: CKPT (required), OUT, WORK ($OUT/work), TASKS (0-9), EPISODES (30-49), ROUND (10), NUM_ENVS (16),
#      SETTINGS ("prune:runtime ...", order = priority), BUDGET_S (480), DEVICE (auto), MAX_STEPS (protocol: 280),
#      EXTRA (more vla-accel-eval overrides).
# Writes: $WORK/eval/<prune>_<runtime>/r<k>/ (run dirs), $OUT/eval_<prune>_<runtime>.log, $OUT/trained_policy.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MUJOCO_GL=${MUJOCO_GL:-egl}
: "${CKPT:?CKPT must name the trained checkpoint directory}"
[ -f "$CKPT/config.json" ] || { echo "gpu_trained_eval: $CKPT/config.json not found (not a checkpoint dir)" >&2; exit 2; }
OUT=${OUT:-/tmp/vla_trained_eval}
WORK=${WORK:-$OUT/work}
TASKS=${TASKS:-0-9}
EPISODES=${EPISODES:-30-49}
ROUND=${ROUND:-10}
NUM_ENVS=${NUM_ENVS:-16}
BUDGET_S=${BUDGET_S:-480}
DEVICE=${DEVICE:-auto}
SETTINGS=${SETTINGS:-"none:reference specprune:reference none:accel specprune:accel static_only:reference dynamic_only:reference static_only:accel dynamic_only:accel"}
EXTRA=${EXTRA:-}
mkdir -p "$OUT" "$WORK/eval"
python3 -c "import vla_accel.envs, vla_accel.eval" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2

expand() { python3 -c "from vla_accel.train.demos import parse_range; import sys; print(*parse_range(sys.argv[1]), sep=',')" "$1"; }
tasks="[$(expand "$TASKS")]"
IFS=',' read -r -a eps <<< "$(expand "$EPISODES")"
max_steps=${MAX_STEPS:+env.max_steps=$MAX_STEPS}
start=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }
echo "gpu_trained_eval: $CKPT on libero_object tasks $tasks, episodes ${EPISODES} in rounds of $ROUND, $NUM_ENVS envs, budget ${BUDGET_S}s"

for ((r = 0; r * ROUND < ${#eps[@]}; r++)); do
  round_eps=$(IFS=','; echo "${eps[*]:$((r * ROUND)):$ROUND}")
  for setting in $SETTINGS; do
    prune=${setting%%:*}; runtime=${setting##*:}
    remaining=$(left)
    if [ "$remaining" -le 20 ]; then echo "budget spent: round $((r + 1)) $setting not started"; continue; fi
    dir="$WORK/eval/${prune}_${runtime}/r$r"
    echo "[$(date +%H:%M:%S)] round $((r + 1)) ($round_eps) $prune/$runtime, ${remaining}s left"
    # shellcheck disable=SC2086
    timeout --signal=INT --kill-after=30 "$remaining" python3 -m vla_accel.eval.cli policy=checkpoint \
      policy.checkpoint="$CKPT" policy.device="$DEVICE" prune="$prune" runtime="$runtime" eval=full \
      'eval.suites=[libero_object]' "eval.task_ids=$tasks" "eval.episodes=[$round_eps]" eval.num_envs="$NUM_ENVS" \
      eval.progress=false $max_steps $EXTRA hydra.run.dir="$dir" >> "$OUT/eval_${prune}_${runtime}.log" 2>&1
    rc=$?
    [ $rc -eq 0 ] || echo "  exit $rc (124/130: stopped at the budget; see $OUT/eval_${prune}_${runtime}.log)"
    grep -h -A3 "^average\|success" "$dir/summary.txt" 2>/dev/null | head -4
  done
done

runs=$(find "$WORK/eval" -name results.jsonl -printf '%h\n' 2>/dev/null | sort)
[ -n "$runs" ] || { echo "gpu_trained_eval: no finished episodes"; exit 1; }
# shellcheck disable=SC2086
python3 -m vla_accel.train.report $runs --out "$OUT/trained_policy.md" \
  --title "Trained libero_object policy in closed loop ($(date +%F), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo CPU))" \
  --note "checkpoint: $CKPT; episodes: official init states $EPISODES of tasks $TASKS; commit $(git rev-parse --short HEAD 2>/dev/null)"
