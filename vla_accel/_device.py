"""Host <-> device copies that never stall the host (shared by the policy, the pruning plan and the runner)."""

from __future__ import annotations

import numpy as np
import torch


def to_device_async(x, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (a tensor or a numpy array; cast to dtype) on `device`. Host -> CUDA: staged in a pinned buffer from
    torch's caching host allocator and copied non-blocking. A pageable copy would wait for every kernel queued
    before it, and `x.pin_memory()` first asks the driver whether x is pinned (~0.1 ms per call under the profiler
    on an H100). A numpy array of the target dtype is written into the pinned buffer by numpy (two torch calls in
    all: on the GPU host every torch call costs tens of microseconds)."""
    device = torch.device(device)
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(x)
        if device.type != "cuda" or (dtype is not None and dtype != t.dtype):
            return to_device_async(t, device, dtype)
        buf = torch.empty(x.shape, dtype=t.dtype, pin_memory=True)
        buf.numpy()[...] = x
        return buf.to(device, non_blocking=True)
    dtype = dtype or x.dtype
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device, dtype)
    buf = torch.empty(x.shape, dtype=dtype, pin_memory=True)
    buf.copy_(x)
    return buf.to(device, non_blocking=True)


def copy_into_async(dst: torch.Tensor, x: np.ndarray) -> None:
    """dst (a device buffer) <- x (numpy, dst's dtype and shape), without stalling the host."""
    if dst.device.type != "cuda":
        dst.copy_(torch.from_numpy(x))
        return
    buf = torch.empty(x.shape, dtype=dst.dtype, pin_memory=True)
    buf.numpy()[...] = x
    dst.copy_(buf, non_blocking=True)


def to_host_async(x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
    """A CUDA tensor -> (pinned host copy, event on the current stream): the copy is complete once the event is."""
    buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    buf.copy_(x, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(x.device))
    return buf, ev
