#!/usr/bin/env bash
# The LIBERO closed loop on one GPU (issue 13): install the offline bundle, then vla-accel-eval with the 7B
# architecture (random bf16 weights), runtime=accel, 256 px cameras, the protocol's step limits, in stages of
# decreasing priority, each with its own time limit; what a stage has is under $OUT as soon as it ends.
#
#   On the development machine (network), once, in the checkout root:
#     bash scripts/gpu_rollout.sh --prepare       # .whl/: simplejpeg (+ submitit for the 2-GPU script), cp312
#   On the GPU machine, in the checkout root, with .bundle/ (manifest.json, core/, the asset parts) and .whl/:
#     OUT=/tmp/out VLA_COMMIT=<sha> bash scripts/gpu_rollout.sh            # about 7-8 minutes, at most BUDGET_S
#
# Stages (run dirs under $WORK; tarred into $OUT/stage_<x>.tar.gz as each ends):
#   a  prune=specprune, 16 simulators, $SUITES x tasks $TASKS x $EPISODES_A episodes per task, protocol steps:
#      episodes/hour per suite -> the extrapolated full protocol (benchmarks/rollout_summary.py)
#   b  prune=none, 16 simulators, libero_spatial, 16 episodes
#   c  prune=specprune, 1 / 4 / 8 simulators on libero_spatial, env.max_steps=$C_STEPS (latency vs batch size)
#   d  as a's libero_spatial part with eval.prepare_in_workers=true (if time is left): is it faster?
# $OUT gets: log.txt, rollout_<gpu>_<date>.md/.json (the table), stage_a/b/c/d.tar.gz, report_a.png (8 files).
# Environment: BUDGET_S (520: the whole script, installs included), SUITES (libero_10,libero_goal,libero_spatial:
# the parts one transfer can carry beside the core; libero_10 has tasks 2-4 in that part), TASKS ([2,3]),
# EPISODES_A (8), C_STEPS (96), PRECAPTURE (3: eval.precapture_steps), STAGES ("a b c d"; empty: install only, as
# scripts/gpu_rollout_x2.sh uses it). For a dry run of the plumbing on a CPU machine with LIBERO installed:
#   SKIP_INSTALL=1 POLICY=random_tiny EXTRA="env.max_steps=4 eval.num_envs=2 env.image_size=64" EPISODES_A=1 \
#     TASKS=[2] C_STEPS=4 bash scripts/gpu_rollout.sh        (EXTRA: overrides appended to every run)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

if [ "${1:-}" = "--prepare" ]; then   # development machine: the wheels the GPU image and the bundle lack
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl simplejpeg==1.9.0 submitit==1.5.4 hydra-submitit-launcher==1.2.0 && ls -la .whl
  du -ch .bundle/manifest.json .bundle/core .bundle/assets/libero_spatial.tar.xz .bundle/assets/libero_goal.tar.xz \
    .bundle/assets/libero_10-tasks2-4.tar.xz .whl 2>/dev/null | tail -1
  exit 0
fi

OUT=${OUT:-/tmp/vla_accel_rollout}
WORK=${WORK:-/tmp/vla_accel_rollout_runs}
BUDGET_S=${BUDGET_S:-520}
SUITES=${SUITES:-libero_10,libero_goal,libero_spatial}
TASKS=${TASKS:-[2,3]}
EPISODES_A=${EPISODES_A:-8}
C_STEPS=${C_STEPS:-96}
PRECAPTURE=${PRECAPTURE:-3}
STAGES=${STAGES-a b c d}
POLICY=${POLICY:-random_7b}
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
mkdir -p "$OUT" "$WORK"
LOG="$OUT/log.txt"
T0=$(date +%s)
say() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
# stage_limit CAP RESERVE: seconds a stage may take: its cap, or what is left minus RESERVE for what follows
stage_limit() { local l=$(( $(left) - $2 )); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }

say "gpu_rollout: commit ${VLA_COMMIT:-?}, budget ${BUDGET_S} s"
nvidia-smi --query-gpu=name,memory.total,driver_version,utilization.gpu --format=csv 2>&1 | tee -a "$LOG"
nproc | sed 's/^/cpu cores: /' | tee -a "$LOG"

# ---- install: the bundle (wheels, GL loader libraries, assets, this checkout), then the extra wheels ----------
if [ -z "${SKIP_INSTALL:-}" ]; then
say "install: bundle"
timeout -k 10 "$(stage_limit 180 0)" bash scripts/install_offline_bundle.sh .bundle --no-smoke >>"$LOG" 2>&1 \
  || say "install_offline_bundle.sh failed (status $?); trying to go on"
