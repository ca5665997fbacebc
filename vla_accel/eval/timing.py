"""Where the time of a rollout goes: the main process's wall time in parts, batch sizes, GPU utilisation.

    timing = Timing()
    timing.add("reset", seconds)                           # a part measured around one call
    timing.step_round(round_s, io_s, step_infos)           # a step round, split by the workers' own figures
    timing.policy_call(call_s, infos, capture_s, captures) # one actor call, split by the actor's own figures
    timing.summary(wall_s, episodes, gpu)                  # -> the `timing` block of results.json

Each part is measured with perf_counter around existing calls of the main process (no device syncs added), so
the parts do not overlap; `other` is the wall time outside all of them (the loop itself) and stays small when
the parts cover the run (tests/test_eval_timing.py checks the parts against the wall time). Parts, seconds:

  startup         simulator workers starting (spawn, imports) until all are ready; the pre-capture runs inside
  reset           waiting for episode resets (settle steps; a task switch rebuilds the simulator)
  sim_step        waiting for simulator steps: the slowest worker's step time less its rendering
  render          the slowest worker's rendering per step (the env's time_render() estimate; envs without it
                  render inside sim_step)
  worker_prep     the slowest worker's image pre-processing (eval.prepare_in_workers: the policy's images prepared
                  in the simulator workers)
  obs_transfer    receiving the workers' replies in the main process (unpickling the observations)
  sim_wait        the rest of the step rounds: workers finishing at different times, their pickling, scheduling
  policy_prep     actor pre-processing (images, prompts, pruning plan), as the actor reports it (prep_ms)
  policy_forward  the model forward as the actor reports it (latency_ms), graph captures taken out
  graph_capture   CUDA-graph captures (each with its warm-up call) inside the rollout's forwards
  policy_post     actor post-processing (un-normalization, pruning summary), as reported (post_ms)
  policy_other    the rest of the actor calls (action queues, controller, calls that ran no forward)
  record          results lines, video frames, traces
  restart         replacing failed simulator workers
  shutdown        closing the simulator workers at the end
  other           wall time outside every part above
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections import Counter
from contextlib import contextmanager
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

PARTS = ("startup", "reset", "sim_step", "render", "worker_prep", "obs_transfer", "sim_wait", "policy_prep",
         "policy_forward",
         "graph_capture", "policy_post", "policy_other", "record", "restart", "shutdown")
GROUPS = {  # the printed summary's coarser view
    "simulator": ("sim_step", "render", "sim_wait", "reset"),
    "transfer": ("obs_transfer",),
    "policy": ("policy_prep", "policy_forward", "graph_capture", "policy_post", "policy_other", "worker_prep"),
    "start/stop": ("startup", "shutdown"),
    "other": ("record", "restart", "other"),
}


class Timing:
    """Accumulates the parts of one rollout session (see the module doc)."""

    def __init__(self) -> None:
        self.parts = dict.fromkeys(PARTS, 0.0)
        self.batch_sizes: Counter = Counter()   # batch size of each forward -> count
        self.forwards = 0                        # actor calls that ran the model
        self.capture_forwards = 0                # ... of which captured graphs
        self.env_steps = 0
        self.render_estimated = False            # some worker reported a render estimate
        self.precapture: dict | None = None

    def add(self, part: str, seconds: float) -> None:
        self.parts[part] += seconds

    @contextmanager
    def part(self, name: str):
        """Times the block into `name`, also when it raises (an interrupted run keeps the time it spent there)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] += time.perf_counter() - t

    def step_round(self, round_s: float, io_s: float, infos: Sequence[dict]) -> None:
        """One step round of round_s seconds, io_s of them receiving; infos: the workers' step infos. The waiting
        is the slowest worker's step (its image pre-processing, render, physics), then whatever remains (sim_wait)."""
        io_s = min(max(io_s, 0.0), round_s)
        waiting = round_s - io_s
        busy, render, prep = 0.0, 0.0, 0.0
        for info in infos:
            b = float(info.get("busy_s") or 0.0)
            if b >= busy:
                busy, prep = b, min(float(info.get("prep_s") or 0.0), b)
                render = min(float(info.get("render_s") or 0.0), b - prep)
            self.render_estimated |= info.get("render_s") is not None
        prep = min(prep, waiting)
        render = min(render, waiting - prep)
        physics = min(busy - prep - render, waiting - prep - render)
        self.parts["obs_transfer"] += io_s
        self.parts["worker_prep"] += prep
        self.parts["render"] += render
        self.parts["sim_step"] += physics
        self.parts["sim_wait"] += waiting - prep - render - physics
        self.env_steps += sum(1 for info in infos if not info.get("error"))

    def policy_call(self, call_s: float, infos: Sequence[dict], capture_s: float = 0.0, captures: int = 0) -> None:
        """One act_batch call of call_s seconds: the actor's own prep / forward / post figures of the queried
        streams (one forward serves them all), captures taken out of the forward, the rest is policy_other."""
        queried = next((i for i in infos if i.get("queried")), None)
        if queried is None:
            self.parts["policy_other"] += call_s
            return
        self.forwards += 1
        self.batch_sizes[int(queried.get("batch_size") or sum(1 for i in infos if i.get("queried")))] += 1
        forward = float(queried.get("latency_ms") or 0.0) / 1e3   # captures happen inside the forward
        prep = float(queried.get("prep_ms") or 0.0) / 1e3
        post = float(queried.get("post_ms") or 0.0) / 1e3
        if captures:
            self.capture_forwards += 1
        known = prep + max(forward, capture_s) + post
        scale = call_s / known if known > call_s > 0 else 1.0   # figures measured inside the call never exceed it
        self.parts["policy_prep"] += prep * scale
        self.parts["graph_capture"] += capture_s * scale
        self.parts["policy_forward"] += max(0.0, forward - capture_s) * scale
        self.parts["policy_post"] += post * scale
        self.parts["policy_other"] += max(0.0, call_s - known * scale)

    def summary(self, wall_s: float, episodes: int, gpu: dict | None) -> dict:
        parts = {k: round(v, 4) for k, v in self.parts.items()}
        covered = sum(self.parts.values())
        parts["other"] = round(wall_s - covered, 4)
        chunks = sum(b * n for b, n in self.batch_sizes.items())
        out = {
            "wall_s": round(wall_s, 3),
            "parts_s": parts,
            "parts_fraction": {k: round(v / wall_s, 4) if wall_s > 0 else None for k, v in parts.items()},
            "covered_fraction": round(covered / wall_s, 4) if wall_s > 0 else None,
            "render": "estimated per step in each worker (env.time_render())" if self.render_estimated else
                      "not separable: inside sim_step",
            "forwards": self.forwards,
            "forwards_with_capture": self.capture_forwards,
            "batch_sizes": {str(b): n for b, n in sorted(self.batch_sizes.items())},
            "chunks": chunks,
            "chunks_per_s": round(chunks / wall_s, 3) if wall_s > 0 else None,
            "env_steps": self.env_steps,
            "env_steps_per_s": round(self.env_steps / wall_s, 3) if wall_s > 0 else None,
            "episodes": episodes,
            "episodes_per_hour": round(3600.0 * episodes / wall_s, 2) if wall_s > 0 else None,
            "gpu": gpu if gpu is not None else {"sampled": False, "why": "the policy does not run on CUDA"},
        }
        if self.precapture is not None:
            out["precapture"] = self.precapture
        return out


