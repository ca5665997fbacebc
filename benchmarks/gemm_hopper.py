"""Hopper flat-GEMM benchmark (issue 15): measured ceilings and floors, correctness, cuBLAS vs flat_gemm_hopper.

    python -m benchmarks.gemm_hopper --out "$OUT"                # GPU (H100 / H200): ~3 min; the table is printed last
    python -m benchmarks.gemm_hopper --dry-run --out /tmp/gh     # CPU: the whole pipeline, tiny shapes, interpreter

Run from a checkout root with `vla_accel` importable (an editable install, or the checkout's package map: see
benchmarks/hopper_gemm_notes.md).

In order:
1. Ceilings, measured in this run (benchmarks/roofline.py `measure_ceilings`, shared with the other benchmarks):
   device-to-device copy bandwidth (bytes read + bytes written, 1 GiB buffers) and the bf16 8192^3 matmul rate on
   random data, medians of 10 after 3 warm-ups. Every floor comes from them: floor = max(bytes / bandwidth,
   flops / rate); bytes = weight + activations in (x, and the residual where there is one) + output, each once;
   flops = 2 M N K (N: weight rows, both halves when gated).
2. Every distinct kernel variant is compiled once, in parallel processes (Triton's disk cache; the tuner's
   `precompile`, under a wall limit), before any timing.
3. Per (op, M): a fp32 reference (torch.matmul on the same bf16 inputs, bias / residual / silu in fp32); every
   candidate runs once into a NaN-poisoned output and is kept only with rel-L2 <= 1e-2 and no NaN.
4. Timing: one CUDA graph of n calls that rotate over copies of the weight (>= 3x the L2 between two uses of a
   copy, so every call reads its weight from HBM; the activations stay in L2, as in the runtime), median of 7
   replays / n. cuBLAS is timed plain (F.linear) and the way the runtime does the op today (in-place addmm_ for
   the residual ops, F.linear + the Triton silu_mul for gate|up, F.linear with bias in the towers); the latter
   twice, for the spread.
5. A compact table and the issue's targets, met or missed; $OUT/gemm_hopper.json (rewritten after every op, so a
   timeout keeps what was measured) with every candidate's time and the best config per (op, M), and its summary
   $OUT/gemm_hopper.md (benchmarks/hopper_table.py, which also derives a dispatch table from the JSON).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

REL_TOL = 1e-2  # bf16 operands: rel-L2 between 1e-3 and 1e-2 against fp32 (METHOD.md); NaN never passes
MARGIN = 0.01  # the table keeps cuBLAS unless ours is faster by more than this and the spread (kernels.tune.pick)
BACKBONE_MS = [208, 128, 256, 320, 608, 64, 448, 768]  # the targets' points first, in case the budget runs out


@dataclass(frozen=True)
class Op:
    name: str
    n: int  # weight rows as the runtime holds them (fused Q|K|V, gate|up)
    k: int
    epilogue: str  # "none" | "residual" (in place) | "gated" | "bias"
    ms: tuple[int, ...]
    backbone: bool = False

    @property
    def n_out(self) -> int:
        return self.n // 2 if self.epilogue == "gated" else self.n

    def bytes(self, m: int, itemsize: int = 2) -> int:
        acts = m * self.k + m * self.n_out * (2 if self.epilogue == "residual" else 1)
        return (self.n * self.k + acts + (self.n_out if self.epilogue == "bias" else 0)) * itemsize

    def flops(self, m: int) -> int:
        return 2 * m * self.n * self.k


# Llama-2-7B backbone (the runtime's fused weights) and the towers' linears (token counts per image pair: DINOv2-L
# with a class token and 4 registers, 2 x 261; SigLIP 2 x 256; batched: the 8 streams of config (e)).
OPS = [
    Op("qkv", 12288, 4096, "none", tuple(BACKBONE_MS), True),
    Op("o", 4096, 4096, "residual", tuple(BACKBONE_MS), True),
    Op("gate_up", 22016, 4096, "gated", tuple(BACKBONE_MS), True),
    Op("down", 4096, 11008, "residual", tuple(BACKBONE_MS), True),
    Op("dino_qkv", 3072, 1024, "bias", (522, 4176)), Op("dino_proj", 1024, 1024, "bias", (522, 4176)),
    Op("dino_fc1", 4096, 1024, "bias", (522, 4176)), Op("dino_fc2", 1024, 4096, "bias", (522, 4176)),
    Op("siglip_qkv", 3456, 1152, "bias", (512, 4096)), Op("siglip_proj", 1152, 1152, "bias", (512, 4096)),
    Op("siglip_fc1", 4304, 1152, "bias", (512, 4096)), Op("siglip_fc2", 1152, 4304, "bias", (512, 4096)),
]


def dry_run_ops() -> list[Op]:
    """The same ops at 1/32 of N and K (and a few Ms) for the CPU interpreter."""
    keep = {"qkv", "o", "gate_up", "down", "siglip_fc2"}
    return [Op(op.name, op.n // 32, op.k // 32, op.epilogue, (208, 64) if op.backbone else (83,), op.backbone)
            for op in OPS if op.name in keep]


# ---------------------------------------------------------------- timing

class Timer:
    """Median time per call (us) of fn(i), i = 0..n-1: replays of one CUDA graph captured on the warm-up stream,
    so that the kernels' per-stream tile counters exist before the capture (GPU); wall clock (CPU)."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def us(self, fn, n_calls: int, reps: int = 7) -> float:
        if self.cuda:
            from vla_accel.kernels.timing import time_graph_us

            return time_graph_us(fn, n_calls, reps=reps, capture_stream=self.stream)
        fn(0)
        t0 = time.perf_counter()
        for i in range(n_calls):
            fn(i)
        return (time.perf_counter() - t0) / n_calls * 1e6


