"""End-to-end benchmark: a recorded LIBERO trace through the OFT policy on five executors.

    python -m benchmarks.e2e --trace .devcarry/libero_spatial_t0.npz --out benchmarks/results/e2e
    python -m benchmarks.e2e --preset tiny --device cpu --steps 4 --allow-short      # smoke run, no GPU

Per step of the trace (real simulator frames, both cameras) one policy call `predict_from_inputs` (the
image pre-processing, identical for all, is done before and not timed), configurations:
  (a) stock: transformers' LlamaModel (SDPA, explicit bidirectional 4-D mask, eager) + plain towers / head
  (b) reference: the plain PyTorch model of this project, unpruned
  (c) accel: AccelRunner (our kernels, fused ops, CUDA graphs), unpruned
  (d) accel + SpecPrune (configs/prune/specprune.yaml: the paper's defaults), one stream
  (e) accel + SpecPrune, `--streams` trace streams in one batch (ragged kept counts), chunks/s
  peer (--peer, off by default: ~90 s of compilation per shape on an H200): the strongest off-the-shelf
      backbone, the stock transformers Llama body (weights shared) on one sequence of the (d) token count (its
      mean, ~199) and of the (c) count (~602): under torch.compile(mode="max-autotune"), compiled once per shape
      (compile time reported), and eager captured in one CUDA graph; compared with our backbone split of (d)/(c)
Reported per configuration: chunk latency median / p90 (wall clock of the call incl. the host->device copy
of the inputs and a final synchronize), the vision / backbone / head split (CUDA events), backbone tokens
(mean rows per layer and sample), and the roofline floor at those token counts (roofline.py), from the copy
bandwidth and bf16 matmul rate measured on the device at the start of the run (both in the result file; the
H100 constants only on a CPU or if the measurement fails).
Checks: (c) and (d) against the reference path (d: the same pruning decisions replayed through the reference
with KeepPlan), per chunk rel-L2 of the normalized actions <= --tol, and on a few steps against an fp32
evaluation of the reference (accel error <= 2 x reference-bf16 error + 1e-3).
The model has the real 7B architecture with RANDOM bf16 weights (timings do not depend on the values);
prompts are tokenized by a word-level stand-in for the Llama tokenizer (one id per word / punctuation mark,
about the Llama-2 token count of a LIBERO instruction).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import sys
import time
import traceback
import zlib
from pathlib import Path

import numpy as np
import torch

CONFIGS = ("a", "b", "c", "d", "e")
PEER_MODES = {"ma": "max-autotune", "graph": "one CUDA graph"}  # key part -> what the peer config runs
LABELS = {"a": "(a) stock: HF LlamaModel + SDPA, eager", "b": "(b) reference, unpruned",
          "c": "(c) accel, unpruned", "d": "(d) accel + SpecPrune", "e": "(e) accel + SpecPrune, batched"}


class WordTokenizer:
    """Stand-in for the Llama-2 tokenizer with random weights: BOS, then one id per word or punctuation mark
    (the token COUNT is what matters for timing; a typical LIBERO prompt gives ~31 ids vs ~35 for Llama-2)."""

    name = "word-stand-in"

    def encode(self, text: str) -> list[int]:
        return [1] + [3 + zlib.crc32(w.encode()) % 31000 for w in re.findall(r"\w+|[^\w\s]|\n", text)]


# ---------------------------------------------------------------------------- timing helpers
class Marks:
    """Split points of one call: CUDA events on a GPU, host clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.t: list = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.t.append(e)
        else:
            self.t.append(time.perf_counter())

    def split(self, names=("vision", "backbone", "head")) -> dict:
        if self.cuda:
            self.t[-1].synchronize()
            d = [a.elapsed_time(b) for a, b in zip(self.t[:-1], self.t[1:])]
        else:
            d = [(b - a) * 1e3 for a, b in zip(self.t[:-1], self.t[1:])]
        return dict(zip(names, d))


class SplitExecutor:
    """(a) / (b): the model's own pieces with split marks; `backbone(seq, decisions)` -> final-norm hidden."""

    def __init__(self, model, backbone):
        self.model, self.backbone, self.last = model, backbone, None

    @torch.inference_mode()
    def describe(self) -> dict:
        return {"executor": "reference-split"}

    def __call__(self, input_ids, pixel_values, proprio, prompt_lens=None, decisions=None):
        m = self.model
        marks = Marks(pixel_values.device)
        marks.mark()
        feats = m.encode_images(pixel_values)
        marks.mark()
        seq = m.assemble(input_ids, prompt_lens, feats, proprio)
        hidden, key_mask = self.backbone(seq, decisions)
        marks.mark()
        act_h = m.action_window(hidden, key_mask)
        out = m.action_head(act_h).float()
        marks.mark()
        self.last = marks
        return out, act_h

    def split_ms(self):
        return self.last.split() if self.last is not None else None


