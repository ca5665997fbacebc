"""The tuner: profile the linear-layer implementations on this GPU and write the dispatch table.

    python -m vla_accel.kernels.tune --dims 4096 11008 32 32     # hidden, intermediate, heads[, kv heads]
    python -m vla_accel.kernels.tune --config path/to/config.json  # an HF-style config (text_config.*)
    vla-accel-tune --preset 7b                                   # the project's models (vla_accel.runtime.tune)

For every linear shape of a Llama-style backbone (fused QKV, O, gate/up, fused gate+up with SiLU, down) and every
M of the grid, it times cuBLAS and each candidate of every registered kernel family (registry.py: GEMV for the
smallest M, the flat GEMM with and without split-K, ...) inside CUDA graphs, with the weights rotated among
several copies so that no measurement runs out of L2. Each candidate's output is first checked against cuBLAS.
The fastest implementation per point becomes a rule of the table (cuBLAS unless a kernel beats it by more than
--margin); the raw times are kept in the table's meta. The table goes to --out, else to the user's cache
(table.user_table_path), where default_table looks before the packaged tables: never into the installed package.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import attention
from .configs import AttentionConfig
from .launch import run_impl
from .reference import attention_reference
from .registry import FAMILIES, parse_impl
from .table import DispatchTable, shape_key, user_table_path
from .timing import time_graph_us

M_GRID = [1, 8, 16, 32, 64, 128, 150, 200, 256, 300, 400, 512, 600]
ATTN_L_GRID = [64, 128, 256, 384, 512, 640, 768]
ATTN_CONFIGS = [AttentionConfig(64, 64, 4, 3), AttentionConfig(64, 64, 4, 2), AttentionConfig(64, 64, 4, 4),
                AttentionConfig(64, 32, 4, 3), AttentionConfig(64, 32, 4, 4), AttentionConfig(128, 64, 8, 3),
                AttentionConfig(128, 32, 8, 3), AttentionConfig(32, 64, 4, 3), AttentionConfig(64, 32, 4, 2),
                AttentionConfig(128, 64, 8, 2)]
RAGGED_FRACTIONS = [1.0, 0.93, 0.85, 0.78, 0.7, 0.62, 0.55, 0.5]  # lengths of the ragged batch of 8, x L
L2_ROTATE_BYTES = 200 * 2**20  # rotate weight copies until a graph's calls touch this many bytes


@dataclass(frozen=True)
class LinearShape:
    name: str  # "qkv", "o", "gate_up", "gate", "down"
    op: str  # dispatch op: linear | linear_residual | gate_up_silu
    n: int  # weight rows ([2*I] for gate_up_silu)
    k: int

    @property
    def key(self) -> str:
        return shape_key(self.op, (self.n, self.k))


# ---------------------------------------------------------------- model shapes

def llm_dims_from_hf(d: dict) -> tuple[int, int, int, int]:
    """(hidden, intermediate, heads, kv_heads) from an HF-style config dict (text_config, else the top level)."""
    tc = d.get("text_config", d)
    missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads") if k not in tc]
    if missing:
        raise ValueError(f"config lacks {missing} (looked in 'text_config' and at the top level)")
    heads = int(tc["num_attention_heads"])
    return int(tc["hidden_size"]), int(tc["intermediate_size"]), heads, int(tc.get("num_key_value_heads", heads))


def model_linear_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int | None = None) -> list[LinearShape]:
    """The backbone's linear layers as dispatch keys ([N, K] per torch.nn.Linear)."""
    kv = kv_heads or heads
    head_dim = hidden // heads
    return [
        LinearShape("qkv", "linear", hidden + 2 * kv * head_dim, hidden),
        LinearShape("o", "linear", hidden, hidden),
        LinearShape("gate", "linear", intermediate, hidden),
        LinearShape("down", "linear", hidden, intermediate),
        LinearShape("gate_up", "gate_up_silu", 2 * intermediate, hidden),
    ]


# ---------------------------------------------------------------- candidates