# ---------------------------------------------------------------- compilation (parallel processes)

COMPILE_M = 768  # the compile run's M: enough tiles that persistent programs loop (a hang shows up here, not later)
DISPATCH_OPS = {"none": ("linear", False), "bias": ("linear", True), "residual": ("linear_residual", False),
                "gated": ("gate_up_silu", False)}  # epilogue -> (dispatch op, bias)


def compile_job(op: Op, cfg):
    """The tuner's compile job for (op, config): the real N and K at M = COMPILE_M; and its compile signature
    (the schedule fields are run-time scalars: one job per tile, load path and epilogue)."""
    from vla_accel.kernels.tune import CompileJob, compile_signature

    kind, bias = DISPATCH_OPS[op.epilogue]
    base = type(cfg)(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, tma=cfg.tma,
                     warp_spec=cfg.warp_spec)
    job = CompileJob(kind, op.n, op.k, COMPILE_M, base.name, "bfloat16", bias)
    return job, compile_signature(kind, op.k, COMPILE_M, base.name, bias)


# ---------------------------------------------------------------- one op

def make_inputs(torch, op: Op, m: int, device, copies: int, dtype=None, seed: int = 0):
    """x [m, k]; `copies` weights [n, k] (scaled so outputs are O(1)); bias [n_out] or None; residual [m, n_out] or
    None. Fresh random draws per call (METHOD.md: never zeros)."""
    dtype = dtype or torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(seed + m)
    kw = dict(device=device, dtype=dtype, generator=gen)
    x = torch.randn(m, op.k, **kw)
    w = [torch.randn(op.n, op.k, **kw) / math.sqrt(op.k) for _ in range(copies)]
    bias = torch.randn(op.n_out, **kw) if op.epilogue == "bias" else None
    res = torch.randn(m, op.n_out, **kw) if op.epilogue == "residual" else None
    return x, w, bias, res


def reference(torch, op: Op, x, w, bias, res):
    F = torch.nn.functional
    y = x.float() @ w.float().t()
    if op.epilogue == "gated":
        y = F.silu(y[:, :op.n_out]) * y[:, op.n_out:]
    if bias is not None:
        y = y + bias.float()
    if res is not None:
        y = y + res.float()
    return y


