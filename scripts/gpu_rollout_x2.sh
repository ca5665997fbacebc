#!/usr/bin/env bash
# Two GPUs of one machine (issue 13, item 4): the same evaluation once on one GPU and once as a 2-shard
# submitit_local sweep, one job per GPU (eval.pin_gpu_by_job: CUDA_VISIBLE_DEVICES and MUJOCO_EGL_DEVICE_ID of
# job k = GPU k), merged with vla-accel-merge; checks that each job used its own GPU for the policy and for EGL.
#
#   On the development machine: bash scripts/gpu_rollout.sh --prepare       (.whl/: simplejpeg, submitit, launcher)
#   On the nvidia-h200-x2 machine, carrying .bundle (core + libero_spatial) and .whl:
#     OUT=/tmp/out VLA_COMMIT=<sha> bash scripts/gpu_rollout_x2.sh          # about 6 minutes, at most BUDGET_S
#
# Runs (policy=random_7b, runtime=accel, prune=specprune, libero_spatial, protocol step limits, NUM_ENVS
# simulators per job): one1 = EPISODES episodes on GPU 0; two = the same selection x 2 (twice the episodes) as
# shards 0 and 1 on GPUs 0 and 1. Without submitit (no .whl), two plain processes with CUDA_VISIBLE_DEVICES=0 / 1
# stand in for the sweep (the log says which ran). $OUT: log.txt, nvidia_smi.txt (process table every 10 s:
# which process used which GPU, C = CUDA, G = graphics/EGL), x2.tar.gz (run dirs, merge output), x2.md.
# Environment: BUDGET_S (520), NUM_ENVS (16), TASKS ([2,3]), EPISODES (16 per task for one GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 CUDA_DEVICE_ORDER=PCI_BUS_ID    # CUDA indices in nvidia-smi's (and EGL's) order
OUT=${OUT:-/tmp/vla_accel_rollout_x2}
WORK=${WORK:-/tmp/vla_accel_rollout_x2_runs}
BUDGET_S=${BUDGET_S:-520}
NUM_ENVS=${NUM_ENVS:-16}
TASKS=${TASKS:-[2,3]}
EPISODES=${EPISODES:-16}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/log.txt"
T0=$(date +%s)
say() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }

STAGES="" OUT="$OUT" BUDGET_S=200 bash scripts/gpu_rollout.sh || { say "install failed"; exit 1; }
# shellcheck disable=SC1091
source .bundle/installed/env.sh
ngpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
say "GPUs: $ngpu"
[ "$ngpu" -ge 2 ] || { say "FATAL: this script needs 2 GPUs"; exit 1; }

(while sleep 10; do date -u +%T; nvidia-smi; done) > "$OUT/nvidia_smi.txt" 2>&1 &
SMI=$!
trap 'kill $SMI 2>/dev/null' EXIT

COMMON=(policy=random_7b runtime=accel runtime.max_graphs=4096 prune=specprune eval=full env.image_size=256
        "runtime.bucket_steps=[[1024,16],[2048,32],[4096,64],[8192,128],[16384,256]]"
        eval.progress=false "eval.num_envs=$NUM_ENVS" "eval.suites=[libero_spatial]" "eval.task_ids=$TASKS")
half=$(( ($(left) - 40) / 2 ))

say "one1: $EPISODES episodes per task on GPU 0 (limit $half s)"
CUDA_VISIBLE_DEVICES=0 timeout -s INT -k 30 "$half" python3 -m vla_accel.eval.cli "${COMMON[@]}" \
  "eval.num_episodes=$EPISODES" "hydra.run.dir=$WORK/one1" > "$WORK/one1.log" 2>&1
say "one1: exit $?"

limit=$(( $(left) - 40 ))
episodes2=$(( 2 * EPISODES ))
if python3 -c "import hydra_plugins.hydra_submitit_launcher, submitit" 2>/dev/null; then
  say "two: submitit_local sweep, shards 0,1 on GPUs 0,1, $episodes2 episodes per task (limit $limit s)"
  CUDA_VISIBLE_DEVICES=0,1 timeout -s INT -k 30 "$limit" python3 -m vla_accel.eval.cli --multirun \
    hydra/launcher=local_gpus hydra.launcher.gpus_per_node=2 "${COMMON[@]}" "eval.num_episodes=$episodes2" \
    eval.num_shards=2 eval.shard=0,1 "hydra.sweep.dir=$WORK/two" > "$WORK/two.log" 2>&1
  say "two: exit $?"
