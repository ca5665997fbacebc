"""A dispatch table (and the tuner's Hopper candidate kinds) from a run of benchmarks/gemm_hopper.py.

    python -m benchmarks.hopper_table .devcarry/gemm_hopper.json benchmarks/results/gemm_hopper_<gpu>_<date> --trim
    python -m benchmarks.hopper_table benchmarks/results/gemm_hopper_nvidia-h200_2026-11-30.json \
        --out kernels/tables/nvidia-h200.json
    python -m benchmarks.hopper_table benchmarks/results/gemm_hopper_nvidia-h200_2026-11-30.json --kinds

--trim: the run's JSON without per-candidate errors vs fp32 (their maximum per point is kept) -> <stem>.json, and
its summary table -> <stem>.md.
Table: every rule comes from a measured point, decided as the tuner decides (kernels.tune.pick): the benchmark's
best config where its time beats the faster of the two cuBLAS timings (the runtime's way of doing the op) by more
than max(margin, their repeat spread), else cuBLAS. A rule serves M from the previous measured point (exclusive)
up to its own; below the smallest measured M of a shape an explicit cuBLAS rule, above the largest the table's
cuBLAS default. Keys as the runtime dispatches them: qkv linear, o / down linear_residual, gate_up gate_up_silu,
the towers' linears (with bias) linear. No attention rules (the benchmark has none): the default tiles.
--kinds: the (tile, schedule) kinds that won or came within --close of the best config or of cuBLAS at some point:
what kernels/registry.py HOPPER_TUNE_KINDS lists for the tuner.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OPS = {"none": "linear", "bias": "linear", "residual": "linear_residual", "gated": "gate_up_silu"}
CLOSE = 0.05


def trim(result: dict) -> dict:
    """The run without the per-candidate errors vs fp32 (a point keeps their maximum: max_rel_err)."""
    out = {k: v for k, v in result.items() if k != "points"}
    out["points"] = []
    for p in result["points"]:
        errs = [e["rel_err"] for e in p["candidates"].values() if "rel_err" in e]
        q = {k: v for k, v in p.items() if k != "candidates"}
        q["max_rel_err"] = max(errs) if errs else None
        q["candidates"] = {name: ({"us": round(e["us"], 2)} if "us" in e else {"error": e.get("error", "?")})
                           for name, e in p["candidates"].items()}
        out["points"].append(q)
    return out


def timed(point: dict) -> dict[str, float]:
    return {name: e["us"] for name, e in point["candidates"].items() if "us" in e}


def cublas_spread(point: dict) -> tuple[float, float]:
    """(the faster of the two cuBLAS timings, their relative difference)."""
    a, b = point["cublas_us"], point["cublas_repeat_us"]
    return min(a, b), abs(a - b) / min(a, b)


def close_kinds(result: dict, close: float = CLOSE) -> set[tuple]:
    """Kinds (registry.hopper_kind) of the configs within `close` of the best config or of cuBLAS at some point."""
    from vla_accel.kernels.flat_gemm_hopper import HopperGemmConfig
    from vla_accel.kernels.registry import hopper_kind

    kinds = set()
    for p in result["points"]:
        t = timed(p)
        if not t:
            continue
        bar = (1 + close) * max(min(t.values()), cublas_spread(p)[0])  # within `close` of the best or of cuBLAS
        kinds |= {hopper_kind(HopperGemmConfig.parse(n)) for n, us in t.items() if us <= bar}
    return kinds


def table_from_result(result: dict, source: str, margin: float = 0.01):
    """The DispatchTable of the run's measured points (see the module docstring)."""
    from vla_accel.kernels.table import DispatchTable, shape_key
    from vla_accel.kernels.tune import build_rules

    points: dict[str, list] = {}
    profile: dict[str, list] = {}
    for p in result["points"]:
        key = shape_key(OPS[p["epilogue"]], (p["n"], p["k"]))
        cub, spread = cublas_spread(p)
        times = {"cublas": cub}
        t = timed(p)
        if t:
            best = min(t, key=t.get)
            times[best] = t[best]
        points.setdefault(key, []).append((p["m"], times, spread))
        profile.setdefault(key, []).append({"m": p["m"], "times_us": {**t, "cublas": cub},
                                            "cublas_us": [p["cublas_us"], p["cublas_repeat_us"]], "spread": spread})
    rules = {}
    for key, pts in points.items():
        r = build_rules(pts, margin=margin)
        first = min(m for m, *_ in pts)
        if r[0][1] != "cublas" and first > 1:
            r.insert(0, (first - 1, "cublas"))  # nothing was measured below the first point
        rules[key] = r
    for rows in profile.values():
        rows.sort(key=lambda r: r["m"])
    meta = {"source": source, "derived_by": "python -m benchmarks.hopper_table", "benchmark_date": result["date"],
            "device": result["device"], "torch": result["torch"], "triton": result["triton"],
            "ceilings": result["ceilings"], "margin": margin,
            "rule": "ours where its time < cuBLAS's faster time x (1 - max(margin, cuBLAS repeat spread)); every rule "
                    "serves M from the previous measured point (exclusive) to its own",
            "timing": result["timing"],
            "caveat": "the benchmark times the kernels with their tile counters in place (warm-up on the capture "
                      "stream); the runtime's graphs capture on another stream, which adds a counter memset to "
                      "each launch of ours; vla-accel-tune times it that way and replaces this table",
            "profile": profile}
    return DispatchTable(gpu=result["device"], dtype=result["dtype"], rules=rules, meta=meta)