class Capture:
    """Wraps an executor: keeps the inputs and outputs of its last call (for the equivalence checks)."""

    def __init__(self, inner):
        self.inner, self.last = inner, None

    def describe(self) -> dict:
        return self.inner.describe()

    def __call__(self, input_ids, pixel_values, proprio, prompt_lens=None, decisions=None):
        out = self.inner(input_ids, pixel_values, proprio, prompt_lens=prompt_lens, decisions=decisions)
        self.last = {"args": (input_ids, pixel_values, proprio, prompt_lens), "decisions": decisions, "out": out}
        return out

    def split_ms(self):
        return self.inner.split_ms()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stats(xs) -> dict:
    a = np.asarray(xs, dtype=np.float64)
    if a.size == 0:
        return {"median": None, "p90": None, "mean": None, "n": 0}
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "mean": float(a.mean()),
            "min": float(a.min()), "n": int(a.size)}


def rel(a, b) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


TARGETS = Path(__file__).with_name("targets.json")


def load_targets(path: str | os.PathLike | None = None) -> list[dict]:
    """The e2e targets (data: benchmarks/targets.json); each {name, ratio: [figure, figure], at_most | at_least}."""
    path = Path(path) if path else TARGETS
    targets = json.loads(path.read_text())["e2e"]
    for t in targets:
        if not isinstance(t.get("name"), str) or len(t.get("ratio", ())) != 2 or \
                sum(k in t for k in ("at_most", "at_least")) != 1:
            raise ValueError(f"{path}: target {t!r} needs a name, ratio: [figure, figure] and one of at_most / "
                             f"at_least")
    return targets


def figure(configs: dict, path: str):
    """'d.latency_ms.median' -> configs['d']['latency_ms']['median'], or None when absent."""
    x = configs
    for part in path.split("."):
        if not isinstance(x, dict) or x.get(part) is None:
            return None
        x = x[part]
    return x


def check_targets(configs: dict, targets: list[dict]) -> dict:
    """{name: {"ratio", "met"}} for every target whose two figures were measured."""
    out = {}
    for t in targets:
        num, den = (figure(configs, p) for p in t["ratio"])
        if num is None or not den:
            continue
        r = num / den
        out[t["name"]] = {"ratio": r, "met": r <= t["at_most"] if "at_most" in t else r >= t["at_least"]}
    return out


# ---------------------------------------------------------------------------- inputs
def load_trace_npz(path: str) -> dict:
    try:
        from vla_accel.envs.trace import load_trace

        return load_trace(path)
    except ImportError:
        with np.load(path, allow_pickle=False) as d:
            t = {k: d[k] for k in ("full_image", "wrist_image", "state", "action")}
            t["instruction"] = str(d["instruction"])
            return t


def observations(trace: dict, idx: int) -> dict:
    return {"full_image": trace["full_image"][idx], "wrist_image": trace["wrist_image"][idx],
            "state": trace["state"][idx]}


def cache_prepare(policy) -> None:
    """Memoizes policy.prepare per observation: the image pre-processing (JPEG + Lanczos, ~11 ms per step of two
    256 px frames on a 2-core host) is identical for every configuration and not timed, so the trace pays it once
    per frame."""
    orig, memo = policy.prepare, {}

    def key(obs, text):
        return (obs["full_image"].__array_interface__["data"][0], obs["wrist_image"].__array_interface__["data"][0],
                np.asarray(obs["state"]).tobytes(), text)

    def prepare(obs_list, instructions):
        parts = []
        for obs, text in zip(obs_list, instructions):
            k = key(obs, text)
            if k not in memo:
                memo[k] = orig([obs], [text])
            parts.append(memo[k])
        return ([p[0][0] for p in parts], torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))

    policy.prepare = prepare


def prune_config(path: str | None) -> dict:
    import yaml

    if path is None:
        import vla_accel.configs

        path = Path(vla_accel.configs.__file__).parent / "prune" / "specprune.yaml"
    with open(path) as f:
        return yaml.safe_load(f)


