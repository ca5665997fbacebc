"""Where the accelerated forward's time goes, on a GPU: kernels, idle gaps, the pruning plan's host path.

    python -m benchmarks.profile_step --trace .devcarry/libero_spatial_t0.npz --out DIR     # GPU only

The 7B architecture with random bf16 weights (as `python -m benchmarks.e2e`). Writes into DIR:
  summary.json     per section: wall ms per call, GPU busy ms per call (union of kernel intervals), idle share
  kernels_<s>.txt  per-kernel CUDA time of the profiled calls of section s (vision / c / d / d_replay)
  host_d.txt       cProfile of the SpecPrune queries (d): the host functions by own time and cumulative time
  ops.json         micro-timings (CUDA-graph replay) of the vision-tower ops and their alternatives
  syncs.txt        every host<->device synchronization of one (c) and one (d) forward, with the call site
                   (torch.cuda.set_sync_debug_mode), counted per site
  trace_c2.json.gz, trace_d2.json.gz  chrome traces of two (c) calls / (d) queries (ui.perfetto.dev)
Sections: vision (the graphed towers + projector), c (accel unpruned), d (accel + SpecPrune, one stream),
d_replay (SpecPrune's token sets replayed by KeepPlan: the executor alone).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _busy_ms(events) -> float:
    """Union of the CUDA kernel intervals (ms)."""
    iv = sorted((e.time_range.start, e.time_range.end) for e in events
                if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    total, cur_s, cur_e = 0.0, None, None
    for s, e in iv:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / 1e3  # us -> ms


def profiled(name: str, fn, calls: int, out: Path, summary: dict, per_call: int = 1, trace: bool = False) -> None:
    """Runs fn() `calls` times under the torch profiler (one synchronize per call): wall, busy, kernel table.
    per_call: forwards one fn() call makes (busy and wall are reported per forward)."""
    from torch.profiler import ProfilerActivity, profile

    _sync()
    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            _sync()
            walls.append((time.perf_counter() - t0) * 1e3 / per_call)
    busy = _busy_ms(prof.events()) / (calls * per_call)
    wall = float(np.median(walls))
    avgs = prof.key_averages()
    summary[name] = {"calls": calls, "wall_ms_median": wall, "wall_ms_mean": float(np.mean(walls)),
                     "gpu_busy_ms_per_call": busy, "idle_share": 1 - busy / float(np.mean(walls))}
    key = "self_cpu_time_total"
    if torch.cuda.is_available():
        key = "device_time_total" if avgs and hasattr(avgs[0], "device_time_total") else "cuda_time_total"
    table = avgs.table(sort_by=key, row_limit=60, max_name_column_width=90)
    (out / f"kernels_{name}.txt").write_text(table)
    cpu_table = avgs.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90)
    (out / f"host_{name}_ops.txt").write_text(cpu_table)
    if trace:
        import gzip
        import os
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            f = os.path.join(tmp, "t.json")
            prof.export_chrome_trace(f)
            with open(f, "rb") as src, gzip.open(out / f"trace_{name}.json.gz", "wb") as dst:
                dst.write(src.read())
    print(f"[{name}] wall {wall:.2f} ms, GPU busy {busy:.2f} ms per call", flush=True)


def sync_audit(fns: dict, path: Path) -> dict:
    """Runs each fn once with torch's sync debug mode on; records the call site (last frames inside this
    project) of every synchronizing CUDA call. -> {name: {site: count}}."""
    import traceback
    import warnings

    found: dict = {}
    for name, fn in fns.items():
        sites: dict = {}

        def show(message, category, filename, lineno, file=None, line=None, _sites=sites):
            frames = [f for f in traceback.extract_stack()[:-1]
                      if "/vla_accel/" in f.filename or "/kernels/" in f.filename]
            key = " <- ".join(f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
                              for f in reversed(frames[-4:])) or f"{filename}:{lineno}"
            _sites[key] = _sites.get(key, 0) + 1

        _sync()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode(1)
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        found[name] = sites
    lines = []
    for name, sites in found.items():
        lines.append(f"== {name}: {sum(sites.values())} synchronizing calls")
        lines += [f"{n:4d}  {k}" for k, n in sorted(sites.items(), key=lambda kv: -kv[1])]
    path.write_text("\n".join(lines) + "\n")
    return {name: sum(s.values()) for name, s in found.items()}


def attention_ops(runner) -> dict:
    """Backbone attention (32 heads x 128) at B = 1: the kernels' attention vs torch SDPA on the dense view."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    res = {}
    H, d = runner.H, runner.D // runner.H
    for S in (208, 608):
        q, k, v = (torch.randn(S, H, d, device=runner.device, dtype=runner.dtype) for _ in range(3))
        cu = torch.tensor([0, S], dtype=torch.int32, device=runner.device)
        r = {"kernels": graph_time_us(lambda: runner.ops.attention(q, k, v, cu, S, backend="kernels")),
             "flash_varlen": graph_time_us(lambda: runner.ops.attention(q, k, v, cu, S, backend="flash"))}
        q4, k4, v4 = (t[None].transpose(1, 2) for t in (q, k, v))
        for name, be in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel([be]):
                    r[name] = graph_time_us(lambda: F.scaled_dot_product_attention(q4, k4, v4))
            except Exception as err:  # noqa: BLE001
                r[name] = f"failed: {type(err).__name__}: {err}"[:200]
        res[f"S{S}"] = r
    return res