def merge_timings(timings: Sequence[dict]) -> dict | None:
    """The timing blocks of several runs (shards) added up: parts, wall time, forwards, batch sizes, steps and
    episodes are sums (episodes_per_hour is then per run-second: the shards' own figures say how fast each was)."""
    timings = [t for t in timings if t and (t.get("wall_s") or 0) > 0]
    if not timings:
        return None
    wall = sum(t["wall_s"] for t in timings)
    parts: dict[str, float] = {}
    batches: Counter = Counter()
    for t in timings:
        for k, v in t["parts_s"].items():
            parts[k] = parts.get(k, 0.0) + v
        batches.update({k: int(v) for k, v in t.get("batch_sizes", {}).items()})
    covered = sum(v for k, v in parts.items() if k != "other")
    total = {k: sum(t.get(k) or 0 for t in timings) for k in ("forwards", "forwards_with_capture", "chunks",
                                                               "env_steps", "episodes")}
    gpus = [t.get("gpu") or {} for t in timings]
    return {
        "runs": len(timings), "wall_s": round(wall, 3), "parts_s": {k: round(v, 4) for k, v in parts.items()},
        "parts_fraction": {k: round(v / wall, 4) for k, v in parts.items()},
        "covered_fraction": round(covered / wall, 4),
        "render": timings[0].get("render", ""),
        **total,
        "batch_sizes": {k: batches[k] for k in sorted(batches, key=int)},
        "chunks_per_s": round(total["chunks"] / wall, 3),
        "env_steps_per_s": round(total["env_steps"] / wall, 3),
        "episodes_per_hour": round(3600.0 * total["episodes"] / wall, 2),
        "gpu": {"sampled": False, "why": "per run: see each run's results.json"} if not all(
            g.get("sampled") for g in gpus) else {
            "sampled": True, "source": gpus[0]["source"], "interval_s": gpus[0]["interval_s"],
            "samples": sum(g["samples"] for g in gpus),
            "util_mean": round(sum(g["util_mean"] * g["samples"] for g in gpus) / sum(g["samples"] for g in gpus), 2),
            "util_median": round(float(np.median([g["util_median"] for g in gpus])), 2),
            "util_max": max(g["util_max"] for g in gpus), "gpus": sorted({str(g.get("gpu")) for g in gpus})},
    }


