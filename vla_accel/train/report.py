"""Success tables of closed-loop runs of a trained policy: per task, average with Wilson 95% intervals,
tokens kept, and pruned minus unpruned with a 95% interval.

    python -m vla_accel.train.report RUN_DIR... --out benchmarks/results/trained_policy_DATE.md [--title T]

Each RUN_DIR is a `vla-accel-eval` run dir (results.jsonl + run.json); its label is
"<prune>/<runtime>" from run.json, and run dirs of the same label are merged (rounds of
episodes). Differences pair each pruned run with the unpruned run of the same runtime over the
episodes both finished, with Newcombe's hybrid score interval (method 10) for a difference of two
proportions (treats the runs as independent samples; the episodes are the same init states, so it
is conservative).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (n > 0)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = k / n
    den = 1 + z * z / n
    center = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, center - half), min(1.0, center + half))


def newcombe(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float, float]:
    """p1 - p2 and its 95% interval (Newcombe 1998, method 10: from the two Wilson intervals)."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def load_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    cfg = info.get("config", {})
    latest = {}
    for line in (run_dir / "results.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if not r.get("error"):
                latest[(r["suite"], r["task_id"], r["episode"])] = r
    label = f"{cfg.get('prune', {}).get('name', '?')}/{cfg.get('runtime', {}).get('name', '?')}"
    return {"label": label, "prune": cfg.get("prune", {}).get("name"), "runtime": cfg.get("runtime", {}).get("name"),
            "records": latest, "dir": str(run_dir)}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def run_stats(records: dict) -> dict:
    tokens = [t for r in records.values() for t in (r.get("tokens_kept") or [])]
    flops = [f for r in records.values() for f in ((r.get("chunk_extra") or {}).get("flops_ratio") or [])]
    return {"tokens_kept": _mean(tokens), "flops_ratio": _mean(flops)}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _interval(lo: float, hi: float) -> str:
    return f"[{_pct(lo)}, {_pct(hi)}]"


def _diff_row(run: dict, ref: dict) -> str | None:
    common = sorted(set(run["records"]) & set(ref["records"]))
    if not common:
        return None
    n = len(common)
    k1 = sum(run["records"][e]["success"] for e in common)
    k0 = sum(ref["records"][e]["success"] for e in common)
    d, lo, hi = newcombe(k1, n, k0, n)
    return (f"| {run['label']} - {ref['label']} | {n} | {_pct(k1 / n)} - {_pct(k0 / n)} = {100 * d:+.1f} | "
            f"{_interval(lo, hi)} |")


def format_report(runs: list[dict], title: str, notes: list[str] | None = None) -> str:
    tasks = sorted({(s, t) for run in runs for (s, t, _) in run["records"]})
    lines = [f"# {title}", ""] + [f"{n}" for n in (notes or [])] + ([""] if notes else [])
    lines += ["## Success per task (successes / episodes)", "",
              "| setting | " + " | ".join(f"{s.removeprefix('libero_')} t{t}" for s, t in tasks) +
              " | average (95% Wilson) | tokens kept / chunk | backbone FLOPs |",
              "|---|" + "---|" * len(tasks) + "---|---|---|"]
    for run in runs:
        cells = []
        for s, t in tasks:
            rs = [r for (s2, t2, _), r in run["records"].items() if (s2, t2) == (s, t)]
            cells.append(f"{sum(r['success'] for r in rs)}/{len(rs)}" if rs else "-")
        k = sum(r["success"] for r in run["records"].values())
        n = len(run["records"])
        st = run_stats(run["records"])
        avg = f"{_pct(k / n)}% {_interval(*wilson(k, n))}" if n else "-"
        tok = f"{st['tokens_kept']:.1f}" if st["tokens_kept"] is not None else "-"
        fl = f"{_pct(st['flops_ratio'])}%" if st["flops_ratio"] is not None else "-"
        lines.append(f"| {run['label']} | " + " | ".join(cells) + f" | {avg} | {tok} | {fl} |")
    # pruned - unpruned (same runtime), then accel - reference (same prune setting)
    unpruned = {r["runtime"]: r for r in runs if r["prune"] == "none"}
    reference = {r["prune"]: r for r in runs if r["runtime"] == "reference"}
    pairs = [(r, unpruned.get(r["runtime"])) for r in runs if r["prune"] != "none"]
    pairs += [(r, reference.get(r["prune"])) for r in runs if r["runtime"] != "reference"]
    diffs = [row for run, ref in pairs if ref is not None for row in [_diff_row(run, ref)] if row]
    if diffs:
        lines += ["", "## Differences in success (points, same episodes; 95% Newcombe interval)", "",
                  "| comparison | episodes | success difference | 95% interval |", "|---|---|---|---|"] + diffs
    lines += ["", "Run dirs: " + ", ".join(f"`{r['dir']}`" for r in runs)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vla_accel.train.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="vla-accel-eval run dirs")
    ap.add_argument("--out", default=None, help="write the markdown here (default: print only)")
    ap.add_argument("--title", default="Trained policy in closed loop")
    ap.add_argument("--note", action="append", default=[], help="a line under the title (repeatable)")
    args = ap.parse_args(argv)
    merged: dict[str, dict] = {}
    for d in args.runs:
        if not (Path(d) / "results.jsonl").exists():
            print(f"skipping {d}: no results.jsonl")
            continue
        run = load_run(d)
        if not run["records"]:
            print(f"skipping {d}: no finished episodes")
            continue
        if run["label"] in merged:
            merged[run["label"]]["records"].update(run["records"])
            merged[run["label"]]["dir"] += f", {run['dir']}"
        else:
            merged[run["label"]] = run
    runs = list(merged.values())
    if not runs:
        raise SystemExit("no run dir with finished episodes")
    text = format_report(runs, args.title, args.note)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