def cublas_calls(torch, op: Op, x, ws, bias, res, silu_mul):
    """(plain, the runtime's way) as fn(i) over the weight copies."""
    F = torch.nn.functional
    c = len(ws)
    plain = lambda i: F.linear(x, ws[i % c])  # noqa: E731
    if op.epilogue == "residual":
        runtime = lambda i: res.addmm_(x, ws[i % c].t())  # noqa: E731 - in place, as the runner does
    elif op.epilogue == "gated":
        runtime = lambda i: silu_mul(F.linear(x, ws[i % c]))  # noqa: E731
    else:
        runtime = lambda i: F.linear(x, ws[i % c], bias)  # noqa: E731
    return plain, runtime


def run_op(ctx, op: Op, m: int, configs: list, deadline: float) -> dict:
    torch, device, timer = ctx["torch"], ctx["device"], ctx["timer"]
    from vla_accel.kernels.flat_gemm_hopper import flat_gemm_hopper
    from vla_accel.kernels.tune import pick
    wbytes = op.n * op.k * 2
    copies = 1 if ctx["dry"] else max(2, math.ceil(3 * ctx["l2_bytes"] / wbytes))
    n_calls = 1 if ctx["dry"] else max(8, 2 * copies)
    x, ws, bias, res = make_inputs(torch, op, m, device, copies, ctx["dtype"])
    gated = op.epilogue == "gated"
    ref = reference(torch, op, x, ws[0], bias, res)
    ceil = ctx["ceilings"]
    floor_us = max(op.bytes(m) / ceil["copy_bytes_per_s"], op.flops(m) / ceil["matmul_flops_per_s"]) * 1e6
    point = {"op": op.name, "n": op.n, "k": op.k, "epilogue": op.epilogue, "m": m, "bytes": op.bytes(m),
             "flops": op.flops(m), "floor_us": floor_us, "weight_copies": copies, "calls_per_graph": n_calls,
             "candidates": {}}

    plain, runtime = cublas_calls(torch, op, x, ws, bias, res.clone() if res is not None else None,
                                  ctx["silu_mul"])
    point["cublas_plain_us"] = timer.us(plain, n_calls)
    point["cublas_us"] = timer.us(runtime, n_calls)
    point["cublas_repeat_us"] = timer.us(runtime, n_calls)

    for cfg in configs:
        entry = point["candidates"].setdefault(cfg.name, {})
        if cfg.name in ctx["compile_failures"].get(op.name, {}):
            entry["error"] = "compile: " + ctx["compile_failures"][op.name][cfg.name]
            continue
        if time.time() > deadline:
            entry["error"] = "skipped: time budget"
            continue
        try:
            out = torch.full((m, op.n_out), float("nan"), device=device, dtype=x.dtype)  # poisoned
            y = flat_gemm_hopper(x, ws[0], bias=bias, residual=res, gated=gated, out=out, config=cfg)
            if device.type == "cuda":
                torch.cuda.synchronize()
            nan = bool(y.isnan().any())
            err = ((y.float() - ref).norm() / ref.norm()).item()
            entry["rel_err"] = err
            if nan or not err <= REL_TOL:
                entry["error"] = f"wrong: rel-L2 {err:.3g}" + (", NaN in the output" if nan else "")
                continue
            r = res.clone() if res is not None else None
            o = r if r is not None else torch.empty((m, op.n_out), device=device, dtype=x.dtype)
            entry["us"] = timer.us(lambda i: flat_gemm_hopper(x, ws[i % copies], bias=bias, residual=r, gated=gated,
                                                              out=o, config=cfg), n_calls)
        except Exception as e:  # noqa: BLE001 - one config's failure must not lose the run
            entry["error"] = f"{type(e).__name__}: {e}"[:300]
    timed = {name: e["us"] for name, e in point["candidates"].items() if "us" in e}
    if timed:
        best = min(timed, key=timed.get)
        point["best"] = {"config": best, "us": timed[best]}
        ours = timed[best]
        cub = min(point["cublas_us"], point["cublas_repeat_us"])
        spread = abs(point["cublas_repeat_us"] - point["cublas_us"]) / cub
        point["pick"] = "cublas" if pick({"cublas": cub, best: ours}, spread, MARGIN) == "cublas" else "ours"
    else:
        point["best"] = None
        point["pick"] = "cublas"
    point["dispatch_us"] = point["best"]["us"] if point["pick"] == "ours" else point["cublas_us"]
    return point


