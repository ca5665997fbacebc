"""The tuner: profile the linear-layer implementations on this GPU and write the dispatch table.

    python -m vla_accel.kernels.tune --dims 4096 11008 32 32     # hidden, intermediate, heads[, kv heads]
    python -m vla_accel.kernels.tune --config path/to/config.json  # an HF-style config (text_config.*)
    python -m vla_accel.kernels.tune --dims 4096 11008 32 32 --vit 1024 4096 522 --budget-s 150
    vla-accel-tune --preset 7b                                   # the project's models (vla_accel.runtime.tune)

For every linear layer of a Llama-style backbone as the runtime calls it (fused QKV; O and down with the residual
added in place; fused gate|up with SiLU) and every M of the grid (the runtime's token buckets), and for the vision
towers' linears (--vit: QKV, projection, fc1, fc2 with bias, at M = rows per sample x --vit-batches), it times
cuBLAS and each candidate of every registered kernel family (registry.py: GEMV for the smallest M, the flat GEMM,
the Hopper flat GEMM, ...) inside CUDA graphs, with the weights rotated among several copies so that no
measurement runs out of L2. Each candidate's output is first checked against cuBLAS. cuBLAS is timed twice (before
and after the candidates) and the fastest candidate twice: a kernel becomes a rule of the table only where its
slower time beats cuBLAS's faster one by more than max(--margin, the measured repeat spread); elsewhere cuBLAS
stays. The raw times are kept in the table's meta. The table goes to --out, else to the user's cache
(table.user_table_path), where default_table looks before the packaged tables: never into the installed package.

Time: every kernel variant is compiled first, in --workers processes, under a wall limit (a variant without a
result by then, e.g. a compiler that hangs, is dropped and its process killed); --budget-s bounds the whole run:
after it, only cuBLAS is timed (so every point still gets a rule) and the attention tiles keep their defaults.
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

# The M the runtime dispatches (its token buckets: multiples of 16 up to 1024, then of 32 / 64 / 128): 56 / 112 /
# 224 / 448 the last layer's action rows of 1 / 2 / 4 / 8 samples; 160-304 the pruned layers of one sample
# (SpecPrune: 150-290 rows); 608 an unpruned sample (602 rows); 1216-2432 eight pruned samples, 4864 eight
# unpruned ones (configuration (e)). A rule serves M down to the previous point: M <= 56 gets the rule of 56; above
# the last point the table says cuBLAS. (Decode-style M = 1-32, which the runtime never runs: --m 1 8 16 32 ...)
M_GRID = [56, 64, 112, 128, 160, 192, 224, 256, 304, 448, 608, 768, 1216, 1536, 2048, 2432, 4864]
VIT_BATCHES = [1, 8]  # the towers' M: rows per sample x these batch sizes (one policy call; configuration (e))
ATTN_L_GRID = [64, 128, 256, 384, 512, 640, 768]
ATTN_CONFIGS = [AttentionConfig(64, 64, 4, 3), AttentionConfig(64, 64, 4, 2), AttentionConfig(64, 64, 4, 4),
                AttentionConfig(64, 32, 4, 3), AttentionConfig(64, 32, 4, 4), AttentionConfig(128, 64, 8, 3),
                AttentionConfig(128, 32, 8, 3), AttentionConfig(32, 64, 4, 3), AttentionConfig(64, 32, 4, 2),
                AttentionConfig(128, 64, 8, 2)]
RAGGED_FRACTIONS = [1.0, 0.93, 0.85, 0.78, 0.7, 0.62, 0.55, 0.5]  # lengths of the ragged batch of 8, x L
L2_ROTATE_BYTES = 200 * 2**20  # rotate weight copies until a graph's calls touch this many bytes


@dataclass(frozen=True)
class LinearShape:
    name: str  # "qkv", "o", "gate_up", "down", "vit1024_fc1", ...
    op: str  # dispatch op: linear | linear_residual | gate_up_silu
    n: int  # weight rows ([2*I] for gate_up_silu)
    k: int
    bias: bool = False  # the layer adds a bias (the vision towers' linears)
    ms: tuple[int, ...] = ()  # its own M grid (empty: the tuner's --m grid)

    @property
    def key(self) -> str:
        return shape_key(self.op, (self.n, self.k))

    @property
    def n_out(self) -> int:
        return self.n // 2 if self.op == "gate_up_silu" else self.n


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
    """The backbone's linear layers as the runtime dispatches them ([N, K] per torch.nn.Linear): fused QKV, O with
    the residual, fused gate|up with SiLU, down with the residual."""
    kv = kv_heads or heads
    head_dim = hidden // heads
    return [
        LinearShape("qkv", "linear", hidden + 2 * kv * head_dim, hidden),
        LinearShape("o", "linear_residual", hidden, hidden),
        LinearShape("gate_up", "gate_up_silu", 2 * intermediate, hidden),
        LinearShape("down", "linear_residual", hidden, intermediate),
    ]


def vit_linear_shapes(width: int, mlp: int, rows: int, batches: list[int] = VIT_BATCHES) -> list[LinearShape]:
    """A ViT block's linears (all with bias) at M = rows per sample x each batch size."""
    ms = tuple(sorted(rows * b for b in batches))
    return [LinearShape(f"vit{width}_{name}", "linear", n, k, True, ms)
            for name, n, k in (("qkv", 3 * width, width), ("proj", width, width), ("fc1", mlp, width),
                               ("fc2", width, mlp))]


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
    """Several copies of one weight (so the timed calls stream from DRAM), its bias, and inputs for a given M."""

    def __init__(self, shape: LinearShape, dtype: torch.dtype, device: torch.device, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        wbytes = shape.n * shape.k * torch.finfo(dtype).bits // 8
        self.copies = max(2, min(16, math.ceil(L2_ROTATE_BYTES / wbytes)))
        self.weights = [torch.randn(shape.n, shape.k, device=device, dtype=dtype, generator=gen) / math.sqrt(shape.k)
                        for _ in range(self.copies)]
        self.bias = torch.randn(shape.n_out, device=device, dtype=dtype, generator=gen) if shape.bias else None
        self.shape, self.dtype, self.device, self.gen = shape, dtype, device, gen

    def inputs(self, m: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = torch.randn(m, self.shape.k, device=self.device, dtype=self.dtype, generator=self.gen)
        res = (torch.randn(m, self.shape.n_out, device=self.device, dtype=self.dtype, generator=self.gen)
               if self.shape.op == "linear_residual" else None)
        return x, res

    def call(self, impl: str, x: torch.Tensor, res: torch.Tensor | None, inplace: bool = False):
        """fn(i): the op on weight copy i (inplace: accumulates into `res`, as the runtime does)."""
        gated = self.shape.op == "gate_up_silu"
        return lambda i: run_impl(impl, x, self.weights[i % self.copies], bias=self.bias, residual=res, gated=gated,
                                  inplace=inplace)

    def n_calls(self) -> int:
        return max(12, 2 * self.copies)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


class Budget:
    """Wall-clock budget of a run (seconds <= 0: none), counted from construction."""

    def __init__(self, seconds: float = 0.0):
        self.seconds, self.t0 = seconds, time.time()

    def left(self) -> float:
        return self.seconds - (time.time() - self.t0) if self.seconds > 0 else math.inf

    def over(self) -> bool:
        return self.left() <= 0


# ---------------------------------------------------------------- parallel compilation

@dataclass(frozen=True)
class CompileJob:
    """One run that compiles a kernel variant into Triton's on-disk cache: a linear op at (n, k, m) through `impl`,
    or op "attention" with n = heads, k = head dim, m = sequence length and impl = the tile config."""
    op: str
    n: int
    k: int
    m: int
    impl: str
    dtype: str
    bias: bool = False

    @property
    def label(self) -> str:
        if self.op == "attention":
            return f"attention:d{self.k}:{self.impl}"
        return f"{shape_key(self.op, (self.n, self.k))}{'+bias' if self.bias else ''}:{self.impl}"


def _compile_job(job: CompileJob) -> str | None:
    """Worker: run the job once; the error, or None."""
    try:
        dtype = getattr(torch, job.dtype)
        if job.op == "attention":
            q = torch.randn(job.m, job.n, job.k, device="cuda", dtype=dtype)
            cu = torch.tensor([0, job.m], dtype=torch.int32, device="cuda")
            attention(q, q, q, cu, job.m, config=job.impl)
        else:
            x = torch.randn(job.m, job.k, device="cuda", dtype=dtype)
            w = torch.randn(job.n, job.k, device="cuda", dtype=dtype) / math.sqrt(job.k)
            n_out = job.n // 2 if job.op == "gate_up_silu" else job.n
            res = torch.randn(job.m, n_out, device="cuda", dtype=dtype) if job.op == "linear_residual" else None
            bias = torch.randn(n_out, device="cuda", dtype=dtype) if job.bias else None
            run_impl(job.impl, x, w, bias=bias, residual=res, gated=job.op == "gate_up_silu")
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 - reported, the variant is dropped
        return f"{type(e).__name__}: {e}"[:300]


def precompile(jobs: list[CompileJob], workers: int, timeout_s: float = 0.0, log=print,
               worker=_compile_job) -> dict[CompileJob, str]:
    """Run every job once in `workers` spawned processes (Triton's disk cache then serves this process);
    {job: error} of those that failed. timeout_s > 0: a wall limit for all of it, after which the jobs without a
    result fail (a compiler or kernel that hangs, or too little time) and the processes are killed. worker: the
    function each job goes through (a module-level function: it is pickled into the processes)."""
    if not jobs:
        return {}
    if workers <= 1:
        return {job: err for job in jobs if (err := worker(job))}
    failures: dict[CompileJob, str] = {}
    t0 = time.time()
    pool = mp.get_context("spawn").Pool(workers)
    try:
        pending = [(job, pool.apply_async(worker, (job,))) for job in jobs]
        for i, (job, result) in enumerate(pending):
            try:
                err = result.get(timeout=max(0.1, t0 + timeout_s - time.time()) if timeout_s > 0 else None)
            except mp.TimeoutError:
                err = f"no result within {timeout_s:.0f} s (a hung compiler or kernel, or too little time)"
            except Exception as e:  # noqa: BLE001 - a dead worker: that job fails, the others go on
                err = f"{type(e).__name__}: {e}"[:300]
            if err:
                failures[job] = err
            if (i + 1) % 16 == 0:
                log(f"  compiled {i + 1}/{len(jobs)} ({time.time() - t0:.0f} s)")
    finally:
        pool.terminate()
    return failures


def compile_signature(op: str, k: int, m: int, impl: str, bias: bool = False) -> tuple:
    """What a Triton kernel specialises on (constexprs), so each variant is compiled once."""
    family, config = parse_impl(impl)
    if family.compile_key is None:
        raise ValueError(f"'{impl}' compiles no kernel of ours")
    return (bias,) + family.compile_key(op, k, m, config)


def shape_ms(shape: LinearShape, m_grid: list[int]) -> list[int]:
    return list(shape.ms) if shape.ms else list(m_grid)


def compile_jobs(shapes: list[LinearShape], m_grid: list[int], dtype: torch.dtype, num_sms: int) -> list[CompileJob]:
    jobs, seen = [], set()
    for s in shapes:
        for m in shape_ms(s, m_grid):
            for impl in candidates(s.op, s.n, s.k, m, num_sms):
                if parse_impl(impl)[0].compile_key is None:  # (cuBLAS: nothing to compile)
                    continue
                sig = compile_signature(s.op, s.k, m, impl, s.bias)
                if sig not in seen:
                    seen.add(sig)
                    jobs.append(CompileJob(s.op, s.n, s.k, m, impl, str(dtype).replace("torch.", ""), s.bias))
    return jobs


# ---------------------------------------------------------------- profiling

def profile(shapes: list[LinearShape], m_grid: list[int], dtype: torch.dtype, *, failed: set[tuple] = frozenset(),
            budget: Budget | None = None, log=print, device: torch.device | str = "cuda",
            timer=time_graph_us) -> dict[str, list[dict]]:
    """{key: [row per m]}: row = {"m", "times_us": {impl: us} (cuBLAS: the faster of its two timings, the best
    candidate: the slower of its two), "cublas_us": [first, second], "repeat_us": {best: [first, second]},
    "spread": the larger relative difference of the two pairs, "errors": {impl: rel err vs cuBLAS},
    "skipped": candidates not timed (time budget)}. Candidates whose kernel is in `failed` (compile signatures)
    are left out, and so are those that fail or disagree with cuBLAS. timer(fn, n_calls) -> us per call (the
    default needs CUDA; tests pass another to run the loop on a CPU)."""
    budget = budget or Budget()
    device = torch.device(device)
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    result = {}
    for s in shapes:
        result[s.key] = _profile_shape(s, shape_ms(s, m_grid), dtype, failed, budget, log, device, num_sms, timer)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # (the shape's weight copies went with _profile_shape's frame)
    return result


def _profile_shape(s: LinearShape, ms: list[int], dtype: torch.dtype, failed: set[tuple], budget: Budget, log,
                   device: torch.device, num_sms: int, timer) -> list[dict]:
    bufs = ShapeBuffers(s, dtype, device)
    inplace = s.op == "linear_residual"  # O and down accumulate into the residual stream (the runner's way)
    rows = []
    for m in ms:
        x, res = bufs.inputs(m)
        scratch = res.clone() if res is not None else None

        def timed(impl):
            return timer(bufs.call(impl, x, scratch, inplace), bufs.n_calls())

        ref = bufs.call("cublas", x, res)(0)
        cublas_first = timed("cublas")
        times, errors, skipped = {}, {}, 0
        for impl in candidates(s.op, s.n, s.k, m, num_sms)[1:]:
            if compile_signature(s.op, s.k, m, impl, s.bias) in failed:
                continue
            if budget.over():
                skipped += 1
                continue
            try:
                out = bufs.call(impl, x, res.clone() if res is not None else None, inplace)(0)
                errors[impl] = err = rel_err(out, ref)
                if not err < 2e-2:  # bf16 rounding is ~4e-3; larger means a broken configuration
                    log(f"  {s.key} m={m} {impl}: rel err {err:.3g} vs cuBLAS, dropped")
                    continue
                times[impl] = timed(impl)
            except Exception as e:  # noqa: BLE001 - a failing candidate is reported and skipped
                log(f"  {s.key} m={m} {impl}: {type(e).__name__}: {str(e)[:200]}")
        cublas = [cublas_first, timed("cublas")]
        times["cublas"] = min(cublas)
        spread = abs(cublas[1] - cublas[0]) / min(cublas)
        repeat = {}
        best = min(times, key=times.get)
        if best != "cublas":  # a potential winner: timed again, its slower time counts
            repeat[best] = [times[best], timed(best)]
            times[best] = max(repeat[best])
            spread = max(spread, abs(repeat[best][1] - repeat[best][0]) / min(repeat[best]))
        rows.append({"m": m, "times_us": times, "cublas_us": cublas, "repeat_us": repeat, "spread": spread,
                     "errors": errors, "skipped": skipped})
        fastest = min(times, key=times.get)
        log(f"{s.key:28s} m={m:5d} cublas {times['cublas']:8.1f} us (spread {spread:5.1%})  fastest {fastest} "
            f"{times[fastest]:8.1f} us" + (f"  [{skipped} not timed: budget]" if skipped else ""))
    return rows


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
                      with_sdpa: bool = True, budget: Budget | None = None, log=print) -> list[dict]:
    """Time each attention tile config (unified path) on both batch shapes of attention_batches(L), L over the
    grid, and torch SDPA's best way of running the same batch (the reference attention_choice compares to).
    Lengths left when the budget is over are not profiled (their rules: the default tiles).

    Row per L: {"L", "batches": {"b1" | "ragged8": {"lengths", "times_us": {config: us}, "errors": {config: rel
    err vs fp32}, "sdpa": (label, us) or None}}, "scores": {config: worst ratio}, "best": config}.
    """
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for length in l_grid:
        if budget is not None and budget.over():
            log(f"attention: time budget spent; L >= {length} keep the default tiles")
            break
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


def pick(times: dict[str, float], spread: float = 0.0, margin: float = 0.01) -> str:
    """The implementation of one profiled point: the fastest, unless it is not faster than cuBLAS by more than
    max(margin, spread) (relative), then cuBLAS, so that neither noise nor the repeat spread ever installs a kernel
    slower than cuBLAS. No cuBLAS time: the fastest."""
    best = min(times, key=times.get)
    if "cublas" in times and times[best] >= times["cublas"] * (1.0 - max(margin, spread)):
        return "cublas"
    return best


def build_rules(points: list[tuple], *, margin: float = 0.01) -> list[tuple[int, str]]:
    """Rules from profiled times: points = [(m, {impl: time}) or (m, {impl: time}, spread)] at increasing m.

    At each m, `pick` chooses; neighbouring points with the same choice merge into one rule, which serves every M
    up to its m (down to the previous rule's).
    """
    rules: list[tuple[int, str]] = []
    for m, times, *rest in sorted(points, key=lambda p: p[0]):
        best = pick(times, rest[0] if rest else 0.0, margin)
        if rules and rules[-1][1] == best:
            rules[-1] = (m, best)
        else:
            rules.append((m, best))
    return rules


def build_table(prof: dict[str, list[dict]], *, gpu: str, dtype: str, margin: float, meta: dict,
                attn_prof: dict[str, list[dict]] | None = None) -> DispatchTable:
    rules = {key: build_rules([(r["m"], r["times_us"], r.get("spread", 0.0)) for r in rows], margin=margin)
             for key, rows in prof.items()}
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
    p.add_argument("--vit", type=int, nargs=3, action="append", default=[], metavar=("WIDTH", "MLP", "ROWS"),
                   help="a vision tower's linears too: width, MLP width, rows per sample (tokens per image x images);"
                        " repeat per tower")
    p.add_argument("--vit-batches", type=int, nargs="+", default=VIT_BATCHES,
                   help="batch sizes the towers are tuned at (M = rows per sample x batch)")
    p.add_argument("--m", type=int, nargs="+", default=M_GRID, help="grid of M (tokens) for the backbone")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--margin", type=float, default=0.01,
                   help="a kernel must beat cuBLAS by this fraction (and by the measured repeat spread)")
    p.add_argument("--only", nargs="+", help="shape names to tune (qkv o gate_up down vit<width>_qkv ...)")
    p.add_argument("--attn-l", type=int, nargs="*", default=ATTN_L_GRID,
                   help="sequence lengths for the attention tile configs (none: skip attention)")
    p.add_argument("--workers", type=int, default=14, help="processes compiling kernels in parallel")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="wall-clock budget of the whole run in seconds (0: none); after it only cuBLAS is timed")
    p.add_argument("--compile-timeout-s", type=float, default=300.0,
                   help="wall limit of the compile phase (with --budget-s: at most half the budget); variants "
                        "without a result by then are dropped")
    p.add_argument("--out", type=Path, help="table path (default: the user's cache, table.user_table_path)")
    args = p.parse_args(argv)
    if args.dims is not None and len(args.dims) not in (3, 4):
        p.error(f"--dims takes hidden intermediate heads [kv_heads]; got {args.dims}")
    if any(v <= 0 for vit in args.vit for v in vit) or any(b <= 0 for b in args.vit_batches):
        p.error(f"--vit values and --vit-batches must be positive; got {args.vit} and {args.vit_batches}")
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
    for width, mlp, rows in args.vit:
        shapes += vit_linear_shapes(width, mlp, rows, args.vit_batches)
    if args.only:
        unknown = sorted(set(args.only) - {s.name for s in shapes})
        if unknown:
            raise SystemExit(f"--only {unknown}: no such shape; valid: {[s.name for s in shapes]}")
        shapes = [s for s in shapes if s.name in args.only]
    return shapes


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    shapes = shapes_from_args(args)
    if not torch.cuda.is_available():
        print("vla-accel-tune needs a CUDA GPU (it times kernels on the current device)", file=sys.stderr)
        return 2
    budget = Budget(args.budget_s)
    dtype = getattr(torch, args.dtype)
    env = environment()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"tuning {[f'{s.name}={s.key}' for s in shapes]} on {env['gpu']} ({num_sms} SMs), backbone M = {args.m}"
          + (f", budget {args.budget_s:.0f} s" if args.budget_s > 0 else ""), flush=True)
    hidden, _, heads, _ = dims_from_args(args)
    head_dim = hidden // heads
    attn_configs = [c.name for c in ATTN_CONFIGS]
    attn_jobs = [CompileJob("attention", heads, head_dim, 128, name, args.dtype) for name in attn_configs
                 if args.attn_l]
    # the Hopper family first, then the attention tiles, then the rest: under the wall limit the last ones may go
    first = {"hopper": 0, "attention": 1}
    jobs = sorted(compile_jobs(shapes, args.m, dtype, num_sms) + attn_jobs,
                  key=lambda j: first.get("attention" if j.op == "attention" else j.impl.partition(":")[0], 2))
    limit = min(args.compile_timeout_s, budget.left() / 2)
    print(f"compiling {len(jobs)} kernel variants in {args.workers} processes (wall limit {limit:.0f} s)", flush=True)
    t0 = time.time()
    failed = precompile(jobs, args.workers, limit)
    print(f"compiled in {time.time() - t0:.0f} s; {len(failed)} variant(s) failed to build or run, their candidates "
          f"are left out", flush=True)
    for job, err in list(failed.items())[:20]:
        print(f"  {job.label}: {err}")
    failed_sigs = {compile_signature(j.op, j.k, j.m, j.impl, j.bias) for j in failed if j.op != "attention"}
    prof = profile(shapes, args.m, dtype, failed=failed_sigs, budget=budget)
    attn_prof = {}
    if args.attn_l:
        ok = [c for c in attn_configs if CompileJob("attention", heads, head_dim, 128, c, args.dtype) not in failed]
        attn_prof[f"d{head_dim}"] = profile_attention(args.attn_l, ok, dtype, heads=heads, head_dim=head_dim,
                                                      budget=budget)
    skipped = sum(r["skipped"] for rows in prof.values() for r in rows)
    table = build_table(prof, gpu=env["gpu"], dtype=args.dtype, margin=args.margin, attn_prof=attn_prof,
                        meta={**env, "m_grid": args.m, "margin": args.margin, "attn_l_grid": args.attn_l,
                              "shapes": {s.name: s.key + ("+bias" if s.bias else "") for s in shapes},
                              "shape_m": {s.name: shape_ms(s, args.m) for s in shapes},
                              "compile_failures": [[j.label, e] for j, e in failed.items()],
                              "budget_s": args.budget_s, "candidates_not_timed_budget": skipped,
                              "elapsed_s": round(time.time() - budget.t0, 1),
                              "timing": "median of 7 replays of a CUDA graph of >= 12 calls, weights rotated; "
                                        "cuBLAS and the fastest candidate timed twice (times_us: cuBLAS's faster, "
                                        "the candidate's slower time)"})
    out = output_path(args, env["gpu"])
    table.save(out)
    print(f"wrote {out} in {time.time() - budget.t0:.0f} s"
          + (f"; {skipped} candidate(s) not timed (budget)" if skipped else ""))
    for key in sorted(table.rules):
        print(f"  {key}: {table.rules[key]}")
        print(f"    switch points: {table.switch_points(key)}")
    for key, rules in table.attention.items():
        print(f"  attention {key}: {rules}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
