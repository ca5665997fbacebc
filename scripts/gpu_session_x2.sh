#!/bin/bash
# One device call on an nvidia-h200-x2 (the one that produced the 2026-11-30 results): one offline-bundle install,
# then two halves in parallel, each on its own GPU and 16 cores (what one nvidia-h200 machine has):
#   A (GPU 0, cores 0-15): scripts/gpu_rollout.sh stages a b c (issue 13), then a LIBERO trace and
#      benchmarks/serve_bench.py (issue 16)
#   B (GPU 1, cores 16-31): scripts/gpu_train_object.sh demos + train, then scripts/gpu_trained_eval.sh (issue 17)
# Everything comes back as $OUT/call.tgz (re-packed every 20 s and as stages end) and $OUT/checkpoint.tgz.
#
#   carry: .bundle/manifest.json .bundle/core .bundle/assets/libero_object.tar.xz .bundle/assets/libero_spatial.tar.xz
#          $WHL (py3.12 wheels the image lacks: simplejpeg, uvicorn, starlette, websockets, json-numpy)
#   SHA=<commit> BUDGET=572 B_EVAL_S=125 DEMO_BUDGET_S=150 bash scripts/gpu_session_x2.sh
#   DRY=1 OUT=/tmp/dry VLA_ACCEL_LIBERO_ASSETS=... bash scripts/gpu_session_x2.sh   # CPU dry run of the plumbing
set -uo pipefail
export PYTHONUNBUFFERED=1
S=$(date +%s); END=$((S + ${BUDGET:-570}))
SHA=${SHA:-?}
st() { echo "[$(( $(date +%s) - S )) s] $*" | tee -a "$OUT/driver.log"; }
left() { echo $(( END - $(date +%s) )); }
# everything is written under $W; $OUT gets call.tgz (all but the checkpoint) and checkpoint.tgz (<= 16 MiB each)
RET=$OUT; W=/tmp/c3; OUT=$W
pack() { local t="/tmp/call.$BASHPID.$RANDOM.tgz"; (cd "$W" && tar czf "$t" --exclude checkpoint.tgz . 2>/dev/null \
          && mv "$t" "$RET/call.tgz"); [ -f "$W/train/checkpoint.tgz" ] && cp "$W/train/checkpoint.tgz" "$RET/"; }
mkdir -p "$OUT" "$RET"
CORES=$(nproc)
st "start: commit $SHA, $CORES cores, budget $((END - S)) s"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/device.txt"