def candidates(op: str, n: int, k: int, m: int, num_sms: int) -> list[str]:
    """Implementation names worth timing at this point: those of every registered family (registry.py), cuBLAS
    first."""
    out = ["cublas"]
    for family in FAMILIES.values():
        out += [c for c in family.candidates(op, n, k, m, num_sms) if c not in out]
    return out


# ---------------------------------------------------------------- measuring

class ShapeBuffers:
    """Several copies of one weight (so the timed calls stream from DRAM) and inputs for a given M."""

    def __init__(self, shape: LinearShape, dtype: torch.dtype, device: torch.device, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        wbytes = shape.n * shape.k * torch.finfo(dtype).bits // 8
        self.copies = max(2, min(16, math.ceil(L2_ROTATE_BYTES / wbytes)))
        self.weights = [torch.randn(shape.n, shape.k, device=device, dtype=dtype, generator=gen) / math.sqrt(shape.k)
                        for _ in range(self.copies)]
        self.shape, self.dtype, self.device, self.gen = shape, dtype, device, gen

    def inputs(self, m: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = torch.randn(m, self.shape.k, device=self.device, dtype=self.dtype, generator=self.gen)
        n_out = self.shape.n // 2 if self.shape.op == "gate_up_silu" else self.shape.n
        res = (torch.randn(m, n_out, device=self.device, dtype=self.dtype, generator=self.gen)
               if self.shape.op == "linear_residual" else None)
        return x, res

    def call(self, impl: str, x: torch.Tensor, res: torch.Tensor | None):
        gated = self.shape.op == "gate_up_silu"
        return lambda i: run_impl(impl, x, self.weights[i % self.copies], residual=res, gated=gated)

    def n_calls(self) -> int:
        return max(12, 2 * self.copies)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- parallel compilation

def _compile_worker(jobs: list[tuple[str, int, int, int, str, str]]) -> list[tuple[str, str]]:
    """Run each job once (compiling its kernels into Triton's on-disk cache); return [(impl, error)].

    A job is (op, n, k, m, impl, dtype) for a linear op, or ("attention", heads, head_dim, L, config, dtype).
    """
    failures = []
    for op, n, k, m, impl, dtype_name in jobs:
        if op == "attention":
            try:
                q = torch.randn(m, n, k, device="cuda", dtype=getattr(torch, dtype_name))
                cu = torch.tensor([0, m], dtype=torch.int32, device="cuda")
                attention(q, q, q, cu, m, config=impl)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - reported, the config is dropped
                failures.append((f"attention:d{k}:{impl}", f"{type(e).__name__}: {e}"[:300]))
            continue
        try:
            dtype = getattr(torch, dtype_name)
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            w = torch.randn(n, k, device="cuda", dtype=dtype) / math.sqrt(k)
            n_out = n // 2 if op == "gate_up_silu" else n
            res = torch.randn(m, n_out, device="cuda", dtype=dtype) if op == "linear_residual" else None
            run_impl(impl, x, w, residual=res, gated=op == "gate_up_silu")
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - reported, the candidate is dropped
            failures.append((f"{op}:{n}x{k}:{impl}", f"{type(e).__name__}: {e}"[:300]))
    return failures


def precompile(jobs: list[tuple[str, int, int, int, str, str]], workers: int) -> list[tuple[str, str]]:
    """Compile the Triton kernels of all jobs in parallel processes (each run once); returns failures."""
    if workers <= 1 or len(jobs) <= 1:
        return _compile_worker(jobs)
    chunks = [jobs[i::workers] for i in range(workers)]
    try:
        with mp.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_compile_worker, [c for c in chunks if c])
    except Exception as e:  # noqa: BLE001 - compile in this process instead (slower, same result)
        print(f"parallel compilation failed ({type(e).__name__}: {e}); compiling serially")
        return _compile_worker(jobs)
    return [f for r in results for f in r]


def compile_signature(op: str, k: int, m: int, impl: str) -> tuple:
    """What a Triton kernel specialises on (constexprs), so each variant is compiled once."""
    family, config = parse_impl(impl)
    if family.compile_key is None:
        raise ValueError(f"'{impl}' compiles no kernel of ours")
    return family.compile_key(op, k, m, config)


def compile_jobs(shapes: list[LinearShape], m_grid: list[int], dtype: torch.dtype, num_sms: int):
    jobs, seen = [], set()
    for s in shapes:
        for m in m_grid:
            for impl in candidates(s.op, s.n, s.k, m, num_sms):
                if parse_impl(impl)[0].compile_key is None:  # (cuBLAS: nothing to compile)
                    continue
                sig = compile_signature(s.op, s.k, m, impl)
                if sig not in seen:
                    seen.add(sig)
                    jobs.append((s.op, s.n, s.k, m, impl, str(dtype).replace("torch.", "")))
    return jobs


# ---------------------------------------------------------------- profiling

def profile(shapes: list[LinearShape], m_grid: list[int], dtype: torch.dtype, *, skip: set[str] = frozenset(),
            log=print) -> dict[str, list[dict]]:
    """{key: [{"m": m, "times_us": {impl: us}, "errors": {impl: rel err}}]}, failing candidates left out."""
    device = torch.device("cuda")
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    result = {}
    for s in shapes:
        bufs = ShapeBuffers(s, dtype, device)
        rows = []
        for m in m_grid:
            x, res = bufs.inputs(m)
            ref = bufs.call("cublas", x, res)(0)
            times, errors = {}, {}
            for impl in candidates(s.op, s.n, s.k, m, num_sms):
                if f"{s.key}:{impl}" in skip:
                    continue
                try:
                    err = rel_err(bufs.call(impl, x, res)(0), ref)
                    errors[impl] = err
                    if not err < 2e-2:  # bf16 rounding is ~4e-3; larger means a broken configuration
                        log(f"  {s.key} m={m} {impl}: rel err {err:.3g} vs cuBLAS, dropped")
                        continue
                    times[impl] = time_graph_us(bufs.call(impl, x, res), bufs.n_calls())
                except Exception as e:  # noqa: BLE001 - a failing candidate is reported and skipped
                    log(f"  {s.key} m={m} {impl}: {type(e).__name__}: {str(e)[:200]}")
            best = min(times, key=times.get)
            log(f"{s.key:28s} m={m:4d} cublas {times.get('cublas', float('nan')):8.1f} us  "
                f"best {best} {times[best]:8.1f} us")
            rows.append({"m": m, "times_us": times, "errors": errors})
        result[s.key] = rows
        del bufs
        torch.cuda.empty_cache()
    return result


def attention_batches(length: int) -> dict[str, list[int]]:
    """The two batch shapes attention is tuned and benchmarked on, for max sequence length L."""
    return {"b1": [length], "ragged8": [max(1, round(length * f)) for f in RAGGED_FRACTIONS]}


def packed_qkv(lengths: list[int], heads: int, dim: int, dtype, dev, gen):
    """Random q, k, v [T, H, D] of packed sequences and their cu_seqlens (int32 [B+1])."""
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, dim, device=dev, dtype=dtype, generator=gen) for _ in range(3))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    return q, k, v, cu