# ---------------------------------------------------------------------------- runs
def run_plain(policy, executor, inputs, warmup: int, device) -> dict:
    """One call per step with fixed inputs (ids, pixels, proprio prepared on the host)."""
    policy = policy.with_executor(executor)
    lat, splits, outs = [], [], []
    for i in range(min(warmup, len(inputs))):
        policy.predict_from_inputs(*inputs[i])
    _sync(device)
    for ids, pix, prop in inputs:
        _sync(device)
        t0 = time.perf_counter()
        norm, _ = policy.predict_from_inputs(ids, pix, prop)
        _sync(device)
        lat.append((time.perf_counter() - t0) * 1e3)
        sp = executor.split_ms()
        if sp:
            splits.append(sp)
        outs.append(norm.detach().float().cpu())
    return {"lat": lat, "splits": splits, "actions": outs}


class MethodTimer:
    """Host time per method while installed: wraps named methods of classes (own time incl. anything they wait
    for; nested wrapped methods are counted in both). ms / calls: per "Class.method" (bench instrumentation)."""

    def __init__(self, targets):
        self.targets, self.orig, self.ms, self.calls = targets, [], {}, {}

    def __enter__(self):
        for cls, name in self.targets:
            f = getattr(cls, name)
            key = f"{cls.__name__}.{name}"
            self.orig.append((cls, name, f))

            def timed(*a, _f=f, _k=key, **k):
                t0 = time.perf_counter()
                try:
                    return _f(*a, **k)
                finally:
                    self.ms[_k] = self.ms.get(_k, 0.0) + (time.perf_counter() - t0) * 1e3
                    self.calls[_k] = self.calls.get(_k, 0) + 1

            setattr(cls, name, timed)
        return self

    def __exit__(self, *exc):
        for cls, name, f in self.orig:
            setattr(cls, name, f)


class HookTimer(MethodTimer):
    """Host time spent inside the pruning plan's PruneDecisions methods (incl. any wait for the key mass), per call."""

    def __init__(self):
        from vla_accel.prune.plan import PrunePlan

        super().__init__([(PrunePlan, n) for n in ("keep", "rows", "scores")])

    def take_ms(self) -> float:
        """ms since the last take_ms, then zero."""
        ms = sum(self.ms.values())
        self.ms.clear()
        return ms


def run_specprune(policy, executor, prune_cfg, trace, steps: int, streams: int, offset: int, device,
                  check_every: int = 0, keep_replay: bool = False) -> dict:
    """One batched SpecPrune query per step over `streams` streams of the trace (stream s lags by s*offset)."""
    from vla_accel.prune import KeepPlan, make_actor

    cap = Capture(executor)
    actor = make_actor(policy.with_executor(cap), prune_cfg)
    actor.reset(list(range(streams)))
    T = len(trace["state"])
    lat, splits, tokens, checks, hook_ms, replay = [], [], [], [], [], []
    with HookTimer() as timer:
        for t in range(steps):
            idx = [(t + s * offset) % T for s in range(streams)]
            for st in actor.streams.values():
                st.queue.clear()  # query every step (the benchmark times queries, not the open-loop steps)
            obs = [observations(trace, i) for i in idx]
            timer.take_ms()
            _, infos = actor.act_batch(obs, [trace["instruction"]] * streams, list(range(streams)),
                                       executed=np.asarray(trace["action"])[idx])
            hook_ms.append(timer.take_ms())
            lat.append(infos[0]["latency_ms"])
            sp = cap.split_ms()
            if sp:
                splits.append(sp)
            tokens.extend(i["kept_per_layer"] for i in infos)
            if keep_replay:
                replay.append((obs, KeepPlan.from_prune_plan(actor.last_plan, validate=False)))
            if check_every and t % check_every == 0:
                checks.append({"step": t, "args": cap.last["args"], "plan": actor.last_plan,
                               "out": tuple(o.detach().clone() for o in cap.last["out"])})
    return {"lat": lat, "splits": splits, "tokens": tokens, "checks": checks, "hook_ms": hook_ms, "replay": replay}


def run_replay(policy, executor, replay, instruction, device) -> dict:
    """The token sets SpecPrune chose, applied by KeepPlan (a plan with no scoring and no host syncs): what the
    executor costs at exactly those token counts, without the pruning logic's own overhead."""
    policy = policy.with_executor(executor)
    lat, splits = [], []
    for obs, plan in replay:
        ids, pix, prop = policy.prepare(obs, [instruction] * len(obs))
        _sync(device)
        t0 = time.perf_counter()
        policy.predict_from_inputs(ids, pix, prop, decisions=plan)
        _sync(device)
        lat.append((time.perf_counter() - t0) * 1e3)
        sp = executor.split_ms()
        if sp:
            splits.append(sp)
    return {"lat": lat, "splits": splits}