def gemm_split_ops(runner) -> dict:
    """The N = 4096 backbone GEMMs (O: K 4096, down: K 11008) with the residual, at the token counts pruning
    leaves: cuBLAS in place vs the same GEMM split along K over two CUDA streams (two half-K GEMMs in parallel,
    then one add): twice the thread blocks streaming the weight."""
    from .roofline import floor_ms

    res = {}
    dev, dt = runner.device, runner.dtype
    side = torch.cuda.Stream(dev)
    for name, K in (("o", 4096), ("down", 11008)):
        w = torch.randn(4096, K, device=dev, dtype=dt) * 0.02
        for M in (160, 208, 304, 608):
            x = torch.randn(M, K, device=dev, dtype=dt)
            h = torch.randn(M, 4096, device=dev, dtype=dt)
            part = torch.empty(M, 4096, device=dev, dtype=dt)
            k2 = K // 2

            def split2():
                main = torch.cuda.current_stream(dev)
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    torch.mm(x[:, k2:], w[:, k2:].t(), out=part)
                h.addmm_(x[:, :k2], w[:, :k2].t())
                main.wait_stream(side)
                h.add_(part)

            fl = 2 * M * 4096 * K
            nb = 2 * (4096 * K + M * K + 2 * M * 4096)
            r = {"floor_us": 1e3 * floor_ms(nb, fl),
                 "inplace": graph_time_us(lambda: h.addmm_(x, w.t())),
                 "outofplace": graph_time_us(lambda: torch.addmm(h, x, w.t())),
                 "ksplit2_streams": graph_time_us(split2)}
            try:
                torch.backends.cuda.preferred_blas_library("cublaslt")
                r["inplace_cublaslt"] = graph_time_us(lambda: h.addmm_(x, w.t()))
            except Exception as err:  # noqa: BLE001
                r["inplace_cublaslt"] = f"failed: {type(err).__name__}: {err}"[:200]
            finally:
                torch.backends.cuda.preferred_blas_library("cublas")
            if runner.ops.K is not None:
                r["dispatched"] = graph_time_us(lambda: runner.ops.linear_residual(x, w, h))
            res[f"{name}_M{M}"] = r
    return res


def host_breakdown(policy, runner, cfg, trace, steps, dev) -> dict:
    """ms per (d) query spent in the plan's and the runner's host methods (no profiler attached)."""
    from vla_accel.prune.plan import PrunePlan
    from vla_accel.runtime.graphs import GraphCache
    from vla_accel.runtime.runner import AccelRunner

    from .e2e import MethodTimer, run_specprune

    targets = [(PrunePlan, n) for n in ("keep", "rows", "scores", "_read", "_flush", "_drop",
                                        "_static_stage", "_scores", "_update_importance", "__init__", "summary")]
    targets += [(AccelRunner, n) for n in ("forward", "_vision", "_assemble", "_decide", "_pack", "_fill_sel",
                                           "_key_mass", "_segment", "_head")]
    targets += [(GraphCache, "run")]
    with MethodTimer(targets) as t:
        run = run_specprune(policy, runner, cfg, trace, steps, 1, 7, dev)
    out = {k: {"ms_per_query": round(v / steps, 4), "calls_per_query": t.calls[k] / steps}
           for k, v in sorted(t.ms.items(), key=lambda kv: -kv[1])}
    out["_latency_ms_median"] = float(np.median(run["lat"]))
    return out


def write_ops(out: Path, runner) -> None:
    """ops.json: the towers' ops, the backbone attention and the N = 4096 GEMMs with their alternatives."""
    ops = {"vision": vision_ops(runner), "backbone_attention": attention_ops(runner),
           "gemm_split": gemm_split_ops(runner)}
    (out / "ops.json").write_text(json.dumps(ops, indent=1) + "\n")