# shellcheck disable=SC1091
[ -f .bundle/installed/env.sh ] && source .bundle/installed/env.sh
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check .whl/*.whl >>"$LOG" 2>&1 \
    || say "extra wheels (.whl) failed to install"
fi
python3 -c "import simplejpeg, hydra, robosuite, vla_accel" >>"$LOG" 2>&1 \
  || { say "FATAL: simplejpeg / hydra / robosuite / vla_accel do not import (carry .whl from --prepare and .bundle)"; exit 1; }
say "install done: MUJOCO_GL=${MUJOCO_GL:-unset} assets=${VLA_ACCEL_LIBERO_ASSETS:-unset}"
timeout -k 5 60 python3 scripts/install_offline_bundle.py smoke --suites libero_spatial >>"$LOG" 2>&1 \
  || say "smoke check failed or timed out (see log); going on"
grep -iE "vendor|renderer" "$LOG" | tail -2
fi
[ -z "$STAGES" ] && { say "install only (STAGES is empty)"; exit 0; }

# max_graphs: 16 batch sizes x ~10 graphs per pruned forward x token buckets exceed the default 512;
# bucket_steps: 16 unpruned samples are ~16 x 600 = 9600 token rows, beyond the default buckets' 8192 (eager there)
COMMON=("policy=$POLICY" runtime=accel runtime.max_graphs=4096
        "runtime.bucket_steps=[[1024,16],[2048,32],[4096,64],[8192,128],[16384,256]]" env.image_size=256
        eval.progress=false "eval.precapture_steps=$PRECAPTURE")
summarize() {
  python3 -m benchmarks.rollout_summary "$WORK" --out "$OUT" --commit "${VLA_COMMIT:-}" \
    --command "bash scripts/gpu_rollout.sh (SUITES=$SUITES TASKS=$TASKS EPISODES_A=$EPISODES_A C_STEPS=$C_STEPS)" \
    > "$WORK/summary_stdout.txt" 2>>"$LOG" || say "rollout_summary failed (see log)"
}
# run NAME LIMIT ARGS...: one vla-accel-eval; SIGINT at LIMIT (results.json still written), SIGKILL 30 s later
run() {
  local name=$1 limit=$2; shift 2
  if [ "$limit" -lt 30 ]; then say "$name: skipped (only $limit s left)"; return; fi
  say "$name: start (limit $limit s): $*"
  timeout -s INT -k 30 "$limit" python3 -m vla_accel.eval.cli "${COMMON[@]}" "$@" "${EXTRA_ARGS[@]}" \
    "hydra.run.dir=$WORK/$name" \
    > "$WORK/$name.log" 2>&1
  local rc=$?
  say "$name: exit $rc"
  grep -E "episodes in|policy latency|model forward|where the time|^  [a-z/-]+ +[0-9.]+ s|forwards|GPU util|pre-capture" \
    "$WORK/$name.log" | tee -a "$LOG"
  [ "$rc" = 0 ] || tail -5 "$WORK/$name.log" | tee -a "$LOG"
}
pack() {  # pack STAGE RUN...: the run dirs and their logs into one archive
  local stage=$1; shift
  (cd "$WORK" && tar czf "$OUT/stage_$stage.tar.gz" --ignore-failed-read "$@" $(for r in "$@"; do echo "$r.log"; done) \
    2>/dev/null)
  summarize
}

# ---- a: SpecPrune, 16 simulators, every carried suite ---------------------------------------------------------
has() { [[ " $STAGES " == *" $1 "* ]]; }
has a && run a "$(stage_limit 300 150)" prune=specprune eval=full eval.num_envs=16 "eval.suites=[$SUITES]" \
  "eval.task_ids=$TASKS" "eval.num_episodes=$EPISODES_A"
[ -f "$WORK/a/report.png" ] && cp "$WORK/a/report.png" "$OUT/report_a.png"
has a && pack a a
# ---- b: no pruning, 16 simulators, one suite -------------------------------------------------------------------
has b && run b "$(stage_limit 120 60)" prune=none eval=full eval.num_envs=16 "eval.suites=[libero_spatial]" \
  "eval.task_ids=$TASKS" "eval.num_episodes=8"
has b && pack b b
# ---- c: SpecPrune latency against the batch size ----------------------------------------------------------------
has c && run c1 "$(stage_limit 60 70)" prune=specprune eval=full eval.num_envs=1 "eval.suites=[libero_spatial]" \
  "eval.task_ids=[2]" "eval.num_episodes=2" "env.max_steps=$C_STEPS"
has c && run c4 "$(stage_limit 60 35)" prune=specprune eval=full eval.num_envs=4 "eval.suites=[libero_spatial]" \
  "eval.task_ids=[2]" "eval.num_episodes=4" "env.max_steps=$C_STEPS"
has c && run c8 "$(stage_limit 70 10)" prune=specprune eval=full eval.num_envs=8 "eval.suites=[libero_spatial]" \
  "eval.task_ids=[2,3]" "eval.num_episodes=4" "env.max_steps=$C_STEPS"
has c && pack c c1 c4 c8
# ---- d: as a's libero_spatial wave, with the image pre-processing in the simulator workers ------------------------
has d && run d "$(stage_limit 120 0)" prune=specprune eval=full eval.num_envs=16 "eval.suites=[libero_spatial]" \
  "eval.task_ids=$TASKS" "eval.num_episodes=$EPISODES_A" eval.prepare_in_workers=true
has d && pack d d
say "done; $OUT:"
ls -la "$OUT" | tee -a "$LOG"
cat "$OUT"/rollout_*.md 2>/dev/null | head -60