def fp32_forward(model, args, decisions=None):
    """The reference model evaluated with every weight upcast to fp32 (transient copy)."""
    params = {k: v.float() for k, v in list(model.named_parameters()) + list(model.named_buffers())}
    ids, pix, prop, lens = args
    with torch.inference_mode():
        out = torch.func.functional_call(model, params, (ids, pix.float(), prop.float()),
                                         {"prompt_lens": lens, "decisions": decisions})
    del params
    return out


def run_peer(model, tokens: int, mode: str, device, dtype, *, backend: str = "inductor", reps: int = 20,
             warmup: int = 3) -> dict:
    """The stock transformers Llama body (stock.hf_llama, weights shared) on one sequence of `tokens` rows with the
    bidirectional mask of configuration (a). mode "ma": torch.compile(mode="max-autotune") compiled for this shape
    (a backend other than inductor, e.g. "eager" for CPU tests, is compiled without a mode); "graph": eager, captured
    in one CUDA graph (on a CPU: eager calls). -> {"latency_ms", "compile_s" (first call / capture), "rel_vs_eager"
    (the output against the eager body's), ...}."""
    from .stock import hf_llama

    hf = hf_llama(model)
    gen = torch.Generator(device=device).manual_seed(tokens)
    embeds = torch.randn(1, tokens, model.cfg.llm.hidden, device=device, dtype=dtype, generator=gen)
    pos = torch.arange(tokens, device=device)[None]
    mask = torch.ones(1, 1, tokens, tokens, dtype=torch.bool, device=device)  # [B, 1, S, S]: every key visible

    def body(module):
        return module(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state

    note = ""
    with torch.inference_mode():
        ref = body(hf).float()
        t0 = time.perf_counter()
        if mode == "ma":
            torch._dynamo.reset()  # compiled once for this shape, from scratch
            compiled = (torch.compile(hf, mode="max-autotune", dynamic=False) if backend == "inductor" else
                        torch.compile(hf, backend=backend, dynamic=False))

            def call():
                if device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()  # max-autotune replays CUDA graphs (cudagraph trees)
                return body(compiled)

            call()
        elif device.type == "cuda":
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    body(hf)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = body(hf)

            def call():
                graph.replay()
                return static_out
        else:
            call, note = (lambda: body(hf)), f"eager: no CUDA graphs on {device.type}"
        _sync(device)
        compile_s = time.perf_counter() - t0
        for _ in range(warmup):
            call()
        err = rel(call().float(), ref)
        lat = []
        for _ in range(reps):
            marks = Marks(device)
            marks.mark()
            call()
            marks.mark()
            lat.append(marks.split(("call",))["call"])
    if mode == "ma":
        torch._dynamo.reset()
    return {"latency_ms": stats(lat), "compile_s": compile_s, "rel_vs_eager": err, "tokens": tokens,
            "mode": PEER_MODES[mode], "backend": backend if mode == "ma" else None, "note": note}


# ---------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default=".devcarry/libero_spatial_t0.npz", help="trace .npz (vla_accel.envs.trace)")
    p.add_argument("--steps", type=int, default=64, help="consecutive trace steps (>= 50 unless --allow-short)")
    p.add_argument("--allow-short", action="store_true", help="smoke runs: fewer than 50 steps")
    p.add_argument("--preset", default="7b", help="model preset (7b | tiny)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--configs", default="a,b,c,d,e", help="comma list of a..e")
    p.add_argument("--streams", type=int, default=8, help="trace streams of configuration (e)")
    p.add_argument("--stream-offset", type=int, default=7, help="steps between consecutive streams of (e)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (a)..(c)")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="fp32 runs: max rel-L2 of accel vs reference actions per chunk (bf16 runs: 3x the measured "
                        "bf16 error of the reference against fp32)")
    p.add_argument("--anchor-steps", type=int, default=2, help="steps per configuration checked against fp32")
    p.add_argument("--check-every", type=int, default=8, help="(d)/(e): check every N-th step against the reference")
    p.add_argument("--runtime", default="{}", help="JSON overrides of the accel RuntimeConfig")
    p.add_argument("--variants", default="", help="extra (c) runs: ';'-separated JSON runtime overrides")
    p.add_argument("--variants-d", default="", help="extra (d) runs: ';'-separated JSON runtime overrides")
    p.add_argument("--prune-config", default=None, help="SpecPrune YAML (default configs/prune/specprune.yaml)")
    p.add_argument("--memory-limit-gb", type=float, default=24.0,
                   help="CUDA: cap the caching allocator at this many GiB while the model is built and (c)/(d)/(e) "
                        "run (torch.cuda.set_per_process_memory_fraction); 0 = no cap")
    p.add_argument("--peer", action="store_true",
                   help="also time the off-the-shelf peer (stock transformers Llama body under torch.compile "
                        "max-autotune and in one CUDA graph) at the (d) and (c) token counts; ~90 s of "
                        "compilation per shape")
    p.add_argument("--peer-backend", default="inductor",
                   help="torch.compile backend of the peer (max-autotune is inductor's mode; e.g. 'eager' to test "
                        "the plumbing on a CPU)")
    p.add_argument("--peer-reps", type=int, default=20, help="timed calls per peer configuration")
    p.add_argument("--targets", default=None, help="targets JSON (default benchmarks/targets.json)")
    p.add_argument("--out", default=None, help="folder for e2e.json / e2e.md")
    p.add_argument("--commit", default=os.environ.get("VLA_COMMIT", ""), help="git commit benchmarked")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import vla_accel
    from vla_accel.prune import KeepPlan
    from vla_accel.runtime import AccelRunner, RuntimeConfig

    from .roofline import ceilings, describe, floors

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        raise SystemExit(f"unknown configuration(s) {bad}; valid: {list(CONFIGS)}")
    trace = load_trace_npz(args.trace)
    T = len(trace["state"])
    steps = min(args.steps, T)
    if steps < 50 and not args.allow_short:
        raise SystemExit(f"the trace has {T} steps, --steps {args.steps}: need >= 50 consecutive steps "
                         f"(record a longer trace, or --allow-short for a smoke run)")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ceil = ceilings(device)  # before anything else holds memory; every floor of the run comes from these
    print(f"ceilings: {describe(ceil)}", flush=True)
    bw, rate = ceil["copy_bytes_per_s"], ceil["matmul_flops_per_s"]
    mem_cap = None
    if device.type == "cuda" and args.memory_limit_gb > 0:
        total = torch.cuda.get_device_properties(device).total_memory
        mem_cap = min(1.0, args.memory_limit_gb * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(mem_cap, _index(device))  # the accel runs must fit under it
    t_build = time.perf_counter()
    policy = vla_accel.random_policy(args.preset, device=device, dtype=dtype, seed=0)
    policy.tokenizer = WordTokenizer()
    cache_prepare(policy)
    model = policy.model
    rt = {"name": "accel", "profile": True, "capture_fallback": True, **json.loads(args.runtime)}
    if device.type != "cuda":
        rt.setdefault("on_cpu", "emulate")
    runner = AccelRunner(model, RuntimeConfig.from_dict(rt))  # first: it fuses QKV / gate-up in place (shared)
    build_s = time.perf_counter() - t_build
    inputs = []
    for t in range(steps):
        ids, pix, prop = policy.prepare([observations(trace, t)], [trace["instruction"]])
        inputs.append((ids, pix, prop))
    n_tok = len(policy.batch_ids(inputs[0][0])[0][0]) + model.cfg.num_patch_tokens + model.cfg.num_action_tokens + 1
    L = model.cfg.llm.layers
    results: dict = {"configs": {}, "checks": {}, "errors": {}, "ceilings": ceil}
    ref_actions = None

    def record(key, run, tokens):
        lat = stats(run["lat"])
        split = {k: stats([s[k] for s in run["splits"]])["median"] for k in ("vision", "backbone", "head")} \
            if run["splits"] else {}
        fl = floors(model, tokens, bw, rate)
        r = {"label": LABELS.get(key[0], key), "latency_ms": lat, "split_ms": split, "tokens_mean": fl["tokens_mean"],
             "floor_ms": fl["floor_ms"], "stage_floor_ms": fl["stage_floor_ms"], "floor_terms": fl,
             "ratio_to_floor": lat["median"] / fl["floor_ms"] if lat["median"] else None}
        results["configs"][key] = r
        print(f"[{key}] median {lat['median']:.2f} ms  p90 {lat['p90']:.2f}  split {split}  tokens "
              f"{fl['tokens_mean']:.1f}  floor {fl['floor_ms']:.2f} ms", flush=True)
        return r

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    mem = {}

    # ---- (c) accel unpruned (+ variants)
    if "c" in configs:
        try:
            run = run_plain(policy, runner, inputs, args.warmup, device)
            record("c", run, [[n_tok] * L])
            results["configs"]["c"]["graphs"] = runner.graphs.stats() if runner.graphs is not None else None
            results["c_actions"] = run["actions"]
        except Exception as err:  # noqa: BLE001 - one configuration failing must not lose the others
            results["errors"]["c"] = traceback.format_exc()
            print(f"[c] FAILED: {err}", flush=True)
    prune_cfg = prune_config(args.prune_config)
    runs_d = {}

    def specprune_config(key, streams, exe, extra=None):
        # warm-up pass: captures the graphs of every token bucket this trace produces
        run_specprune(policy, exe, prune_cfg, trace, steps, streams, args.stream_offset, device)
        caps0 = exe.graphs.captures if exe.graphs is not None else 0
        run = run_specprune(policy, exe, prune_cfg, trace, steps, streams, args.stream_offset, device,
                            check_every=args.check_every if extra is None else 0, keep_replay=extra is None)
        tok = np.asarray(run["tokens"], dtype=np.float64)  # [steps*streams, L]: rows entering each layer
        per_chunk = [tok.mean(0).tolist()] * streams  # one batched call at the mean token counts
        r = record(key, run, per_chunk)
        r["batch"] = streams
        r["chunks_per_s"] = streams * 1e3 / r["latency_ms"]["median"]
        r["captures_during_timing"] = (exe.graphs.captures - caps0) if exe.graphs is not None else None
        r["graphs"] = exe.graphs.stats() if exe.graphs is not None else None
        r["hook_host_ms"] = stats(run["hook_ms"])
        r["tokens_per_layer_mean"] = tok.mean(0).round(1).tolist()
        r["floor_at_mean_tokens_ms"] = r["floor_ms"]
        if extra is not None:
            r["runtime"], r["ops"] = extra, exe.ops.describe()
            return run
        if run["replay"]:  # the same token sets through KeepPlan: the executor's share of the latency
            rep = run_replay(policy, exe, run["replay"], trace["instruction"], device)
            rr = record(key + "'", rep, per_chunk)
            rr["label"] = LABELS[key] + ": SpecPrune's token sets replayed by KeepPlan (executor only)"
            rr["batch"], rr["chunks_per_s"] = streams, streams * 1e3 / rr["latency_ms"]["median"]
            rr["floor_at_mean_tokens_ms"] = r["floor_at_mean_tokens_ms"]
        return run

    for key, streams in (("d", 1), ("e", args.streams)):
        if key not in configs:
            continue
        try:
            runs_d[key] = specprune_config(key, streams, runner)
        except Exception as err:  # noqa: BLE001
            results["errors"][key] = traceback.format_exc()
            print(f"[{key}] FAILED: {err}", flush=True)
    if device.type == "cuda":
        mem["accel_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        mem["accel_peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
        mem["weights_gb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        mem["cap_gb"] = args.memory_limit_gb if mem_cap is not None else None
        mem["accel_configs_completed_under_cap"] = not any(k in results["errors"] for k in "cde")
        torch.cuda.set_per_process_memory_fraction(1.0, _index(device))  # variants, references, fp32 anchors: no cap
    for i, extra in enumerate(v for v in args.variants.split(";") if v.strip()):
        key = f"c{i + 1}"
        try:
            var = AccelRunner(model, RuntimeConfig.from_dict({**rt, **json.loads(extra)}))
            run = run_plain(policy, var, inputs, args.warmup, device)
            r = record(key, run, [[n_tok] * L])
            r["runtime"] = json.loads(extra)
            r["ops"] = var.ops.describe()
            del var
        except Exception as err:  # noqa: BLE001
            results["errors"][key] = traceback.format_exc()
            print(f"[{key}] FAILED: {err}", flush=True)
    for i, extra in enumerate(v for v in args.variants_d.split(";") if v.strip()):
        key = f"d{i + 1}"
        try:
            var = AccelRunner(model, RuntimeConfig.from_dict({**rt, **json.loads(extra)}))
            specprune_config(key, 1, var, json.loads(extra))
            del var
        except Exception as err:  # noqa: BLE001
            results["errors"][key] = traceback.format_exc()
            print(f"[{key}] FAILED: {err}", flush=True)

    # ---- (b) reference, (a) stock
    if "b" in configs or any(k in configs for k in "cde"):
        ref = SplitExecutor(model, lambda seq, d: model.llm(seq.embeds, seq.positions, seq.key_mask, decisions=d)[::2])
        run = run_plain(policy, ref, inputs, args.warmup if "b" in configs else 0, device)
        ref_actions = run["actions"]
        if "b" in configs:
            record("b", run, [[n_tok] * L])
    if "a" in configs:
        try:
            from .stock import StockExecutor

            stock = StockExecutor(model)
            run = run_plain(policy, SplitExecutor(model, lambda seq, dec: (stock.backbone(seq), seq.key_mask)),
                            inputs, args.warmup, device)
            record("a", run, [[n_tok] * L])
            results["checks"]["a_vs_reference_max_rel"] = max(rel(x, y) for x, y in zip(run["actions"], ref_actions))
            del stock
        except Exception as err:  # noqa: BLE001
            results["errors"]["a"] = traceback.format_exc()
            print(f"[a] FAILED: {err}", flush=True)

    # ---- the off-the-shelf peer: the stock Llama body at the (d) and (c) token counts
    if args.peer:
        d_tokens = results["configs"].get("d", {}).get("tokens_mean")
        for role, tokens in (("d", round(d_tokens) if d_tokens else 199), ("c", n_tok)):
            for mode, what in PEER_MODES.items():
                key = f"peer_{mode}_{role}"
                try:
                    r = run_peer(model, tokens, mode, device, dtype, backend=args.peer_backend, reps=args.peer_reps)
                except Exception as err:  # noqa: BLE001
                    results["errors"][key] = traceback.format_exc()
                    print(f"[{key}] FAILED: {err}", flush=True)
                    continue
                fl = floors(model, [[tokens] * L], bw, rate)
                r.update({"label": f"peer: stock transformers Llama body, {what}, {tokens} tokens (({role})'s count)",
                          "split_ms": {"backbone": r["latency_ms"]["median"]}, "tokens_mean": float(tokens),
                          "floor_ms": fl["stages_ms"]["backbone"], "floor_terms": fl,
                          "ratio_to_floor": r["latency_ms"]["median"] / fl["stages_ms"]["backbone"]})
                ours = figure(results["configs"], f"{role}.split_ms.backbone")
                r["ours_backbone_ms"] = ours
                r["peer_over_ours"] = r["latency_ms"]["median"] / ours if ours else None
                results["configs"][key] = r
                print(f"[{key}] median {r['latency_ms']['median']:.2f} ms, compile {r['compile_s']:.1f} s, rel vs "
                      f"eager {r['rel_vs_eager']:.2e}; ours (backbone of ({role})) {ours} ms", flush=True)

    # ---- equivalence checks. fp32 anchor first: the reference's own bf16 error sets the tolerance
    ck = results["checks"]
    anchors = []
    if args.anchor_steps and dtype != torch.float32:
        try:
            for i in range(min(args.anchor_steps, len(inputs))):
                ids, lens = policy.batch_ids(inputs[i][0])
                a = (ids.to(device), inputs[i][1].to(device, dtype), inputs[i][2].to(device, dtype), lens)
                r32 = fp32_forward(model, a)[0]
                with torch.inference_mode():
                    r16 = model(*a[:3], prompt_lens=a[3])[0]
                acc = runner(*a[:3], prompt_lens=a[3])[0]
                anchors.append(("c", rel(r16, r32), rel(acc, r32)))
            for key, run in runs_d.items():
                for c in run["checks"][:args.anchor_steps]:
                    plan = KeepPlan.from_prune_plan(c["plan"])
                    r32 = fp32_forward(model, c["args"], plan)[0]
                    with torch.inference_mode():
                        r16 = model(*c["args"][:3], prompt_lens=c["args"][3], decisions=plan)[0]
                    anchors.append((key, rel(r16, r32), rel(c["out"][0], r32)))
            ck["fp32_anchor"] = [{"config": k, "reference_bf16_rel": e16, "accel_rel": ea,
                                  "pass": ea <= 2 * e16 + 1e-3} for k, e16, ea in anchors]
        except Exception as err:  # noqa: BLE001
            results["errors"]["fp32_anchor"] = traceback.format_exc()
            print(f"[fp32 anchor] FAILED: {err}", flush=True)
    if anchors:
        eps = max(e16 for _, e16, _ in anchors)
        tol = 3 * eps
        ck["tolerance"] = {"rel_l2": tol, "why": f"3 x the largest rel-L2 error of the bf16 reference against fp32 "
                                                 f"on the anchor steps ({eps:.4f}): accel within 2x the "
                                                 f"reference's own error puts it within 3x of the reference"}
    else:
        tol = args.tol
        ck["tolerance"] = {"rel_l2": tol, "why": "--tol (fp32 run)"}
    if "c_actions" in results and ref_actions is not None:
        errs = [rel(x, y) for x, y in zip(results.pop("c_actions"), ref_actions)]
        ck["c"] = {"max_rel": max(errs), "median_rel": float(np.median(errs)), "chunks": len(errs),
                   "pass": max(errs) <= tol}
    for key, run in runs_d.items():
        errs = []
        for c in run["checks"]:
            with torch.inference_mode():
                ref_out = model(*c["args"][:3], prompt_lens=c["args"][3],
                                decisions=KeepPlan.from_prune_plan(c["plan"]))
            errs += [rel(a, b) for a, b in zip(c["out"][0], ref_out[0])]
        if errs:
            ck[key] = {"max_rel": max(errs), "median_rel": float(np.median(errs)), "chunks": len(errs),
                       "pass": max(errs) <= tol, "how": "same pruning decisions replayed through the reference"}

    # ---- targets, environment, output
    results["targets"] = check_targets(results["configs"], load_targets(args.targets))
    results["memory"] = mem
    results["env"] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": args.commit,
        "torch": torch.__version__, "python": platform.python_version(),
        "triton": _version("triton"), "transformers": _version("transformers"),
        "preset": args.preset, "dtype": str(dtype).replace("torch.", ""), "trace": args.trace,
        "trace_meta": trace.get("meta"), "instruction": trace["instruction"], "steps": steps,
        "tokens_unpruned": n_tok, "prompt_tokenizer": WordTokenizer.name, "build_s": round(build_s, 1),
        "runtime": runner.describe(), "argv": list(sys.argv[1:] if argv is None else argv),
    }
    table = markdown(results)
    print(table, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "e2e.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        (out / "e2e.md").write_text(table + "\n")
    return results


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _version(name):
    try:
        import importlib.metadata as md

        return md.version(name)
    except Exception:  # noqa: BLE001
        return None


def markdown(res: dict) -> str:
    from .roofline import describe

    env, cf = res["env"], res["configs"]
    lines = [f"# End-to-end OFT policy benchmark ({env['preset']}, random {env['dtype']} weights)", "",
             f"device: {env['device']} | date: {env['date']} | commit: {env['commit'] or '?'} | torch {env['torch']}"
             f" | triton {env['triton']} | trace: {env['steps']} steps of {env.get('trace_meta') or env['trace']}", "",
             f"Ceilings (every floor below uses them): {describe(res['ceilings'])}", "",
             "| configuration | chunk median ms | p90 ms | vision ms | backbone ms | head ms | pruning plan (host) ms "
             "| backbone tokens | floor ms | median / floor | chunks/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, nd=2):
        return "-" if x is None else f"{x:.{nd}f}"

    for key in sorted(cf, key=lambda k: (k[0], len(k), k)):
        r = cf[key]
        lat, sp = r["latency_ms"], r["split_ms"]
        floor = r.get("floor_at_mean_tokens_ms", r["floor_ms"])
        peer = key.startswith("peer")  # a backbone alone: no chunks
        cps = r.get("chunks_per_s") or (1e3 / lat["median"] if lat["median"] and not peer else None)
        label = r["label"] + (f" {r['runtime']}" if "runtime" in r else "")
        hook_ms = (r.get("hook_host_ms") or {}).get("median")
        lines.append(f"| {label} | {f(lat['median'])} | {f(lat['p90'])} | {f(sp.get('vision'))} | "
                     f"{f(sp.get('backbone'))} | {f(sp.get('head'))} | {f(hook_ms)} | "
                     f"{f(r['tokens_mean'], 1)} | {f(floor)} | "
                     f"{f(lat['median'] / floor if lat['median'] else None)} | {f(cps, 1)} |")
    peers = [k for k in sorted(cf) if k.startswith("peer")]
    if peers:
        lines += ["", "Peer (backbone only; floor: the backbone stage's): compile time, and against our backbone split "
                      "of the configuration whose token count it runs:"]
        for k in peers:
            r = cf[k]
            lines.append(f"- {k}: {r['label']}: {f(r['latency_ms']['median'])} ms, compile {f(r['compile_s'], 1)} s, "
                         f"ours {f(r['ours_backbone_ms'])} ms, peer / ours {f(r['peer_over_ours'])}"
                         + (f" ({r['note']})" if r.get("note") else ""))
    lines += ["", "Targets:"]
    for k, v in res.get("targets", {}).items():
        lines.append(f"- {k}: {json.dumps({a: (round(b, 3) if isinstance(b, float) else b) for a, b in v.items()})}")
    lines += ["", "Checks (rel-L2 of normalized action chunks):"]
    for k, v in res.get("checks", {}).items():
        lines.append(f"- {k}: {json.dumps(v, default=lambda x: round(x, 5) if isinstance(x, float) else str(x))}")
    if res.get("memory"):
        mem = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in res["memory"].items()}
        lines.append(f"\nMemory (GiB): {json.dumps(mem)}")
    if res.get("errors"):
        lines.append(f"\nErrors in: {sorted(res['errors'])} (tracebacks in e2e.json)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