def format_timing(t: dict) -> list[str]:
    """The printed lines for a `timing` block."""
    wall = t.get("wall_s") or 0.0
    if wall <= 0:
        return []
    parts = t["parts_s"]
    runs = f" summed over {t['runs']} runs" if t.get("runs", 1) > 1 else ""
    lines = [f"where the time went ({wall:.1f} s of rollout{runs}, main process; parts cover "
             f"{100.0 * (t.get('covered_fraction') or 0):.1f}%):"]
    for group, names in GROUPS.items():
        total = sum(parts.get(n, 0.0) for n in names)
        detail = ", ".join(f"{n} {parts.get(n, 0.0):.1f}" for n in names if parts.get(n, 0.0) >= 0.05 or n == names[0])
        lines.append(f"  {group:<10}{total:8.1f} s {100.0 * total / wall:5.1f}%   ({detail})")
    if t.get("render", "").startswith("not"):
        lines.append("  rendering is inside sim_step (the env has no separate render timing)")
    batches = ", ".join(f"{b}: {n}" for b, n in t.get("batch_sizes", {}).items())
    lines.append(f"  forwards {t['forwards']} ({t['forwards_with_capture']} with graph captures), batch sizes "
                 f"{{{batches}}}; {t['chunks_per_s']:.2f} chunks/s, {t['env_steps_per_s']:.1f} env steps/s, "
                 f"{t['episodes_per_hour']:.1f} episodes/hour")
    pre = t.get("precapture")
    if pre and pre.get("ran"):
        lines.append(f"  pre-capture: {pre['graphs_captured']} graphs for batch sizes {pre['batch_sizes']} in "
                     f"{pre['seconds']:.1f} s (while the simulators started)")
    gpu = t.get("gpu") or {}
    if gpu.get("sampled"):
        lines.append(f"  GPU utilisation ({gpu['source']}, {gpu['samples']} samples every {gpu['interval_s']} s): "
                     f"mean {gpu['util_mean']:.1f}%, median {gpu['util_median']:.1f}%, max {gpu['util_max']:.0f}%")
    else:
        lines.append(f"  GPU utilisation: not sampled ({gpu.get('why', 'no GPU')})")
    return lines


# ---------------------------------------------------------------------------------------------- GPU


def _physical_gpu(index: int) -> str:
    """The NVML / nvidia-smi id of CUDA device `index` of this process (CUDA_VISIBLE_DEVICES maps it)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


class GpuSampler:
    """GPU utilisation of one CUDA device, sampled every interval_s in a background thread: NVML (package
    nvidia-ml-py) when it imports, else `nvidia-smi --query-gpu=utilization.gpu`. start() / stop() -> dict."""

    def __init__(self, device: str, interval_s: float = 0.5):
        import torch

        d = torch.device(device)
        self.gpu = _physical_gpu(d.index if d.index is not None else torch.cuda.current_device())
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []   # (utilisation %, memory used GiB)
        self.source, self.why = None, None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _nvml_reader(self):
        import pynvml

        pynvml.nvmlInit()
        if self.gpu.startswith(("GPU-", "MIG-")):
            handle = pynvml.nvmlDeviceGetHandleByUUID(self.gpu)
        else:
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(self.gpu))

        def read():
            return (float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                    pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2 ** 30)
        return read

    def _smi_reader(self):
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
               "-i", self.gpu]

        def read():
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout
            util, mem = out.strip().splitlines()[0].split(",")
            return float(util), float(mem) / 1024
        return read

    def start(self) -> "GpuSampler":
        for source, make in (("nvml", self._nvml_reader), ("nvidia-smi", self._smi_reader)):
            try:
                read = make()
                read()
            except Exception as exc:  # noqa: BLE001 - try the next source, keep why
                self.why = f"{source}: {type(exc).__name__}: {exc}"
                continue
            self.source = source
            self._thread = threading.Thread(target=self._loop, args=(read,), name="vla-accel-gpu-sampler",
                                            daemon=True)
            self._thread.start()
            return self
        log.warning("GPU utilisation is not sampled (%s)", self.why)
        return self

    def _loop(self, read) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append(read())
            except Exception as exc:  # noqa: BLE001 - a failed read ends the sampling, the run goes on
                self.why = f"{self.source} stopped answering: {exc}"
                return

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self.samples:
            return {"sampled": False, "why": self.why or "no sample taken (the rollout was shorter than one interval)"}
        util = np.array([s[0] for s in self.samples])
        return {"sampled": True, "source": self.source, "gpu": self.gpu, "interval_s": self.interval_s,
                "samples": len(self.samples), "util_mean": round(float(util.mean()), 2),
                "util_median": round(float(np.median(util)), 2), "util_max": round(float(util.max()), 2),
                "memory_used_max_gib": round(max(s[1] for s in self.samples), 2)}


def graph_counter(actor: Any):
    """A callable -> (captures, capture seconds) of the CUDA-graph cache behind `actor` (its policy's executor's
    GraphCache: the accelerated runtime, also emulated on CPU), or None when there is none."""
    cache = getattr(getattr(getattr(actor, "policy", None), "executor", None), "graphs", None)
    if cache is None or not hasattr(cache, "captures"):
        return None
    return lambda: (cache.captures, cache.capture_s)
