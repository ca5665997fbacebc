"""The LIBERO closed loop on a GPU machine in one table: throughput per suite, the extrapolated full protocol,
in-loop policy latency against the trace benchmark, where the time went (scripts/gpu_rollout.sh writes the runs).

    python -m benchmarks.rollout_summary RUN_OR_ROOT... --out DIR [--commit SHA] [--command "..."]

Reads every vla-accel-eval run dir (run.json + results.json + results.jsonl) at or below the given paths and
writes DIR/rollout_<gpu>_<date>.md and DIR/rollout_<gpu>_<date>.json.

Per suite, from the runs with the most simulators: steady-state episodes/hour = num_envs x 3600 / mean episode
wall time (each episode's wall time covers its reset, its steps and the policy calls it waited for; with every
simulator busy, num_envs episodes finish per mean episode time). The full protocol (500 episodes per suite,
every episode running to the suite's step limit as random weights do) is then sum(500 / episodes_per_hour) plus
one start-up. A suite that was not run is estimated from the measured seconds per environment step (each
slot's episode time / (settle + max steps)) times its own step limit, and marked "estimated".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

# Steps per episode of the OFT protocol (envs/libero.py SUITES) and the settle steps before them.
MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520}
SETTLE_STEPS = 10
PROTOCOL_EPISODES = 500   # 10 tasks x 50 init states per suite
# The trace benchmark's policy latency (benchmarks/e2e.py, 7B random bf16, B=1) on the H200 on 2026-11-30, as
# the lead measured it: unpruned (c) 16.7 ms, SpecPrune (d) 10.0 ms. --e2e FILE replaces them with a run's json.
TRACE_MS = {("none", 1): 16.7, ("specprune", 1): 10.0}


def find_runs(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        found = [p] if (p / "run.json").exists() else sorted(f.parent for f in p.rglob("run.json"))
        out.extend(d for d in found if ".submitit" not in d.parts and (d / "results.json").exists())
    return out


def load_run(d: Path) -> dict:
    from vla_accel.eval import results as R

    info = json.loads((d / "run.json").read_text())
    summary = json.loads((d / "results.json").read_text())
    latest, _ = R.effective_records(R.read_records(d / "results.jsonl"))
    cfg = info.get("config", {})
    return {"dir": d, "info": info, "summary": summary, "records": list(latest.values()),
            "prune": cfg.get("prune", {}).get("name", "none"), "runtime": cfg.get("runtime", {}).get("name"),
            "num_envs": (summary.get("throughput") or {}).get("num_envs") or cfg.get("eval", {}).get("num_envs"),
            "max_steps": cfg.get("env", {}).get("max_steps"),
            "prepare_in_workers": bool(cfg.get("eval", {}).get("prepare_in_workers"))}


def steady_state(runs: list[dict]) -> dict[str, tuple[float, int]]:
    """suite -> (mean episode wall time, episodes) over the runs' episodes without an error."""
    walls: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        for rec in r["records"]:
            if not rec.get("error"):
                walls[rec["suite"]].append(float(rec["wall_s"]))
    return {suite: (float(np.mean(w)), len(w)) for suite, w in walls.items()}


def prepare_rows(runs: list[dict]) -> list[dict]:
    """eval.prepare_in_workers on against off: steady-state episodes/hour per suite, same prune and simulators."""
    rows = []
    for on in [r for r in runs if r["prepare_in_workers"] and r["max_steps"] is None]:
        same = [r for r in runs if not r["prepare_in_workers"] and r["max_steps"] is None
                and (r["prune"], r["num_envs"]) == (on["prune"], on["num_envs"])]
        base, new = steady_state(same), steady_state([on])
        for suite in sorted(set(base) & set(new)):
            eph_off, eph_on = (on["num_envs"] * 3600.0 / base[suite][0], on["num_envs"] * 3600.0 / new[suite][0])
            rows.append({"suite": suite, "prune": on["prune"], "num_envs": on["num_envs"],
                         "episodes_off": base[suite][1], "episodes_on": new[suite][1],
                         "episodes_per_hour_off": round(eph_off, 1), "episodes_per_hour_on": round(eph_on, 1),
                         "speedup": round(eph_on / eph_off, 3)})
    return rows


