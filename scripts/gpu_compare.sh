#!/usr/bin/env bash
# Old vs new, end to end, in ONE device call: the e2e benchmark of an older tree and of this checkout on the same
# trace, interleaved (old, new, old, new: drift between the runs shows), then the GPU tests of this checkout.
#
#   OLD=.devcarry/old OUT=$OUT bash scripts/gpu_compare.sh
#
# OLD    a `git archive` of the older commit, extracted (default .devcarry/old). Its benchmark is run as it was:
#        `python -m vla_accel.bench e2e` (before benchmarks/ left the package) or `python -m benchmarks.e2e`.
# TRACE  the LIBERO trace (default .devcarry/libero_spatial_t0.npz), recorded on a CPU machine with
#        `python -m benchmarks.record_trace --out .devcarry/libero_spatial_t0.npz` (older trees:
#        `python -m vla_accel.runtime.record`, same arguments and file).
# Configurations (c), (d), (e) (+ (d'), (e'), the executor alone), the equivalence checks in round 1; rounds after
# the first skip the fp32 anchors and the (d)/(e) checks (timing only). Writes into $OUT: {old,new}_<round>/
# (e2e.json, e2e.md, log), compare.json, compare.md, gpu_tests.log; prints the comparison (new vs old, %).
# Knobs: ROUNDS (2), SKIP_TESTS=1, BENCH_TIMEOUT (s per benchmark run, 300), TEST_TIMEOUT (s, 300),
#        E2E_ARGS (extra arguments for every benchmark run), OLD_LABEL / NEW_LABEL (commits, for the record).
# Needs: a CUDA GPU, torch + triton + transformers + pyyaml (as scripts/gpu_e2e.sh), pytest for the tests.
set -uo pipefail
cd "$(dirname "$0")/.."
NEW=$(pwd)
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/vla_accel_compare}
OLD=$(cd "${OLD:-.devcarry/old}" && pwd) || { echo "no old tree at ${OLD:-.devcarry/old}"; exit 2; }
TRACE=$(cd "$(dirname "${TRACE:-.devcarry/libero_spatial_t0.npz}")" && pwd)/$(basename "${TRACE:-.devcarry/libero_spatial_t0.npz}")
[ -f "$TRACE" ] || { echo "no trace at $TRACE"; exit 2; }
ROUNDS=${ROUNDS:-2}
mkdir -p "$OUT"
status=0
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"

# Each tree must import as itself: vla_accel from the tree, its kernels / envs / configs too (the package maps those
# folders in pyproject; an installed copy of the other tree must not stand in). Without an install, link them.
importable() {
  (cd "$1" && python3 - "$1" <<'PY'
import os, sys
root = os.path.realpath(sys.argv[1])
import vla_accel, vla_accel.configs, vla_accel.envs, vla_accel.kernels  # noqa: E401
bad = [m.__name__ for m in (vla_accel, vla_accel.kernels, vla_accel.envs, vla_accel.configs)
       if not os.path.realpath(m.__file__).startswith(root)]
sys.exit(f"imported from elsewhere: {bad}" if bad else 0)
PY
  ) >/dev/null 2>&1
}
for tree in "$OLD" "$NEW"; do
  if ! importable "$tree"; then
    for d in kernels envs configs; do ln -sfn "../$d" "$tree/vla_accel/$d"; done
    importable "$tree" || { echo "cannot import vla_accel from $tree"; exit 2; }
  fi
done

bench() {  # tree name round
  local tree=$1 name=$2 round=$3 module=(-m vla_accel.bench e2e) extra=()
  [ -f "$tree/benchmarks/e2e.py" ] && module=(-m benchmarks.e2e)
  [ "$round" -gt 1 ] && extra=(--anchor-steps 0 --check-every 0)
  local label=${NEW_LABEL:-new}; [ "$tree" = "$OLD" ] && label=${OLD_LABEL:-old}
  mkdir -p "$OUT/${name}_$round"
  stamp "$name round $round: python3 ${module[*]} (in $tree)"
  (cd "$tree" && timeout "${BENCH_TIMEOUT:-300}" python3 "${module[@]}" --trace "$TRACE" --configs c,d,e \
     --out "$OUT/${name}_$round" --commit "$label" "${extra[@]}" ${E2E_ARGS:-}) > "$OUT/${name}_$round/log" 2>&1 \
    || { status=1; echo "  FAILED (rc $?): tail of $OUT/${name}_$round/log"; tail -n 15 "$OUT/${name}_$round/log"; }
  grep -E "^\[(c|d|e)'?\] median" "$OUT/${name}_$round/log" | sed 's/^/  /'
}
for r in $(seq 1 "$ROUNDS"); do
  bench "$OLD" old "$r"
  bench "$NEW" new "$r"