def sdpa_baselines(q, k, v, lengths: list[int]) -> dict:
    """torch SDPA for the same packed batch, each way it can be run: {label: fn(i)} (fn returns SDPA's output:
    [1, H, L, D] for one sequence; padded, per-sequence or nested otherwise)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    heads, dim = q.shape[1], q.shape[2]
    out = {}
    if len(lengths) == 1:
        qd, kd, vd = (t.view(1, lengths[0], heads, dim).transpose(1, 2) for t in (q, k, v))  # [1, H, L, D]
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            def fn(i, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qd, kd, vd)
            out[f"sdpa_{name}"] = fn
        out["sdpa_default"] = lambda i: F.scaled_dot_product_attention(qd, kd, vd)
        return out
    # ragged: padded dense batch with a key-padding mask (what a stock model does)
    b, lmax = len(lengths), max(lengths)
    pad = [torch.zeros(b, heads, lmax, dim, device=q.device, dtype=q.dtype) for _ in range(3)]  # [B, H, Lmax, D]
    starts = [0] + torch.tensor(lengths).cumsum(0).tolist()
    for i, n in enumerate(lengths):
        for p, t in zip(pad, (q, k, v)):
            p[i, :, :n] = t[starts[i]:starts[i] + n].transpose(0, 1)
    keep = torch.arange(lmax, device=q.device)[None, :] < torch.tensor(lengths, device=q.device)[:, None]
    mask = keep[:, None, None, :]  # [B, 1, 1, Lmax]
    out["sdpa_padded_mask"] = lambda i: F.scaled_dot_product_attention(pad[0], pad[1], pad[2], attn_mask=mask)
    # one SDPA call per sequence (each flash-eligible)
    views = [tuple(t[starts[i]:starts[i] + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
             for i, n in enumerate(lengths)]
    out["sdpa_per_sequence"] = lambda i: [F.scaled_dot_product_attention(*vw) for vw in views]
    # nested (jagged) tensors: SDPA's own varlen path
    try:
        offsets = torch.tensor(starts, device=q.device, dtype=torch.int64)
        nq, nk, nv = (torch.nested.nested_tensor_from_jagged(t, offsets, min_seqlen=min(lengths), max_seqlen=lmax)
                      .transpose(1, 2) for t in (q, k, v))
        F.scaled_dot_product_attention(nq, nk, nv)
        out["sdpa_nested"] = lambda i: F.scaled_dot_product_attention(nq, nk, nv)
    except Exception:  # noqa: BLE001 - not available in this torch build: left out
        pass
    return out


def profile_attention(l_grid: list[int], configs: list[str], dtype: torch.dtype, *, heads: int, head_dim: int,
                      with_sdpa: bool = True, log=print) -> list[dict]:
    """Time each attention tile config (unified path) on both batch shapes of attention_batches(L), L over the
    grid, and torch SDPA's best way of running the same batch (the reference attention_choice compares to).

    Row per L: {"L", "batches": {"b1" | "ragged8": {"lengths", "times_us": {config: us}, "errors": {config: rel
    err vs fp32}, "sdpa": (label, us) or None}}, "scores": {config: worst ratio}, "best": config}.
    """
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for length in l_grid:
        batches = {}
        for batch_name, lengths in attention_batches(length).items():
            q, k, v, cu = packed_qkv(lengths, heads, head_dim, dtype, dev, gen)
            ref = attention_reference(q, k, v, cu, length, out_dtype=torch.float32)
            times, errors = {}, {}
            for name in configs:
                try:
                    errors[name] = err = rel_err(attention(q, k, v, cu, length, config=name), ref)
                    if not err < 2e-2:  # bf16 rounding gives ~2.4e-3; larger means a broken configuration
                        log(f"  attention L={length} {batch_name} {name}: rel err {err:.3g}, dropped")
                        continue
                    times[name] = time_graph_us(
                        lambda i, q=q, k=k, v=v, name=name: attention(q, k, v, cu, length, config=name), 20)
                except Exception as e:  # noqa: BLE001 - a failing config is reported and skipped
                    log(f"  attention L={length} {batch_name} {name}: {type(e).__name__}: {str(e)[:200]}")
            sdpa = {}
            for label, fn in (sdpa_baselines(q, k, v, lengths) if with_sdpa else {}).items():
                try:
                    sdpa[label] = time_graph_us(fn, 20)
                except Exception:  # noqa: BLE001 - a backend that cannot run this batch is left out
                    pass
            best_sdpa = min(sdpa, key=sdpa.get) if sdpa else None
            batches[batch_name] = {"lengths": lengths, "times_us": times, "errors": errors,
                                   "sdpa": (best_sdpa, sdpa[best_sdpa]) if best_sdpa else None}
            del q, k, v, ref
        row = {"L": length, "batches": batches}
        row["scores"] = attention_scores(row)
        row["best"] = min(row["scores"], key=lambda c: row["scores"][c]) if row["scores"] else None
        for batch_name, b in batches.items():
            t = b["times_us"]
            sd = f"{b['sdpa'][0]} {b['sdpa'][1]:7.1f} us" if b["sdpa"] else "no SDPA"
            log(f"attention:d{head_dim} L={length:4d} {batch_name:8s} picked {row['best']} "
                f"{t.get(row['best'], float('nan')):7.1f} us, fastest {min(t, key=t.get) if t else None} "
                f"{min(t.values()) if t else float('nan'):7.1f} us | {sd}")
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def attention_scores(row: dict) -> dict[str, float]:
    """Per config: its worst ratio over the batch shapes of time / reference time, where the reference is
    SDPA's best time on that shape (else the fastest config's). Configs not timed on every shape are left
    out; ties are broken by the sum of the ratios (added with a weight of 1e-6)."""
    batches = [b for b in row["batches"].values() if b["times_us"]]
    common = set.intersection(*(set(b["times_us"]) for b in batches)) if batches else set()
    scores = {}
    for cfg in sorted(common):
        ratios = []
        for b in batches:
            ref = b["sdpa"][1] if b.get("sdpa") else min(b["times_us"].values())
            ratios.append(b["times_us"][cfg] / ref)
        scores[cfg] = max(ratios) + 1e-6 * sum(ratios)
    return scores


def attention_choice(row: dict) -> str:
    """The config of one profiled L: the smallest worst ratio over the batch shapes (rows of the format
    before both shapes were profiled, {"L", "times_us"}: the fastest)."""
    if "batches" not in row:
        return min(row["times_us"], key=row["times_us"].get)
    scores = attention_scores(row)
    return min(scores, key=scores.get)


def attention_rules(rows: list[dict]) -> list[tuple[int, str]]:
    """Chosen config per L (attention_choice), neighbours with the same choice merged (L above the grid:
    the default)."""
    rules: list[tuple[int, str]] = []
    for r in sorted(rows, key=lambda r: r["L"]):
        if not (attention_scores(r) if "batches" in r else r["times_us"]):
            continue  # no config ran at this L: the rule of the next L (or the default) covers it
        best = attention_choice(r)
        if rules and rules[-1][1] == best:
            rules[-1] = (r["L"], best)
        else:
            rules.append((r["L"], best))
    return rules


def build_rules(points: list[tuple[int, dict[str, float]]], *, margin: float = 0.01) -> list[tuple[int, str]]:
    """Rules from profiled times: points = [(m, {impl: time})] at increasing m.

    At each m the fastest impl wins, except that cuBLAS is kept unless the winner beats it by more than
    `margin` (relative), so that noise never installs a kernel slower than cuBLAS. Neighbouring points with
    the same winner merge into one rule.
    """
    rules: list[tuple[int, str]] = []
    for m, times in sorted(points):
        best = min(times, key=times.get)
        if "cublas" in times and times[best] > times["cublas"] * (1.0 - margin):
            best = "cublas"
        if rules and rules[-1][1] == best:
            rules[-1] = (m, best)
        else:
            rules.append((m, best))
    return rules


def build_table(prof: dict[str, list[dict]], *, gpu: str, dtype: str, margin: float, meta: dict,
                attn_prof: dict[str, list[dict]] | None = None) -> DispatchTable:
    rules = {key: build_rules([(r["m"], r["times_us"]) for r in rows], margin=margin) for key, rows in prof.items()}
    attn_prof = attn_prof or {}
    return DispatchTable(gpu=gpu, dtype=dtype, rules=rules,
                         attention={key: attention_rules(rows) for key, rows in attn_prof.items()},
                         meta={**meta, "profile": prof, "attention_profile": attn_prof})


def environment() -> dict:
    import triton
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def parse_args(argv):
    p = argparse.ArgumentParser(prog="vla-accel-tune", description=__doc__.split("\n")[0])
    shapes = p.add_mutually_exclusive_group(required=True)
    shapes.add_argument("--dims", type=int, nargs="+", metavar="N",
                        help="hidden intermediate heads [kv_heads] of the backbone")
    shapes.add_argument("--config", type=Path, help="HF-style config.json (text_config: hidden_size, ...)")
    p.add_argument("--m", type=int, nargs="+", default=M_GRID, help="grid of M (tokens)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--margin", type=float, default=0.01, help="a kernel must beat cuBLAS by this fraction")
    p.add_argument("--only", nargs="+", help="shape names to tune (qkv o gate down gate_up)")
    p.add_argument("--attn-l", type=int, nargs="*", default=ATTN_L_GRID,
                   help="sequence lengths for the attention tile configs (none: skip attention)")
    p.add_argument("--workers", type=int, default=12, help="processes compiling kernels in parallel")
    p.add_argument("--out", type=Path, help="table path (default: the user's cache, table.user_table_path)")
    args = p.parse_args(argv)
    if args.dims is not None and len(args.dims) not in (3, 4):
        p.error(f"--dims takes hidden intermediate heads [kv_heads]; got {args.dims}")
    return args


def dims_from_args(args) -> tuple[int, int, int, int]:
    if args.config is not None:
        return llm_dims_from_hf(json.loads(args.config.read_text()))
    hidden, intermediate, heads = args.dims[:3]
    return hidden, intermediate, heads, args.dims[3] if len(args.dims) == 4 else heads


def output_path(args, gpu_name: str) -> Path:
    """--out, else <user cache>/<gpu>.json: never the installed package."""
    return args.out if args.out is not None else user_table_path(gpu_name)


def shapes_from_args(args) -> list[LinearShape]:
    shapes = model_linear_shapes(*dims_from_args(args))
    if args.only:
        shapes = [s for s in shapes if s.name in args.only]
    return shapes


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    shapes = shapes_from_args(args)
    if not torch.cuda.is_available():
        print("vla-accel-tune needs a CUDA GPU (it times kernels on the current device)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    env = environment()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"tuning {[f'{s.name}={s.key}' for s in shapes]} on {env['gpu']} ({num_sms} SMs), M = {args.m}")
    hidden, _, heads, _ = dims_from_args(args)
    head_dim = hidden // heads
    attn_configs = [c.name for c in ATTN_CONFIGS]
    attn_jobs = [("attention", heads, head_dim, 128, name, args.dtype) for name in attn_configs] if args.attn_l else []
    t0 = time.time()
    failures = precompile(compile_jobs(shapes, args.m, dtype, num_sms) + attn_jobs, args.workers)
    print(f"compiled in {time.time() - t0:.0f} s; {len(failures)} candidate(s) failed to build or run")
    for key, err in failures[:20]:
        print(f"  {key}: {err}")
    prof = profile(shapes, args.m, dtype, skip={key for key, _ in failures})
    attn_prof = {}
    if args.attn_l:
        ok = [c for c in attn_configs if f"attention:d{head_dim}:{c}" not in {key for key, _ in failures}]
        attn_prof[f"d{head_dim}"] = profile_attention(args.attn_l, ok, dtype, heads=heads, head_dim=head_dim)
    table = build_table(prof, gpu=env["gpu"], dtype=args.dtype, margin=args.margin, attn_prof=attn_prof,
                        meta={**env, "m_grid": args.m, "margin": args.margin, "attn_l_grid": args.attn_l,
                              "shapes": {s.name: s.key for s in shapes}, "compile_failures": failures,
                              "timing": "median of 7 replays of a CUDA graph of >= 12 calls, weights rotated"})
    out = output_path(args, env["gpu"])
    table.save(out)
    print(f"wrote {out} in {time.time() - t0:.0f} s")
    for key in sorted(table.rules):
        print(f"  {key}: {table.rules[key]}")
        print(f"    switch points: {table.switch_points(key)}")
    for key, rules in table.attention.items():
        print(f"  attention {key}: {rules}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