def suite_rows(runs: list[dict]) -> tuple[list[dict], float | None]:
    """Per-suite steady-state throughput from the runs with the protocol's step limits; -> (rows, start-up s)."""
    full = [r for r in runs if r["max_steps"] is None and r["records"] and not r["prepare_in_workers"]]
    if not full:
        return [], None
    n_max = max(r["num_envs"] for r in full)
    best = [r for r in full if r["num_envs"] == n_max and r["prune"] == "specprune"] or \
        [r for r in full if r["num_envs"] == n_max]
    walls = steady_state(best)
    startup = [r["summary"].get("timing", {}).get("parts_s", {}).get("startup") for r in best]
    startup_s = float(np.mean([s for s in startup if s is not None])) if any(s is not None for s in startup) else None
    per_step = []          # slot seconds per environment step, over the measured suites
    rows = []
    for suite in MAX_STEPS:
        if suite not in walls:
            continue
        mean_wall, count = walls[suite]
        per_step.append(mean_wall / (SETTLE_STEPS + MAX_STEPS[suite]))
        eph = n_max * 3600.0 / mean_wall
        rows.append({"suite": suite, "how": "measured", "episodes": count, "num_envs": n_max,
                     "mean_episode_s": round(mean_wall, 2), "episodes_per_hour": round(eph, 1),
                     "protocol_min": round(60.0 * PROTOCOL_EPISODES / eph, 1)})
    if per_step:
        s = float(np.mean(per_step))
        for suite in MAX_STEPS:
            if suite not in walls:
                mean_wall = s * (SETTLE_STEPS + MAX_STEPS[suite])
                eph = n_max * 3600.0 / mean_wall
                rows.append({"suite": suite, "how": "estimated from the measured s/step", "episodes": 0,
                             "num_envs": n_max, "mean_episode_s": round(mean_wall, 2),
                             "episodes_per_hour": round(eph, 1),
                             "protocol_min": round(60.0 * PROTOCOL_EPISODES / eph, 1)})
    rows.sort(key=lambda r: list(MAX_STEPS).index(r["suite"]))
    return rows, startup_s


def latency_rows(runs: list[dict], trace_ms: dict) -> list[dict]:
    """In-loop model latency per (prune, batch size): forwards after warm-up, without graph captures."""
    groups: dict[tuple[str, int], dict] = defaultdict(lambda: {"ms": [], "model": [], "runs": set()})
    for r in runs:
        for rec in r["records"]:
            n = len(rec.get("chunk_ms") or [])
            warm = rec.get("chunk_warmup") or [False] * n
            cap = rec.get("chunk_capture_ms") or [0.0] * n
            model = rec.get("chunk_model_ms") or [None] * n
            for i in range(n):
                if warm[i] or cap[i] or model[i] is None:
                    continue
                g = groups[(r["prune"], int(rec["chunk_batch"][i] or 1))]
                g["ms"].append(float(rec["chunk_ms"][i]))
                g["model"].append(float(model[i]))
                g["runs"].add(r["dir"].name)
    rows = []
    for (prune, b), g in sorted(groups.items()):
        # a forward of batch b appears once per stream it served: count it once
        model, ms = np.asarray(g["model"]), np.asarray(g["ms"])
        ref = trace_ms.get((prune, b))
        med = float(np.median(model))
        rows.append({"prune": prune, "batch": b, "forwards": len(model) // b, "model_median_ms": round(med, 2),
                     "model_p90_ms": round(float(np.percentile(model, 90)), 2),
                     "call_median_ms": round(float(np.median(ms)), 2), "trace_ms": ref,
                     "vs_trace": round(med / ref, 3) if ref else None, "runs": sorted(g["runs"])})
    return rows