# ---------------------------------------------------------------- summary

def summarize(points: list[dict], ops: list[Op]) -> dict:
    backbone = [op.name for op in ops if op.backbone]
    by = {(p["op"], p["m"]): p for p in points}
    out: dict = {"per_m": {}}
    for m in sorted({p["m"] for p in points if p["op"] in backbone}):
        pts = [by.get((name, m)) for name in backbone]
        if any(p is None for p in pts):
            continue
        ours = [p["best"]["us"] if p["best"] else math.inf for p in pts]
        row = {"floor_us": sum(p["floor_us"] for p in pts), "cublas_us": sum(p["cublas_us"] for p in pts),
               "ours_us": sum(ours), "dispatch_us": sum(p["dispatch_us"] for p in pts)}
        row["speedup"] = row["cublas_us"] / row["dispatch_us"]
        row["dispatch_over_floor"] = row["dispatch_us"] / row["floor_us"]
        row["cublas_over_floor"] = row["cublas_us"] / row["floor_us"]
        out["per_m"][m] = row
    targets = []
    pm = out["per_m"] if len(backbone) == 4 else {}  # the targets are about all four GEMMs
    out["backbone_ops"] = backbone
    if 208 in pm:
        targets.append(("sum of the 4 backbone GEMMs at M = 208 <= 1.3x their floors",
                        pm[208]["dispatch_over_floor"], pm[208]["dispatch_over_floor"] <= 1.3))
    for m in (128, 208, 256, 320):
        if m in pm:
            targets.append((f">= 1.4x faster than cuBLAS at M = {m}", pm[m]["speedup"], pm[m]["speedup"] >= 1.4))
    if 608 in pm:
        targets.append((">= 1.1x faster than cuBLAS at M = 608", pm[608]["speedup"], pm[608]["speedup"] >= 1.1))
    # picked by one cuBLAS measurement, checked against the better of both (the pick must survive cuBLAS's spread)
    slower = [f"{p['op']}@{p['m']}" for p in points
              if p["pick"] == "ours" and p["best"]["us"] > min(p["cublas_us"], p["cublas_repeat_us"])]
    out["picked_but_slower"] = slower
    targets.append(("picked points slower than cuBLAS's repeat (count)", len(slower), not slower))
    out["targets"] = [{"target": t, "value": v, "met": bool(ok)} for t, v, ok in targets]
    return out


def short(name: str) -> str:
    return name.partition(":")[2]


