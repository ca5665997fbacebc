"""Timing on the GPU, shared by the tuner and the benchmarks: a CUDA graph of n calls, replayed."""

from __future__ import annotations

import statistics

import torch


def time_graph_us(fn, n_calls: int, *, reps: int = 7, capture_stream: torch.cuda.Stream | None = None) -> float:
    """Median time per call (microseconds) of fn(i), i = 0..n_calls-1, captured in one CUDA graph.

    capture_stream None: warm-up on a fresh side stream, capture on torch's default capture stream, as the
    runtime's graph cache does (so per-stream state a kernel creates on first use, such as the Hopper GEMM's tile
    counters, is captured as the runtime captures it). A stream: warm-up and capture both on it (the kernels
    alone: their per-stream state exists before the capture).
    """
    stream = capture_stream or torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(n_calls, 3)):
            fn(i)  # warm-up outside the capture: compilation, autotuning of the libraries
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=capture_stream):
        for i in range(n_calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n_calls)
    del graph
    return statistics.median(times)