def run_rows(runs: list[dict]) -> list[dict]:
    out = []
    for r in runs:
        s, t = r["summary"], r["summary"].get("timing") or {}
        lat = s.get("latency", {})
        parts = t.get("parts_s") or {}
        wall = t.get("wall_s") or 0.0
        top = sorted(((k, v) for k, v in parts.items()), key=lambda kv: -kv[1])[:4]
        gpu = t.get("gpu") or {}
        out.append({
            "run": r["dir"].name, "prune": r["prune"], "num_envs": r["num_envs"],
            "suites": sorted({rec["suite"] for rec in r["records"]}), "episodes": len(r["records"]),
            "missing": len(s.get("missing", [])), "errors": len(s.get("errors", [])),
            "exit_status": s.get("exit_status"), "wall_s": wall, "episodes_per_hour": t.get("episodes_per_hour"),
            "env_steps_per_s": t.get("env_steps_per_s"), "chunks_per_s": t.get("chunks_per_s"),
            "latency_median_ms": lat.get("median_ms"), "model_median_ms": lat.get("model_median_ms"),
            "warmup_excluded": lat.get("warmup_chunks_excluded"),
            "capture_excluded": lat.get("capture_chunks_excluded"),
            "batch_sizes": t.get("batch_sizes"), "gpu_util_mean": gpu.get("util_mean"),
            "precapture": t.get("precapture"),
            "top_parts": [f"{k} {v:.0f} s ({100 * v / wall:.0f}%)" for k, v in top] if wall else [],
            "covered_fraction": t.get("covered_fraction"), "device": s.get("device"),
        })
    return out