if [ -z "${DRY:-}" ]; then
  st install
  timeout 150 bash scripts/install_offline_bundle.sh .bundle --no-smoke > "$OUT/install.log" 2>&1; echo "install rc=$?"
  tail -5 "$OUT/install.log"
  # shellcheck disable=SC1091
  source .bundle/installed/env.sh
  python3 -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check "${WHL:-.devcarry/whl_serve}"/*.whl \
    >> "$OUT/install.log" 2>&1 || st "whl_serve failed"
  python3 -c "import simplejpeg, uvicorn, websockets, hydra, robosuite, vla_accel.envs, vla_accel.train; print('imports ok')" 2>&1 | tail -2
  export MUJOCO_GL=egl
fi
st "install done"
if [ "$CORES" -ge 32 ]; then A_CPUS=0-15; B_CPUS=16-31; else A_CPUS=0-$((CORES - 1)); B_CPUS=$A_CPUS; fi
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
B_GPU=$([ "$NGPU" -ge 2 ] && echo 1 || echo 0)

# ---- B: demos -> train -> eval of the trained policy ---------------------------------------------------------
half_b() {
  [ -z "${DRY:-}" ] && export CUDA_VISIBLE_DEVICES=$B_GPU MUJOCO_EGL_DEVICE_ID=$B_GPU
  local o="$OUT/train"; mkdir -p "$o"
  local tb=$(( $(left) - ${B_EVAL_S:-130} ))   # demos + training must leave the eval its time
  if [ -n "${DRY:-}" ]; then
    SMOKE=1 OUT="$o" WORK=/tmp/vla_train STAGES="demos train" taskset -c "$B_CPUS" bash scripts/gpu_train_object.sh \
      > "$o/driver_b.log" 2>&1
  else
    OUT="$o" WORK=/tmp/vla_train STAGES="demos train" WORKERS=16 DEMO_BUDGET_S=${DEMO_BUDGET_S:-170} \
      TRAIN_MINUTES=5 CALL_BUDGET_S=$tb taskset -c "$B_CPUS" bash scripts/gpu_train_object.sh > "$o/driver_b.log" 2>&1
  fi
  echo "B: demos+train rc=$? ($(( $(date +%s) - S )) s)" | tee -a "$OUT/driver.log"
  rm -rf "$o/work"
  pack
  local eb=$(( $(left) - 15 ))
  if [ -d /tmp/vla_train/train/checkpoint ] && [ "$eb" -gt 40 ]; then
    if [ -n "${DRY:-}" ]; then
      CKPT=/tmp/vla_train/train/checkpoint OUT="$o" WORK=/tmp/vla_train DEVICE=cpu NUM_ENVS=1 MAX_STEPS=8 \
        EPISODES=30 TASKS=0 ROUND=1 SETTINGS="none:reference specprune:reference" BUDGET_S=$eb \
        taskset -c "$B_CPUS" bash scripts/gpu_trained_eval.sh > "$o/eval_driver.log" 2>&1
    else
      CKPT=/tmp/vla_train/train/checkpoint OUT="$o" WORK=/tmp/vla_train NUM_ENVS=16 ROUND=${B_ROUND:-5} \
        SETTINGS="none:accel specprune:accel none:reference specprune:reference static_only:accel dynamic_only:accel" \
        BUDGET_S=$eb taskset -c "$B_CPUS" bash scripts/gpu_trained_eval.sh > "$o/eval_driver.log" 2>&1
    fi
    echo "B: eval rc=$? ($(( $(date +%s) - S )) s)" | tee -a "$OUT/driver.log"
    (cd /tmp/vla_train && tar czf "$o/eval_runs.tgz" --exclude '*.mp4' eval 2>/dev/null)
  else
    echo "B: no checkpoint or no time for the eval ($eb s)" | tee -a "$OUT/driver.log"
  fi
}

# ---- A: closed-loop rollout, then the serve bench ------------------------------------------------------------
half_a() {
  [ -z "${DRY:-}" ] && export CUDA_VISIBLE_DEVICES=0 MUJOCO_EGL_DEVICE_ID=0
  local o="$OUT/rollout"; mkdir -p "$o"
  if [ -n "${DRY:-}" ]; then
    SKIP_INSTALL=1 OUT="$o" WORK=/tmp/vla_rollout BUDGET_S=$(( $(left) - 120 )) POLICY=random_tiny STAGES="a c" \
      EXTRA="env.max_steps=4 eval.num_envs=2 env.image_size=64" EPISODES_A=1 TASKS=[2] C_STEPS=4 \
      SUITES=libero_spatial taskset -c "$A_CPUS" bash scripts/gpu_rollout.sh > "$o/driver_a.log" 2>&1
  else
    SKIP_INSTALL=1 OUT="$o" WORK=/tmp/vla_rollout BUDGET_S=$(( $(left) - ${A_SERVE_S:-150} )) VLA_COMMIT=$SHA \
      SUITES=libero_spatial,libero_object TASKS=[2,3] EPISODES_A=8 STAGES="a b c" \
      taskset -c "$A_CPUS" bash scripts/gpu_rollout.sh > "$o/driver_a.log" 2>&1
  fi
  echo "A: rollout rc=$? ($(( $(date +%s) - S )) s)" | tee -a "$OUT/driver.log"
  pack
  # a LIBERO trace for the serve bench (256 px, 64 steps; tiny random policy on the CPU decides the actions)
  timeout 60 taskset -c "$A_CPUS" python3 -m vla_accel.eval.cli policy=random_tiny policy.device=cpu env.image_size=256 \
    "eval.suites=[libero_spatial]" "eval.task_ids=[0]" "eval.episodes=[0]" env.max_steps=64 eval.num_envs=1 \
    eval.progress=false eval.record_trace=/tmp/serve_trace.npz hydra.run.dir=/tmp/serve_trace_run \
    > "$o/trace.log" 2>&1
  echo "A: trace rc=$? ($(( $(date +%s) - S )) s)" | tee -a "$OUT/driver.log"
  local sb=$(( $(left) - 10 ))
  if [ -f /tmp/serve_trace.npz ] && [ "$sb" -gt 60 ]; then
    if [ -n "${DRY:-}" ]; then
      timeout "$sb" taskset -c "$A_CPUS" python3 benchmarks/serve_bench.py --trace /tmp/serve_trace.npz --preset tiny \
        --device cpu --steps 4 --clients 2 --out "$OUT/serve" --commit "$SHA" > "$o/serve.log" 2>&1
    else
      timeout "$sb" taskset -c "$A_CPUS" python3 benchmarks/serve_bench.py --trace /tmp/serve_trace.npz \
        --out "$OUT/serve" --commit "$SHA" > "$o/serve.log" 2>&1
    fi
    echo "A: serve rc=$? ($(( $(date +%s) - S )) s)" | tee -a "$OUT/driver.log"
  else
    echo "A: serve skipped (trace missing or $sb s left)" | tee -a "$OUT/driver.log"
  fi
}

half_a &
PA=$!
half_b &
PB=$!
while kill -0 $PA 2>/dev/null || kill -0 $PB 2>/dev/null; do sleep 20; pack; done
wait
st "both halves done"
grep -hE "Full protocol|episodes/hour|vs trace|chunks/s|average|success" "$OUT"/rollout/rollout_*.md \
  "$OUT"/serve/serve_bench.md "$OUT"/train/trained_policy.md 2>/dev/null | head -40
pack
st end
