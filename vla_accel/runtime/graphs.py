"""CUDA graphs of the accelerated runtime: one captured graph per (piece of the forward, batch size, token
bucket), replayed for every later call of that shape; the runner owns the static input buffers.

    cache = GraphCache(device, mode="cuda", max_graphs=512)
    out = cache.run(key, fn, what="layers 2..5 at B=1, 208 tokens")   # fn(commit) -> dict of tensors

`fn(commit)` reads only the runner's static buffers and returns its outputs. It is called twice at the first
sight of a key: once eagerly on a side stream with commit=False (warm-up: Triton compilation, cuBLAS
handles; it must not write its own inputs then) and once under capture with commit=True. Every later call
replays the graph; its outputs are the same (static) tensors each time, valid until the next replay of
that key. mode="emulate" (CPU tests) keeps the same bookkeeping but calls fn(True) at every replay, so
tests exercise the static buffers, the buckets and the eager fallback without a GPU.

A failed capture raises GraphCaptureError naming the piece, the shape and what to change, or, with
`capture_fallback=True`, warns once and runs that key eagerly from then on.
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from typing import Callable, Hashable

import torch


class GraphCaptureError(RuntimeError):
    """Capturing a CUDA graph failed; the message says which piece, which shape and what to change."""


HOW_TO_FIX = ("What to change: the usual cause is an operation that needs the host inside the captured piece "
              "(.item(), .tolist(), nonzero, a Python branch on tensor values) or a backend without graph support. "
              "Try runtime.attention=flash (or sdpa), runtime.gemm=torch, runtime.rowwise=torch to find the op; "
              "runtime.capture_fallback=true runs such shapes eagerly; runtime.graphs=false turns graphs off.")


class _Entry:
    __slots__ = ("graph", "fn", "out")

    def __init__(self, graph, fn, out):
        self.graph, self.fn, self.out = graph, fn, out


class GraphCache:
    def __init__(self, device: torch.device, *, mode: str = "cuda", max_graphs: int = 512,
                 capture_fallback: bool = False):
        if mode not in ("cuda", "emulate"):
            raise ValueError(f"GraphCache mode must be cuda or emulate, got {mode!r}")
        if mode == "cuda" and torch.device(device).type != "cuda":
            raise ValueError("GraphCache(mode='cuda') needs a CUDA device; use mode='emulate' on CPU")
        self.device, self.mode = torch.device(device), mode
        self.max_graphs, self.capture_fallback = max_graphs, capture_fallback
        self.pool = torch.cuda.graph_pool_handle() if mode == "cuda" else None
        self.entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self.failed: dict[Hashable, str] = {}
        self.captures = self.replays = self.evictions = self.eager_runs = 0
        self.capture_s = 0.0

    def __contains__(self, key) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def stats(self) -> dict:
        return {"mode": self.mode, "graphs": len(self.entries), "captures": self.captures, "replays": self.replays,
                "evictions": self.evictions, "failed": len(self.failed), "eager_after_failure": self.eager_runs,
                "capture_s": round(self.capture_s, 3)}

    def run(self, key: Hashable, fn: Callable[[bool], dict], what: str) -> dict:
        if key in self.failed:
            self.eager_runs += 1
            return fn(True)
        entry = self.entries.get(key)
        if entry is None:
            entry = self._capture(key, fn, what)
            if entry is None:  # capture failed, fallback allowed
                self.eager_runs += 1
                return fn(True)
        else:
            self.entries.move_to_end(key)
            if entry.graph is None:  # emulated: run the recorded callable
                entry.out = entry.fn(True)
            else:
                entry.graph.replay()
        self.replays += 1
        return entry.out

    def _capture(self, key, fn, what) -> _Entry | None:
        t0 = time.perf_counter()
        if self.mode == "emulate":
            fn(False)  # the same warm-up call as on a GPU: it must not change the static inputs
            entry = _Entry(None, fn, fn(True))
        else:
            try:
                main = torch.cuda.current_stream(self.device)
                side = torch.cuda.Stream(self.device)
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    fn(False)
                main.wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = fn(True)
                entry = _Entry(graph, None, out)
            except Exception as err:  # noqa: BLE001 - re-raised or recorded with what to change
                msg = f"CUDA graph capture of {what} failed ({type(err).__name__}: {err}). {HOW_TO_FIX}"
                if not self.capture_fallback:
                    raise GraphCaptureError(msg) from err
                warnings.warn(msg + " Running this shape eagerly.")
                self.failed[key] = msg
                torch.cuda.synchronize(self.device)
                return None
            graph.replay()  # the capture itself computed nothing
        self.capture_s += time.perf_counter() - t0
        self.captures += 1
        self.entries[key] = entry
        while len(self.entries) > self.max_graphs:
            self.entries.popitem(last=False)
            self.evictions += 1
        return entry