def markdown(doc: dict) -> str:
    lines = [f"# LIBERO closed loop on the GPU: {doc['device']}", "",
             f"device: {doc['device']} | date: {doc['date']} | commit: {doc['commit'] or '?'}", "",
             f"command: `{doc['command']}`" if doc["command"] else "", "",
             f"Policy: {doc['policy']}; the suite protocol's step limits unless a run's env.max_steps says otherwise "
             "(runs with a cap count only for latency).", ""]
    if doc["suites"]:
        lines += ["## Throughput per suite and the full protocol (4 x 500 episodes)", "",
                  "| suite | how | episodes | simulators | mean episode s | episodes/hour | 500 episodes (min) |",
                  "|---|---|---|---|---|---|---|"]
        for r in doc["suites"]:
            lines.append(f"| {r['suite']} | {r['how']} | {r['episodes']} | {r['num_envs']} | {r['mean_episode_s']} | "
                         f"{r['episodes_per_hour']} | {r['protocol_min']} |")
        total = doc["protocol_total_min"]
        lines += ["", f"**Full protocol on one machine, extrapolated: {total:.1f} min** (sum of the suites + one "
                      f"start-up of {doc['startup_s'] or 0:.0f} s; target <= 30 min: "
                      f"{'met' if total <= 30 else 'not met'})." if total is not None else "", ""]
    if doc["latency"]:
        lines += ["## In-loop policy latency (model forward as the actor reports it; after warm-up, without forwards "
                  "that captured graphs)", "",
                  "| prune | batch | forwards | median ms | p90 ms | whole call median ms | trace benchmark ms | "
                  "ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in doc["latency"]:
            lines.append(f"| {r['prune']} | {r['batch']} | {r['forwards']} | {r['model_median_ms']} | "
                         f"{r['model_p90_ms']} | {r['call_median_ms']} | {r['trace_ms'] or '-'} | "
                         f"{r['vs_trace'] or '-'} |")
        lines += ["", "(whole call: act_batch including image pre-processing and post-processing.)", ""]
    if doc.get("prepare_in_workers"):
        lines += ["## eval.prepare_in_workers (image pre-processing in the simulator workers) against off", "",
                  "| suite | prune | simulators | episodes off / on | episodes/hour off | on | speedup |",
                  "|---|---|---|---|---|---|---|"]
        for r in doc["prepare_in_workers"]:
            lines.append(f"| {r['suite']} | {r['prune']} | {r['num_envs']} | {r['episodes_off']} / "
                         f"{r['episodes_on']} | {r['episodes_per_hour_off']} | {r['episodes_per_hour_on']} | "
                         f"{r['speedup']} |")
        lines.append("")
    lines += ["## Runs", "", "| run | prune | envs | suites | episodes | missing | errors | exit | wall s | "
              "episodes/hour | env steps/s | GPU util % | latency excluded (warm-up / capture) | batch sizes | "
              "largest parts |", "|" + "---|" * 15]
    for r in doc["runs"]:
        lines.append(f"| {r['run']} | {r['prune']} | {r['num_envs']} | {', '.join(r['suites'])} | {r['episodes']} | "
                     f"{r['missing']} | {r['errors']} | {r['exit_status']} | {r['wall_s']:.0f} | "
                     f"{r['episodes_per_hour']} | {r['env_steps_per_s']} | {r['gpu_util_mean']} | "
                     f"{r['warmup_excluded']} / {r['capture_excluded']} | {r['batch_sizes']} | "
                     f"{'; '.join(r['top_parts'])} |")
    lost = sum(r["missing"] for r in doc["runs"])
    lines += ["", f"Episodes missing across the runs: {lost} (a run stopped by its stage's time limit names its "
                  "missing episodes in results.json; duplicates are impossible within a run dir).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="run dirs or folders holding them")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--commit", default="")
    p.add_argument("--command", default="")
    p.add_argument("--e2e", type=Path, default=None, help="benchmarks/e2e.py json: its (c) and (d) B=1 figures")
    args = p.parse_args(argv)
    runs = [load_run(d) for d in find_runs(args.paths)]
    if not runs:
        print(f"rollout_summary: no finished run (run.json + results.json) under {args.paths}", file=sys.stderr)
        return 1
    trace = dict(TRACE_MS)
    if args.e2e:
        cfgs = json.loads(args.e2e.read_text())["configs"]
        for key, prune in (("c", "none"), ("d", "specprune")):
            if key in cfgs:
                trace[(prune, 1)] = round(cfgs[key]["latency_ms"]["median"], 2)
        if "e" in cfgs:
            trace[("specprune", int(cfgs["e"].get("batch", 8)))] = round(cfgs["e"]["latency_ms"]["median"], 2)
    suites, startup_s = suite_rows(runs)
    total = (sum(r["protocol_min"] for r in suites) + (startup_s or 0) / 60.0) if len(suites) == len(MAX_STEPS) \
        else None
    device = next((r["summary"].get("device") for r in runs if r["summary"].get("device")), "unknown device")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    pol = next((r["summary"].get("policy") for r in runs if r["summary"].get("policy")), {}) or {}
    weights = "RANDOM weights: episodes run to the step limit" if pol.get("random_weights") else "trained weights"
    policy = f"{pol.get('source')} ({weights}, {pol.get('dtype')}, executor {pol.get('executor')})"
    doc = {"device": device, "date": date, "commit": args.commit, "command": args.command, "suites": suites,
           "policy": policy,
           "startup_s": startup_s, "protocol_total_min": round(total, 1) if total is not None else None,
           "latency": latency_rows(runs, trace), "prepare_in_workers": prepare_rows(runs), "runs": run_rows(runs)}
    gpu = re.sub(r"[^a-z0-9]+", "-", " ".join(device.lower().split()[:2])).strip("-") or "gpu"   # nvidia-h200
    args.out.mkdir(parents=True, exist_ok=True)
    md = args.out / f"rollout_{gpu}_{date}.md"
    md.write_text(markdown(doc))
    (args.out / f"rollout_{gpu}_{date}.json").write_text(json.dumps(doc, indent=2, default=str))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