def graph_time_us(fn, reps: int = 20) -> float:
    """fn() captured `reps` times in one CUDA graph: median us per call over 10 replays (the kernels' timer)."""
    from vla_accel.kernels.timing import time_graph_us

    return time_graph_us(lambda i: fn(), reps, reps=10)


def vision_ops(runner) -> dict:
    """Per-op timings of one block of each tower at the policy's shapes (B = 1: 2 images), with alternatives."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    res = {}
    m, ops = runner.model, runner.ops
    for tag, vit in (("dino", m.vision_backbone.featurizer), ("siglip", m.vision_backbone.fused_featurizer)):
        c = vit.cfg
        blk = vit.blocks[0]
        S = c.num_patches + (1 if c.class_token else 0) + c.num_registers
        N, w, H = 2, c.width, c.heads
        d = w // H
        x = torch.randn(N * S, w, device=runner.device, dtype=runner.dtype)
        r = {"rows": N * S, "width": w, "heads": H, "head_dim": d}
        r["layer_norm"] = graph_time_us(lambda: F.layer_norm(x, (w,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps))
        r["qkv"] = graph_time_us(lambda: ops.linear(x, blk.attn.qkv.weight, blk.attn.qkv.bias))
        r["qkv_cublas"] = graph_time_us(lambda: F.linear(x, blk.attn.qkv.weight, blk.attn.qkv.bias))
        qkv = F.linear(x, blk.attn.qkv.weight, blk.attn.qkv.bias).view(N * S, 3, H, d)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        cu = torch.arange(0, (N + 1) * S, S, device=x.device, dtype=torch.int32)
        for be in ("flash", "sdpa_dense", "kernels"):
            try:
                r[f"attn_{be}"] = graph_time_us(lambda: ops.attention(q, k, v, cu, S, backend=be))
            except Exception as err:  # noqa: BLE001
                r[f"attn_{be}"] = f"failed: {type(err).__name__}: {err}"[:200]
        q4, k4, v4 = (t.reshape(N, S, H, d).transpose(1, 2) for t in (q, k, v))
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                         ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel([be]):
                    r[f"attn_sdpa_{name}"] = graph_time_us(lambda: F.scaled_dot_product_attention(q4, k4, v4))
            except Exception as err:  # noqa: BLE001
                r[f"attn_sdpa_{name}"] = f"failed: {type(err).__name__}: {err}"[:200]
            try:  # contiguous [N, H, S, d] inputs (what a fused qkv split could write)
                qc, kc, vc = q4.contiguous(), k4.contiguous(), v4.contiguous()
                with sdpa_kernel([be]):
                    r[f"attn_sdpa_{name}_contig"] = graph_time_us(lambda: F.scaled_dot_product_attention(qc, kc, vc))
            except Exception as err:  # noqa: BLE001
                r[f"attn_sdpa_{name}_contig"] = f"failed: {type(err).__name__}: {err}"[:200]
        o = torch.randn(N * S, w, device=x.device, dtype=x.dtype)
        r["proj"] = graph_time_us(lambda: ops.linear(o, blk.attn.proj.weight, blk.attn.proj.bias))
        if c.layer_scale:
            r["addcmul"] = graph_time_us(lambda: torch.addcmul(x, o, blk.ls1.scale_factor))
        h1 = ops.linear(x, blk.mlp.fc1.weight, blk.mlp.fc1.bias)
        r["fc1"] = graph_time_us(lambda: ops.linear(x, blk.mlp.fc1.weight, blk.mlp.fc1.bias))
        r["fc1_cublas"] = graph_time_us(lambda: F.linear(x, blk.mlp.fc1.weight, blk.mlp.fc1.bias))
        r["gelu"] = graph_time_us(lambda: F.gelu(h1))
        wt = blk.mlp.fc1.weight.t()
        r["fc1_gelu_epilogue_tanh"] = graph_time_us(
            lambda: torch._addmm_activation(blk.mlp.fc1.bias, x, wt, use_gelu=True))
        exact = F.gelu(F.linear(x.float(), blk.mlp.fc1.weight.float(), blk.mlp.fc1.bias.float()))
        epi = torch._addmm_activation(blk.mlp.fc1.bias, x, wt, use_gelu=True).float()
        sep = F.gelu(F.linear(x, blk.mlp.fc1.weight, blk.mlp.fc1.bias)).float()
        r["fc1_gelu_epilogue_relerr_vs_fp32_exact"] = float((epi - exact).norm() / exact.norm())
        r["fc1_gelu_separate_relerr_vs_fp32_exact"] = float((sep - exact).norm() / exact.norm())
        g1 = F.gelu(h1)
        r["fc2"] = graph_time_us(lambda: ops.linear(g1, blk.mlp.fc2.weight, blk.mlp.fc2.bias))
        r["fc2_cublas"] = graph_time_us(lambda: F.linear(g1, blk.mlp.fc2.weight, blk.mlp.fc2.bias))
        res[tag] = r
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default=".devcarry/libero_spatial_t0.npz")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=16, help="SpecPrune steps under cProfile")
    p.add_argument("--runtime", default="{}", help="JSON overrides of the accel RuntimeConfig")
    p.add_argument("--preset", default="7b", help="7b | tiny (tiny + --device cpu: a smoke run of this script)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--ops-only", action="store_true", help="only the op micro-timings (ops.json)")
    a = p.parse_args(argv)
    import vla_accel
    from vla_accel.runtime import AccelRunner, RuntimeConfig

    from .e2e import WordTokenizer, cache_prepare, load_trace_npz, observations, prune_config, run_replay, run_specprune

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    trace = load_trace_npz(a.trace)
    policy = vla_accel.random_policy(a.preset, device=dev, dtype=dtype, seed=0)
    policy.tokenizer = WordTokenizer()
    cache_prepare(policy)
    runner = AccelRunner(policy.model, RuntimeConfig.from_dict({"name": "accel", "profile": True,
                                                                **({} if cuda else {"on_cpu": "emulate"}),
                                                                **json.loads(a.runtime)}))
    policy = policy.with_executor(runner)
    summary: dict = {"runtime": runner.describe()}

    if a.ops_only:
        write_ops(out, runner)
        return
    inputs = [policy.prepare([observations(trace, t)], [trace["instruction"]])
              for t in range(min(8, len(trace["state"])))]
    for ids, pix, prop in inputs[:3]:
        policy.predict_from_inputs(ids, pix, prop)
    _sync()

    # ---- vision alone (graphed), then (c)
    pix = inputs[0][1].to(dev, dtype)
    prop = inputs[0][2].to(dev, dtype)

    def call_vision():
        with torch.inference_mode():
            runner._vision(pix, prop, True)

    profiled("vision", call_vision, 10, out, summary)
    it = iter(range(10 ** 9))

    def call_c():
        i = next(it) % len(inputs)
        policy.predict_from_inputs(*inputs[i])

    profiled("c", call_c, 10, out, summary)
    if cuda:
        profiled("c2", call_c, 2, out, summary, trace=True)

    # ---- (d): warm-up pass (captures), cProfile pass, profiler pass, replay
    cfg = prune_config(None)
    steps = min(a.steps, len(trace["state"]))
    run_specprune(policy, runner, cfg, trace, steps, 1, 7, dev)
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    run = run_specprune(policy, runner, cfg, trace, steps, 1, 7, dev, keep_replay=True)
    pr.disable()
    summary["d_cprofile"] = {"steps": steps, "wall_ms_per_step": (time.perf_counter() - t0) * 1e3 / steps,
                             "latency_ms_median": float(np.median(run["lat"])),
                             "hook_host_ms_median": float(np.median(run["hook_ms"]))}
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.sort_stats("tottime").print_stats(45)
    st.sort_stats("cumulative").print_stats(60)
    (out / "host_d.txt").write_text(s.getvalue())

    if cuda:
        summary["syncs"] = sync_audit({"c": call_c, "d": lambda: run_specprune(policy, runner, cfg, trace, 2, 1, 7,
                                                                                dev)}, out / "syncs.txt")
        profiled("d2", lambda: run_specprune(policy, runner, cfg, trace, 2, 1, 7, dev), 1, out, summary, 2,
                 trace=True)
    summary["d_host_breakdown"] = host_breakdown(policy, runner, cfg, trace, steps, dev)
    n_d = min(8, steps)  # whole-run wall per query includes the actor's host work around the forward
    profiled("d", lambda: run_specprune(policy, runner, cfg, trace, n_d, 1, 7, dev), 1, out, summary, n_d)
    replay = run["replay"][:8]
    profiled("d_replay", lambda: run_replay(policy, runner, replay, trace["instruction"], dev), 1, out, summary,
             len(replay))

    # ---- vision op micro-timings
    try:
        if not cuda:
            raise RuntimeError("op micro-timings need CUDA graphs (GPU only)")
        summary["ops_note"] = "see ops.json"
        write_ops(out, runner)
    except Exception as err:  # noqa: BLE001
        import traceback

        (out / "ops_error.txt").write_text(traceback.format_exc())
        print(f"[ops] FAILED: {err}", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
