"""vla-accel-serve under load: N websocket clients replaying a LIBERO trace against the server, versus the same
actor called in-process with all N streams in one batch (the runtime benchmark's figure (e)), in one run.

    python benchmarks/serve_bench.py --trace .devcarry/libero_spatial_t0.npz --out $OUT/serve   # GPU, 7B
    python benchmarks/serve_bench.py --trace T.npz --preset tiny --device cpu --steps 4 --clients 2 --out /tmp/sb

Both sides: the real 7B architecture with RANDOM bf16 weights, runtime=accel, prune=specprune
(configs/prune/specprune.yaml), mode=chunk (each request gets the whole chunk; SpecPrune's history per stream).
- in-process: one `actor.chunk_batch` per trace step over `--clients` streams (stream s lags by s * offset
  steps), inputs pre-processed beforehand (not timed), as figure (e); chunks/s = clients / median call time.
  It runs in a thread of its own, as the server's model thread does.
- served: the server in this process (uvicorn, one model thread, max batch = clients), one pass per batch
  window in `--windows-ms`, the clients in `--clients` separate processes (openpi msgpack-numpy over websockets
  on loopback), each sending its trace frames back to back; chunks/s = answers / wall time of the timed pass,
  latency p50 / p99 per request at the client. Both sides run a warm-up pass over the same frames first (CUDA
  graph captures; the runtime gets graphs for every batch size 1..clients: the server also forms partial batches).
- in-process with pre-processing in the call: for context (the server pre-processes in `--prep-threads` threads).
Target (issue 16): served chunks/s (best window) >= 85% of figure (e). Writes serve_bench.json / .md into --out.
Needs uvicorn, starlette, websockets (not on the GPU image: carry them as wheels, docs/serving.md).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.85


def read_trace(path: str) -> dict:
    """The trace's arrays (layout of vla_accel.envs.trace; read directly: vla_accel.envs needs the simulator stack,
    which the GPU image lacks)."""
    with np.load(path, allow_pickle=False) as d:
        trace = {k: d[k] for k in ("full_image", "wrist_image", "state", "action")}
        trace["instruction"] = str(d["instruction"])
    return trace


def trace_obs(trace: dict, t: int) -> dict:
    return {"full_image": trace["full_image"][t], "wrist_image": trace["wrist_image"][t], "state": trace["state"][t]}


def stats(xs) -> dict:
    a = np.asarray(xs, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "median": float(np.median(a)), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


# ---- clients (separate processes) --------------------------------------------------------------------------
def client_main(url: str, trace_path: str, client: int, offset: int, steps: int, start, results):
    """One openpi-style client: connect, read metadata, a warm-up pass over its `steps` frames, reset, the same
    frames again timed (same SpecPrune history, so the same token buckets: graphs are captured in the warm-up)."""
    from websockets.sync.client import connect

    from vla_accel.serve.codec import packb, unpackb

    trace = read_trace(trace_path)
    T = len(trace["state"])
    out = {"client": client, "lat_ms": [], "timing": [], "errors": [], "t_first": None, "t_last": None}
    try:
        with connect(url, compression=None, max_size=None, proxy=None, open_timeout=120) as ws:
            unpackb(ws.recv(timeout=120))
            for i in range(2 * steps):
                if i == steps:
                    ws.send(packb({"__ctrl__": "reset"}))
                    ws.recv(timeout=120)
                    start.wait()  # all clients start the timed pass together
                t = (client * offset + i % steps) % T
                msg = packb({**trace_obs(trace, t), "instruction": trace["instruction"]})
                t0 = time.perf_counter()
                ws.send(msg)
                reply = ws.recv(timeout=300)
                t1 = time.perf_counter()
                if isinstance(reply, str):
                    out["errors"].append(reply[:300])
                    continue
                r = unpackb(reply)
                if i >= steps:
                    out["t_first"] = out["t_first"] or t0
                    out["t_last"] = t1
                    out["lat_ms"].append((t1 - t0) * 1e3)
                    out["timing"].append(r["server_timing"])
    except Exception as err:  # noqa: BLE001 - reported in the results
        out["errors"].append(f"{type(err).__name__}: {err}")
    results.put(out)


# ---- the policy / actor ------------------------------------------------------------------------------------
def build_actor(policy, prune_cfg: dict):
    from vla_accel.prune import make_actor

    return make_actor(policy, prune_cfg)


def load_prune_cfg(path: str | None) -> dict:
    import yaml

    with open(path or ROOT / "configs" / "prune" / "specprune.yaml") as f:
        return yaml.safe_load(f)


def word_tokenizer():
    """The end-to-end benchmark's stand-in for the Llama-2 tokenizer (random weights: the token COUNT matters); it
    lives in vla_accel.runtime.bench, or in benchmarks/e2e.py once the benchmarks leave the package."""
    for module in ("vla_accel.runtime.bench", "benchmarks.e2e", "e2e"):
        try:
            return __import__(module, fromlist=["WordTokenizer"]).WordTokenizer()
        except (ImportError, AttributeError):
            continue
    print("WARNING: no WordTokenizer found; prompts use the random policy's byte tokenizer (longer prompts, "
          "the same on both sides)", flush=True)
    return None


def captures(policy) -> int | None:
    """Graphs captured so far by the accelerated runner (None where the executor has no graph cache)."""
    graphs = getattr(getattr(policy, "executor", None), "graphs", None)
    return getattr(graphs, "captures", None)


def inprocess(actor, policy, trace: dict, clients: int, offset: int, steps: int, prepared: bool = True) -> dict:
    """Figure (e) through chunk_batch: one batched SpecPrune query per step over `clients` streams; a warm-up
    pass over the same frames first (graph captures), as the runtime benchmark does. prepared=True: the inputs
    are pre-processed beforehand and not timed (as (e)); False: the call pre-processes them (one thread)."""
    import torch

    T = len(trace["state"])
    frames = [trace_obs(trace, t) for t in range(T)]
    text = trace["instruction"]
    own = policy.prepare
    if prepared:
        memo = {t: own([frames[t]], [text]) for t in range(T)}
        index = {id(f): t for t, f in enumerate(frames)}

        def cached(obs_list, instructions):
            parts = [memo[index[id(o)]] if id(o) in index else own([o], [i]) for o, i in zip(obs_list, instructions)]
            return [p[0][0] for p in parts], torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])

        policy.prepare = cached
    streams = list(range(clients))
    lat, caps = [], None
    try:
        for timed in (False, True):
            actor.reset(streams)
            caps = captures(policy)
            for i in range(steps):
                obs = [frames[(s * offset + i) % T] for s in streams]
                t0 = time.perf_counter()
                actor.chunk_batch(obs, [text] * clients, streams)
                if timed:
                    lat.append((time.perf_counter() - t0) * 1e3)
    finally:
        if prepared:
            del policy.prepare  # the policy's own method again
    s = stats(lat)
    after = captures(policy)
    return {"latency_ms": s, "chunks_per_s": clients * 1e3 / s["median"],
            "captures_during_timed_pass": None if after is None else after - caps}


def in_thread(fn, *args):
    """fn(*args) in a new thread, as the server's model thread runs the actor (on a loaded CPU host the main
    thread measured 6-8x slower than another thread for the same calls; the GPU run should show no difference)."""
    out = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller
            out["error"] = err

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def served(actor, args, trace_path: str, window_ms: float, port: int) -> dict:
    from vla_accel.serve import ServeConfig, serve

    cfg = ServeConfig(host="127.0.0.1", port=port, mode="chunk", max_batch=args.clients,
                      batch_window_ms=window_ms, prep_threads=args.prep_threads, max_sessions=args.clients + 4)
    holder, ready = {}, threading.Event()

    def on_ready(server):
        holder["server"] = server
        ready.set()

    thread = threading.Thread(target=serve, args=(actor, cfg), kwargs={"on_ready": on_ready}, daemon=True)
    thread.start()
    if not ready.wait(120):
        raise RuntimeError("the server did not start within 120 s")
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(args.clients), ctx.Queue()
    procs = [ctx.Process(target=client_main, args=(f"ws://127.0.0.1:{port}", trace_path, c, args.offset,
                                                   args.steps, start, results)) for c in range(args.clients)]
    for p in procs:
        p.start()
    outs = [results.get(timeout=args.client_timeout_s) for _ in procs]
    for p in procs:
        p.join(30)
    engine_batches = None
    metrics_text = ""
    try:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            metrics_text = r.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=10) as r:
            engine_batches = json.loads(r.read())["batches"]
    finally:
        holder["server"].should_exit = True
        thread.join(60)
    errors = [e for o in outs for e in o["errors"]]
    lat = [x for o in outs for x in o["lat_ms"]]
    timing = [x for o in outs for x in o["timing"]]
    t_first = min(o["t_first"] for o in outs if o["t_first"]) if lat else None
    t_last = max(o["t_last"] for o in outs if o["t_last"]) if lat else None
    wall = (t_last - t_first) if lat else float("nan")
    return {
        "window_ms": window_ms, "answers": len(lat), "expected_answers": args.clients * args.steps,
        "errors": errors[:10],
        "wall_s": wall, "chunks_per_s": len(lat) / wall if lat else 0.0, "latency_ms": stats(lat),
        "server_timing_ms": {k: stats([x[k] for x in timing]) for k in ("prep_ms", "queue_ms", "compute_ms",
                                                                       "infer_ms")},
        "batch_size": stats([x["batch_size"] for x in timing]),
        "forwards_total_incl_warmup": engine_batches,
        "batch_size_histogram": [line for line in metrics_text.splitlines()
                                 if line.startswith("vla_serve_batch_size_bucket")],
    }


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default=".devcarry/libero_spatial_t0.npz")
    p.add_argument("--out", default=None, help="folder for serve_bench.json / serve_bench.md")
    p.add_argument("--preset", default="7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--offset", type=int, default=7, help="trace steps between consecutive clients' streams")
    p.add_argument("--steps", type=int, default=40, help="trace steps per client (and in-process), each run twice: "
                                                          "warm-up pass, then the timed pass")
    p.add_argument("--windows-ms", default="0,20",
                   help="serve.batch_window_ms values, one served pass each (a full batch goes at once; 0: a batch "
                        "of whatever is ready as soon as the model thread is free)")
    p.add_argument("--prep-threads", type=int, default=8, help="serve.prep_threads")
    p.add_argument("--port", type=int, default=18777)
    p.add_argument("--prune-config", default=None, help="default: configs/prune/specprune.yaml")
    p.add_argument("--runtime", default="{}", help="JSON overrides of the accel runtime settings")
    p.add_argument("--client-timeout-s", type=float, default=300.0)
    p.add_argument("--commit", default="")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    import vla_accel
    from vla_accel.runtime import make_executor

    t_start = time.perf_counter()
    trace = read_trace(args.trace)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy = vla_accel.random_policy(args.preset, device=device, dtype=dtype, seed=0)
    tok = word_tokenizer()
    if tok is not None:
        policy.tokenizer = tok
    # graphs for every batch size the server may form (a partial batch would otherwise run eagerly)
    runtime = {"name": "accel", "capture_fallback": True, "batch_sizes": list(range(1, args.clients + 1)),
               **json.loads(args.runtime)}
    policy = make_executor(policy, runtime) or policy
    prune_cfg = load_prune_cfg(args.prune_config)
    build_s = time.perf_counter() - t_start
    print(f"built {args.preset} on {device} in {build_s:.1f} s; tokenizer {getattr(policy.tokenizer, 'name', '?')}",
          flush=True)

    res: dict = {"errors": {}, "served": []}
    for key, prepared in (("inprocess", True), ("inprocess_with_prep", False)):
        try:
            r = res[key] = in_thread(inprocess, build_actor(policy, prune_cfg), policy, trace, args.clients,
                                     args.offset, args.steps, prepared)
            print(f"{key}: {r['chunks_per_s']:.1f} chunks/s (median {r['latency_ms']['median']:.2f} ms per batch of "
                  f"{args.clients})", flush=True)
        except Exception as err:  # noqa: BLE001 - the other runs still run
            res["errors"][key] = f"{type(err).__name__}: {err}"
            print(f"{key} FAILED: {err}", flush=True)
    for i, window in enumerate(float(w) for w in args.windows_ms.split(",") if w.strip()):
        try:
            caps = captures(policy)
            sv = served(build_actor(policy, prune_cfg), args, args.trace, window, args.port + i)
            sv["captures_incl_warmup"] = None if caps is None else captures(policy) - caps
            res["served"].append(sv)
            lat = sv["latency_ms"]
            print(f"served, window {window:g} ms: {sv['chunks_per_s']:.1f} chunks/s, p50 {lat.get('p50', -1):.1f} ms, "
                  f"p99 {lat.get('p99', -1):.1f} ms, {sv['answers']}/{sv['expected_answers']} answers, errors "
                  f"{sv['errors'][:2]}", flush=True)
        except Exception as err:  # noqa: BLE001
            res["errors"][f"served_{window:g}ms"] = f"{type(err).__name__}: {err}"
            print(f"served (window {window:g} ms) FAILED: {err}", flush=True)
    complete = [sv for sv in res["served"] if sv["answers"] == sv["expected_answers"]]
    if "inprocess" in res and complete:
        best = max(complete, key=lambda sv: sv["chunks_per_s"])
        ratio = best["chunks_per_s"] / res["inprocess"]["chunks_per_s"]
        res["target"] = {"served_over_inprocess": ratio, "required": TARGET, "met": ratio >= TARGET,
                         "window_ms": best["window_ms"], "p99_ms": best["latency_ms"]["p99"]}
    res["env"] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": args.commit,
        "torch": torch.__version__, "python": platform.python_version(), "preset": args.preset,
        "dtype": str(dtype).replace("torch.", ""), "trace": args.trace, "steps": len(trace["state"]),
        "instruction": trace["instruction"], "tokenizer": getattr(policy.tokenizer, "name", "?"),
        "build_s": round(build_s, 1), "total_s": round(time.perf_counter() - t_start, 1), "args": vars(args),
        "policy": policy.describe(),
    }
    table = markdown(res)
    print(table, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "serve_bench.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        (out / "serve_bench.md").write_text(table + "\n")
    return res


def markdown(res: dict) -> str:
    env = res["env"]
    a = env["args"]
    lines = [f"# vla-accel-serve: {a['clients']} websocket clients vs in-process batch ({env['preset']}, random "
             f"{env['dtype']} weights, accel + SpecPrune, mode=chunk)", "",
             f"device: {env['device']} | date: {env['date']} | commit: {env['commit']} | torch {env['torch']} | "
             f"trace: {env['steps']} steps of {env['trace']} | {a['steps']} timed requests per client after a "
             "warm-up pass over the same frames", "",
             "| configuration | chunks/s | latency p50 ms | p90 ms | p99 ms | server: prep / queue / compute ms "
             "(medians) | batch size mean |", "|---|---|---|---|---|---|---|"]
    for key, label in (("inprocess", "figure (e): pre-processing not timed"),
                       ("inprocess_with_prep", "pre-processing in the call, one thread")):
        if key in res:
            r, lat = res[key], res[key]["latency_ms"]
            lines.append(f"| in-process chunk_batch x {a['clients']} streams, {label} | {r['chunks_per_s']:.1f} | "
                         f"{lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | - | {a['clients']} |")
    for r in res["served"]:
        lat, st = r["latency_ms"], r["server_timing_ms"]
        if lat.get("n"):
            lines.append(f"| served: {a['clients']} clients (websocket + msgpack, loopback), window "
                         f"{r['window_ms']:g} ms; latency per request at the client | {r['chunks_per_s']:.1f} | "
                         f"{lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | {st['prep_ms']['median']:.2f} / "
                         f"{st['queue_ms']['median']:.2f} / {st['compute_ms']['median']:.2f} | "
                         f"{r['batch_size']['mean']:.2f} |")
        if r["answers"] != r["expected_answers"] or r["errors"]:
            lines.append(f"| ... window {r['window_ms']:g} ms: {r['answers']}/{r['expected_answers']} answers, errors "
                         f"{r['errors'][:2]} | | | | | | |")
    if "target" in res:
        t = res["target"]
        lines += ["", f"Target: served >= {t['required']:.0%} of in-process (e) chunks/s: "
                      f"{t['served_over_inprocess']:.1%} (window {t['window_ms']:g} ms, p99 {t['p99_ms']:.1f} ms) -> "
                      f"{'met' if t['met'] else 'NOT met'}"]
    if res["errors"]:
        lines += ["", f"Errors: {res['errors']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