else
  say "two: submitit is not installed (.whl); two processes with CUDA_VISIBLE_DEVICES=0 / 1 instead of the sweep"
  pids=()
  for k in 0 1; do
    CUDA_VISIBLE_DEVICES=$k MUJOCO_EGL_DEVICE_ID=$k timeout -s INT -k 30 "$limit" python3 -m vla_accel.eval.cli \
      "${COMMON[@]}" "eval.num_episodes=$episodes2" eval.num_shards=2 "eval.shard=$k" "hydra.run.dir=$WORK/two/$k" \
      > "$WORK/two_$k.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; say "two: a shard exited with $?"; done
fi
kill $SMI 2>/dev/null

python3 -m vla_accel.eval.merge "$WORK/two" --out "$WORK/two_merged" > "$WORK/merge.txt" 2>&1
say "merge: exit $? (0: every episode exactly once)"
tail -25 "$WORK/merge.txt" | tee -a "$LOG"

python3 - "$WORK" "$OUT/nvidia_smi.txt" "${VLA_COMMIT:-?}" > "$OUT/x2.md" <<'EOF'
import json, re, sys
from pathlib import Path
work, smi, commit = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
print(f"# Two GPUs vs one (scripts/gpu_rollout_x2.sh), commit {commit}\n")
print("| run | GPU (CUDA_VISIBLE_DEVICES, sampled) | device | episodes | missing | wall s | episodes/hour (run) | "
      "steady-state episodes/hour | GPU util mean % |\n|---|---|---|---|---|---|---|---|---|")
rates = {}
for res in sorted(work.rglob("results.json")):
    if "two_merged" in res.parts:
        continue
    s = json.loads(res.read_text())
    t = s.get("timing") or {}
    recs = [json.loads(l) for l in (res.parent / "results.jsonl").read_text().splitlines() if l.strip()]
    walls = [r["wall_s"] for r in recs if not r.get("error")]
    envs = (s.get("throughput") or {}).get("num_envs") or 1
    steady = envs * 3600 / (sum(walls) / len(walls)) if walls else 0
    name = str(res.parent.relative_to(work))
    rates.setdefault(name.split("/")[0], []).append(steady)
    gpu = t.get("gpu") or {}
    print(f"| {name} | {gpu.get('gpu', '?')} | {s.get('device')} | {len(recs)} | {len(s.get('missing', []))} | "
          f"{t.get('wall_s', 0):.0f} | {t.get('episodes_per_hour')} | {steady:.1f} | {gpu.get('util_mean')} |")
one, two = sum(rates.get("one1", [0])), sum(rates.get("two", [0]))
print(f"\nSteady-state episodes/hour: one GPU {one:.1f}, two GPUs {two:.1f}: "
      f"{two / one if one else float('nan'):.2f}x (target >= 1.8x).\n")
# which processes the driver saw on which GPU (types: C = CUDA context, G = graphics, i.e. EGL rendering)
seen = {}
for m in re.finditer(r"\|\s+(\d+)\s+\S+\s+\S+\s+(\d+)\s+(C\+G|C|G)\s+(\S+)", smi.read_text() if smi.exists() else ""):
    seen.setdefault(m.group(1), {}).setdefault(m.group(3), set()).add(m.group(2))
if seen:
    for gpu, kinds in sorted(seen.items()):
        print(f"- GPU {gpu}: " + ", ".join(f"{len(p)} {k} process(es)" for k, p in sorted(kinds.items())))
else:
    print("- nvidia-smi listed no processes (a container hides them): see each run's sampled GPU above")
EOF
cat "$OUT/x2.md" | tee -a "$LOG"
(cd "$WORK" && tar czf "$OUT/x2.tar.gz" --exclude='*.mp4' . 2>/dev/null)
say "done"
ls -la "$OUT" | tee -a "$LOG"
