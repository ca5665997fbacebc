#!/usr/bin/env bash
# Issue 17 end to end on one GPU machine: scripted-expert demos -> training -> closed-loop evaluation.
#
#   bash scripts/install_offline_bundle.sh .bundle && source .bundle/installed/env.sh   # LIBERO + its assets
#   OUT=$OUT STAGES="demos train" bash scripts/gpu_train_object.sh     # call 1 (~7-9 min on an H200 node)
#   OUT=$OUT STAGES="eval" bash scripts/gpu_train_object.sh            # call 2: scripts/gpu_trained_eval.sh
#   SMOKE=1 OUT=/tmp/smoke bash scripts/gpu_train_object.sh            # CPU smoke test of every stage (minutes)
#
# Stages (STAGES, default "demos train eval"; each resumes what an earlier run in the same WORK left):
#   demos  vla-accel-demos: TASKS x DEMO_EPISODES (official init states, default 0-19; the evaluation uses
#          30-49), WORKERS simulators in parallel -> $WORK/demos (+ expert_success.md)
#   train  vla-accel-train train=$TRAIN_CONFIG (object_gpu: bf16 autocast, time budget TRAIN_MINUTES) -> $WORK/train
#   eval   scripts/gpu_trained_eval.sh on $WORK/train/checkpoint -> $WORK/eval, table in $OUT/trained_policy.md
# Seeds are fixed: the expert is deterministic, init states are the official ones, train.seed=0, eval.seed=0.
#
# Env: OUT (results that come back: logs, tables, the checkpoint as one tar), WORK (default $OUT/work; a folder
#      that survives between calls on a warm machine, e.g. /tmp/vla_train), TASKS (0-9), DEMO_EPISODES (0-19),
#      WORKERS (nproc), TRAIN_CONFIG (object_gpu), TRAIN_MINUTES (5), TRAIN_ARGS (extra train.* overrides),
#      CALL_BUDGET_S (540: the training loop gets at most what is left of it after the earlier stages,
#      minus 90 s for decoding, saving and packing; the device's command limit is 600 s, and the bundle
#      install before this script takes some of it),
#      DEMO_BUDGET_S (270: the demos stage stops there, keeping the episodes it finished),
#      DEMOS (use this demo folder instead of recording: e.g. carried demos), SMOKE=1 (tiny everything, CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MUJOCO_GL=${MUJOCO_GL:-egl}
OUT=${OUT:-/tmp/vla_train_object}
WORK=${WORK:-$OUT/work}
STAGES=${STAGES:-demos train eval}
TASKS=${TASKS:-0-9}
DEMO_EPISODES=${DEMO_EPISODES:-0-19}
WORKERS=${WORKERS:-$(nproc)}
TRAIN_CONFIG=${TRAIN_CONFIG:-object_gpu}
TRAIN_MINUTES=${TRAIN_MINUTES:-5}
TRAIN_ARGS=${TRAIN_ARGS:-}
CALL_BUDGET_S=${CALL_BUDGET_S:-540}
DEMO_BUDGET_S=${DEMO_BUDGET_S:-270}
script_start=$(date +%s)
if [ -n "${SMOKE:-}" ]; then   # every stage, tiny: 1 task, 1 demo, 2 training steps on CPU, 1 short eval episode
  TASKS=${SMOKE_TASK:-0}; DEMO_EPISODES=0; WORKERS=1; TRAIN_CONFIG=smoke; DEMO_BUDGET_S=1200
  TRAIN_ARGS="train.steps=2 train.progress=false $TRAIN_ARGS"
  export SETTINGS=${SETTINGS:-"none:reference specprune:reference"} EPISODES=${EPISODES:-30} NUM_ENVS=1 \
         DEVICE=cpu MAX_STEPS=${MAX_STEPS:-16} TASKS
fi
DEMOS=${DEMOS:-$WORK/demos}
mkdir -p "$OUT" "$WORK"
status=0
log() { printf '[gpu_train_object %s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$OUT/stages.log"; }

python3 -c "import vla_accel.envs, vla_accel.train" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
[ -n "${VLA_ACCEL_LIBERO_ASSETS:-}" ] || log "warning: VLA_ACCEL_LIBERO_ASSETS is unset (source the bundle's env.sh)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/stages.log"
log "stages: $STAGES; work: $WORK; commit: $(git rev-parse --short HEAD 2>/dev/null || echo ?)"

for stage in $STAGES; do
  t0=$(date +%s)
  case "$stage" in
    demos)
      log "demos: tasks $TASKS, init states $DEMO_EPISODES, $WORKERS workers -> $DEMOS"
      timeout --signal=INT --kill-after=20 "$DEMO_BUDGET_S" python3 -m vla_accel.train.demos --out "$DEMOS" \
        --tasks "$TASKS" --episodes "$DEMO_EPISODES" --workers "$WORKERS" > "$OUT/demos.log" 2>&1
      rc=$?
      case $rc in
        0) ;;
        124|130) log "demos stopped at DEMO_BUDGET_S=${DEMO_BUDGET_S}s; training uses the episodes finished so far" ;;
        *) status=1; tail -20 "$OUT/demos.log" ;;
      esac
      python3 -c "from vla_accel.train.demos import read_manifest, success_table; import sys; print(success_table(read_manifest(sys.argv[1])))" \
        "$DEMOS" > "$OUT/expert_success.md" 2>/dev/null
      cat "$OUT/expert_success.md"
      ;;
    train)
      minutes=$(python3 -c "print(round(max(0.5, min($TRAIN_MINUTES, ($CALL_BUDGET_S - ($(date +%s) - $script_start) - 90) / 60)), 2))")
      log "train: train=$TRAIN_CONFIG, demos $DEMOS, budget $minutes min (TRAIN_MINUTES=$TRAIN_MINUTES, call budget ${CALL_BUDGET_S}s)"
      # shellcheck disable=SC2086
      python3 -m vla_accel.train.cli train="$TRAIN_CONFIG" train.demos="$DEMOS" train.max_minutes="$minutes" \
        train.decode_workers="$WORKERS" $TRAIN_ARGS hydra.run.dir="$WORK/train" > "$OUT/train.log" 2>&1 \
        || { status=1; tail -30 "$OUT/train.log"; }
      grep -v -e '^\s*$' "$OUT/train.log" | grep -v 'train:' | tail -8
      cp "$WORK/train/loss.png" "$WORK/train/summary.json" "$OUT/" 2>/dev/null
      [ -d "$WORK/train/checkpoint" ] && tar -C "$WORK/train" -czf "$OUT/checkpoint.tgz" checkpoint \
        && log "checkpoint: $(du -sh "$WORK/train/checkpoint" | cut -f1) -> $OUT/checkpoint.tgz"
      ;;
    eval)
      CKPT="$WORK/train/checkpoint" OUT="$OUT" WORK="$WORK" bash scripts/gpu_trained_eval.sh || status=1
      ;;
    *) log "unknown stage '$stage' (valid: demos train eval)"; exit 2 ;;
  esac
  log "$stage done in $(( $(date +%s) - t0 )) s"
done
exit $status