def print_table(result: dict) -> None:
    c = result["ceilings"]
    print(f"\n{result['device']}: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
          f"bf16 matmul {c['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s; compile {result['compile_s']:.0f} s "
          f"({result['compile_jobs']} variants), total {result['elapsed_s']:.0f} s")
    print(f"{'op':<12}{'M':>5}{'floor':>8}{'cuBLAS':>8}{'spread':>7}{'plain':>8}{'ours':>8}{'cub/ours':>9}"
          f"{'ours/fl':>8}  best config")
    for p in result["points"]:
        best = p["best"]
        ours = best["us"] if best else math.nan
        spread = abs(p["cublas_repeat_us"] - p["cublas_us"]) / p["cublas_us"] * 100
        print(f"{p['op']:<12}{p['m']:>5}{p['floor_us']:>8.1f}{p['cublas_us']:>8.1f}{spread:>6.1f}%"
              f"{p['cublas_plain_us']:>8.1f}{ours:>8.1f}{p['cublas_us'] / ours:>9.2f}{ours / p['floor_us']:>8.2f}  "
              f"{short(best['config']) if best else '-'}")
    s = result["summary"]
    print(f"\nsum of the backbone GEMMs ({' + '.join(s['backbone_ops'])}), us; dispatched = ours where faster by "
          f"> max({MARGIN:.0%}, cuBLAS's repeat spread), else cuBLAS")
    print(f"{'M':>5}{'floor':>9}{'cuBLAS':>9}{'ours':>9}{'dispatch':>10}{'speedup':>9}{'disp/fl':>9}{'cub/fl':>8}")
    for m, r in sorted(s["per_m"].items(), key=lambda kv: int(kv[0])):
        print(f"{m:>5}{r['floor_us']:>9.1f}{r['cublas_us']:>9.1f}{r['ours_us']:>9.1f}{r['dispatch_us']:>10.1f}"
              f"{r['speedup']:>9.2f}{r['dispatch_over_floor']:>9.2f}{r['cublas_over_floor']:>8.2f}")
    kinds = {"timed": [], "wrong": [], "budget": [], "error": []}
    for p in result["points"]:
        for name, e in p["candidates"].items():
            err = e.get("error", "")
            kind = ("timed" if "us" in e else "wrong" if err.startswith("wrong") else
                    "budget" if err.startswith("skipped") else "error")
            kinds[kind].append(f"{p['op']}@{p['m']} {short(name)}: {err}")
    print(f"\ncandidates: {len(kinds['timed'])} timed, {len(kinds['wrong'])} WRONG (rel-L2 > {REL_TOL} or NaN), "
          f"{len(kinds['error'])} failed to compile or run, {len(kinds['budget'])} skipped (time budget)")
    for line in (kinds["wrong"] + kinds["error"])[:12]:
        print("  " + line[:160])
    print()
    for t in s["targets"]:
        print(f"{'MET   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']:.3g}")


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gemm_hopper"), help="output folder (default $OUT)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU: Triton interpreter, 1/32-size shapes, a few configs per point (tests the pipeline)")
    ap.add_argument("--only", nargs="*", help="op names to run (default: all)")
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="stop timing new candidates after this many seconds (the table still prints)")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="compile processes")
    ap.add_argument("--commit", default=os.environ.get("VLA_COMMIT", ""), help="git commit benchmarked")
    ap.add_argument("--compile-timeout-s", type=float, default=120.0,
                    help="compile phase wall limit; variants without a result by then are dropped")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    t_start = time.time()
    deadline = t_start + args.budget_s

    import torch
    try:
        from benchmarks.hopper_table import markdown
        from benchmarks.roofline import describe, measure_ceilings
        from vla_accel.kernels.flat_gemm_hopper import candidates, warp_spec_usable
        from vla_accel.kernels.tune import precompile
    except ImportError as e:
        print(f"cannot import vla_accel.kernels or benchmarks ({e}): run from a checkout root with the package "
              f"installed (pip install -e .) or mapped by hand: ln -sfn ../kernels vla_accel/kernels; "
              f"PYTHONPATH=$PWD python3 -m benchmarks.gemm_hopper ...", file=sys.stderr)
        return 2

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    ops = dry_run_ops() if dry else OPS
    if args.only:
        unknown = sorted(set(args.only) - {op.name for op in ops})
        if unknown:
            print(f"unknown ops {unknown}; valid: {[op.name for op in ops]}", file=sys.stderr)
            return 2
        ops = [op for op in ops if op.name in args.only]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(device) if not dry else None
    num_sms = props.multi_processor_count if props else 132
    try:
        from vla_accel.kernels.rowwise import silu_mul  # the runtime's gate|up epilogue (Triton)
    except Exception:  # noqa: BLE001 - torch's instead (noted in the result)
        silu_mul = None
    if silu_mul is None or dry:
        def silu_mul(gu):
            g, u = gu.chunk(2, dim=-1)
            return torch.nn.functional.silu(g) * u

    # the CPU has no fast bf16 matmul: a small fp32 one there (the dry run only exercises the pipeline)
    ceilings = (measure_ceilings(device, copy_bytes=16 * 2**20, size=512, dtype=torch.float32) if dry else
                measure_ceilings(device))
    print(f"ceilings: {describe(ceilings)}", flush=True)
    if not warp_spec_usable(device):
        print("warp-specialised (ws1) configs left out: they hang this Triton version on sm_90", flush=True)

    def configs_for(op: Op, m: int) -> list:
        cfgs = [c for c in candidates(m, op.n_out, op.k, gated=op.epilogue == "gated", num_sms=num_sms)
                if not c.warp_spec or warp_spec_usable(device)]
        if not dry:
            return cfgs
        kinds = {}  # one config per schedule kind keeps the interpreter's time bounded
        for c in cfgs:
            kinds.setdefault((c.split_k > 1, c.stream_k > 0, c.warp_spec, c.tma), c)
        first = cfgs[0]  # 1/32-size K is too short for the split-K rule: add one split so that path runs too
        kinds.setdefault((True, False, False, first.tma), replace(first, split_k=2))
        return list(kinds.values())

    jobs, seen = [], {}  # compile signature -> job
    for op in ops:
        for m in op.ms:
            for cfg in configs_for(op, m):
                job, sig = compile_job(op, cfg)
                if sig not in seen:
                    seen[sig] = job
                    jobs.append(job)
    compile_failures: dict[str, dict[str, str]] = {}
    compile_s = 0.0
    if not dry:
        print(f"compiling {len(jobs)} kernel variants in {args.workers} processes ...", flush=True)
        t0 = time.time()
        failed = precompile(jobs, args.workers, args.compile_timeout_s)
        compile_s = time.time() - t0
        for op in ops:  # a failed variant drops every config of that compile signature for the ops that share it
            for m in op.ms:
                for cfg in configs_for(op, m):
                    job = seen[compile_job(op, cfg)[1]]
                    if job in failed:
                        compile_failures.setdefault(op.name, {})[cfg.name] = failed[job]
        print(f"compiled in {compile_s:.0f} s; {len(failed)} variants failed", flush=True)
        for job, err in failed.items():
            print(f"  compile failed: {job.label}: {err}")

    ctx = {"torch": torch, "device": device, "timer": Timer(torch, device), "dry": dry,
           "dtype": torch.float16 if dry else torch.bfloat16, "ceilings": ceilings, "silu_mul": silu_mul,
           "l2_bytes": getattr(props, "L2_cache_size", 50 * 2**20) if props else 0,
           "compile_failures": compile_failures}
    import triton
    result = {
        "format": "vla_accel.benchmarks.gemm_hopper/1",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": args.commit,
        "command": "python -m benchmarks.gemm_hopper " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": torch.cuda.get_device_name(device) if not dry else "cpu (dry run, interpreter)",
        "num_sms": num_sms, "torch": torch.__version__, "triton": triton.__version__,
        "dtype": str(ctx["dtype"]).replace("torch.", ""),
        "ceilings": ceilings, "compile_s": compile_s, "compile_jobs": len(jobs),
        "timing": ("CUDA graph of n calls rotating over weight copies (>= 3x L2 between uses of a copy: weights "
                   "from HBM; activations L2-resident), median of 7 replays / n; warm-up on the capture stream"),
        "floor": "max(bytes / copy bandwidth, flops / bf16 matmul rate); bytes = weight + x (+ residual) + out",
        "points": [],
    }
    path = out_dir / "gemm_hopper.json"
    # backbone first, M-major (the target points first), then the towers
    order = [(op, m) for m in BACKBONE_MS for op in ops if op.backbone and m in op.ms]
    order += [(op, m) for op in ops if not op.backbone for m in op.ms]
    for op, m in order:
        t0 = time.time()
        point = run_op(ctx, op, m, configs_for(op, m), deadline)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the op's weight copies went with run_op's frame
        result["points"].append(point)
        best = point["best"]
        print(f"{op.name:<12} M={m:<5} floor {point['floor_us']:8.1f} us  cuBLAS {point['cublas_us']:8.1f}  "
              f"ours {best['us'] if best else math.nan:8.1f} ({short(best['config']) if best else '-'})  "
              f"[{time.time() - t0:.1f} s]", flush=True)
        result["elapsed_s"] = time.time() - t_start
        result["summary"] = summarize(result["points"], ops)
        path.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    (out_dir / "gemm_hopper.md").write_text(markdown(result))
    print(f"\nfull results: {path} (summary: gemm_hopper.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