def markdown(result: dict) -> str:
    c = result["ceilings"]
    lines = [f"# Hopper flat GEMM vs cuBLAS: {result['device']}, {result['date']}", "",
             f"torch {result['torch']}, triton {result['triton']}, commit {result.get('commit') or '?'}; "
             f"`{result.get('command', 'python benchmarks/gemm_hopper.py')}`. Ceilings measured in the run: copy "
             f"{c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), bf16 matmul "
             f"{c['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s. Floor = max(bytes / copy rate, FLOPs / matmul rate), "
             f"bytes = weight + x (+ residual) + out. Times in us: {result['timing']}.", "",
             "cuBLAS: the runtime's way (in-place addmm_ for the residual ops, F.linear + the Triton SiLU*up for "
             "gate|up, F.linear with bias for the towers), timed twice (spread); plain: F.linear alone.", "",
             "| op | M | floor | cuBLAS | spread | plain | ours (best) | cuBLAS / ours | ours / floor | best config |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        t = timed(p)
        best = min(t, key=t.get) if t else None
        ours = t[best] if best else float("nan")
        _, spread = cublas_spread(p)
        lines.append(f"| {p['op']} | {p['m']} | {p['floor_us']:.1f} | {p['cublas_us']:.1f} | {spread:.1%} | "
                     f"{p['cublas_plain_us']:.1f} | {ours:.1f} | {p['cublas_us'] / ours:.2f} | "
                     f"{ours / p['floor_us']:.2f} | `{best.partition(':')[2] if best else '-'}` |")
    s = result["summary"]
    lines += ["", f"Sum of the backbone GEMMs ({' + '.join(s['backbone_ops'])}), us; dispatched = ours where faster "
                  "by > 1 %, else cuBLAS:", "",
              "| M | floor | cuBLAS | ours | dispatched | speed-up | dispatched / floor | cuBLAS / floor |",
              "|---|---|---|---|---|---|---|---|"]
    for m, r in sorted(s["per_m"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {m} | {r['floor_us']:.1f} | {r['cublas_us']:.1f} | {r['ours_us']:.1f} | "
                     f"{r['dispatch_us']:.1f} | {r['speedup']:.2f} | {r['dispatch_over_floor']:.2f} | "
                     f"{r['cublas_over_floor']:.2f} |")
    failed = sorted({n.partition(":")[2] + ": " + e["error"] for p in result["points"]
                     for n, e in p["candidates"].items() if "error" in e})
    lines += ["", "Targets (issue 15):", ""]
    lines += [f"- {'MET' if t['met'] else 'MISSED'}: {t['target']}: {t['value']:.3g}" for t in s["targets"]]
    lines += ["", f"Candidates that did not run ({len(failed)} configs):", ""] + [f"- {f}" for f in failed]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hopper_table", description=__doc__.split("\n")[0])
    ap.add_argument("result", type=Path, help="gemm_hopper JSON (raw or trimmed)")
    ap.add_argument("stem", nargs="?", type=Path, help="with --trim: output path without suffix")
    ap.add_argument("--trim", action="store_true", help="write the trimmed JSON and its .md to STEM")
    ap.add_argument("--commit", help="with --trim: the commit the run measured (when the JSON does not say)")
    ap.add_argument("--kinds", action="store_true", help="print the candidate kinds that won or came close")
    ap.add_argument("--close", type=float, default=CLOSE, help="'came close': within this fraction")
    ap.add_argument("--margin", type=float, default=0.01, help="as vla-accel-tune --margin")
    ap.add_argument("--out", type=Path, help="write the dispatch table here")
    args = ap.parse_args(argv)
    result = json.loads(args.result.read_text())
    if args.trim:
        if args.stem is None:
            ap.error("--trim needs STEM (output path without suffix)")
        small = trim(result)
        if args.commit and not small.get("commit"):
            small["commit"] = args.commit
        args.stem.with_suffix(".json").write_text(json.dumps(small, indent=1) + "\n")
        args.stem.with_suffix(".md").write_text(markdown(small))
        print(f"wrote {args.stem}.json / .md")
    if args.kinds:
        for kind in sorted(close_kinds(result, args.close)):
            print(kind)
    if args.out:
        table = table_from_result(result, source=str(args.result), margin=args.margin)
        table.save(args.out)
        print(f"wrote {args.out}")
        for key, rules in sorted(table.rules.items()):
            print(f"  {key}: {rules}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