done
stamp "benchmarks done"

python3 - "$OUT" "$ROUNDS" <<'PY' || status=1
import json, sys
from pathlib import Path

out, rounds = Path(sys.argv[1]), int(sys.argv[2])
FIGS = [("c", "latency_ms", "ms"), ("d", "latency_ms", "ms"), ("e", "latency_ms", "ms"), ("e", "chunks_per_s", "1/s"),
        ("d'", "latency_ms", "ms"), ("e'", "latency_ms", "ms")]
COMPARED = {("c", "latency_ms"), ("d", "latency_ms"), ("e", "chunks_per_s")}  # within 3 %: the acceptance figures


def load(name, r):
    p = out / f"{name}_{r}" / "e2e.json"
    return json.loads(p.read_text()) if p.is_file() else None


def fig(res, key, what):
    c = (res or {}).get("configs", {}).get(key)
    if c is None:
        return None
    return c["latency_ms"]["median"] if what == "latency_ms" else c.get(what)


runs = {(n, r): load(n, r) for n in ("old", "new") for r in range(1, rounds + 1)}
rows, verdict = [], {}
for key, what, unit in FIGS:
    vals = {n: [fig(runs[n, r], key, what) for r in range(1, rounds + 1)] for n in ("old", "new")}
    means = {n: (sum(v) / len(v) if v and None not in v else None) for n, v in vals.items()}
    diff = None if None in means.values() else 100 * (means["new"] / means["old"] - 1)
    # latency: lower is better; chunks/s: higher is better. "slower" = new worse than old, in %
    slower = None if diff is None else (diff if what == "latency_ms" else -diff)
    rows.append({"config": key, "figure": what, "unit": unit, "old": vals["old"], "new": vals["new"],
                 "old_mean": means["old"], "new_mean": means["new"], "diff_pct": diff, "new_slower_pct": slower})
    if (key, what) in COMPARED:
        verdict[f"{key} {what}"] = slower is not None and slower <= 3.0
checks = {}
for n in ("old", "new"):
    ck = (runs[n, 1] or {}).get("checks", {})
    checks[n] = {k: ck[k]["pass"] for k in ("c", "d", "e") if isinstance(ck.get(k), dict)}
    checks[n]["fp32_anchor"] = all(a["pass"] for a in ck.get("fp32_anchor", [])) if ck.get("fp32_anchor") else None
    checks[n]["errors"] = sorted(set().union(*[(runs[n, r] or {}).get("errors", {}) for r in range(1, rounds + 1)]))
res = {"rounds": rounds, "figures": rows, "within_3pct": verdict, "checks": checks,
       "env": {n: (runs[n, 1] or {}).get("env", {}).get("commit") for n in ("old", "new")}}
(out / "compare.json").write_text(json.dumps(res, indent=1) + "\n")


def f(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


lines = ["# Old vs new, end to end (same trace, same device call)", "",
         f"old: {res['env']['old']} | new: {res['env']['new']} | rounds: {rounds} (old, new interleaved)", "",
         "| config | figure | old (per round) | new (per round) | old mean | new mean | new vs old |",
         "|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['config']} | {r['figure']} ({r['unit']}) | {', '.join(f(x) for x in r['old'])} | "
                 f"{', '.join(f(x) for x in r['new'])} | {f(r['old_mean'])} | {f(r['new_mean'])} | "
                 f"{f(r['diff_pct'], 1)} % |")
lines += ["", "Within 3 % (new no slower than old by more than 3 %): "
          + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in verdict.items()),
          "", "Equivalence checks (round 1; rel-L2 vs the reference under the same decisions, fp32 anchors):"]
for n in ("old", "new"):
    lines.append(f"- {n}: {json.dumps(checks[n])}")
text = "\n".join(lines)
(out / "compare.md").write_text(text + "\n")
print(text)
ok = all(verdict.values()) and all(v for k, v in checks["new"].items() if k not in ("errors",)) and \
    not checks["new"]["errors"]
sys.exit(0 if ok else 1)
PY

if [ -z "${SKIP_TESTS:-}" ]; then
  stamp "GPU tests of the new tree (-m gpu)"
  t0=$(date +%s)
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu tests -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1 \
    || status=1
  tail -n 8 "$OUT/gpu_tests.log"
  stamp "GPU tests took $(( $(date +%s) - t0 )) s"
fi
stamp "done (status $status)"
exit $status
