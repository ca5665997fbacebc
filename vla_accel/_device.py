"""Host -> device copies that never stall the host (shared by the policy and the pruning plan)."""

from __future__ import annotations

import torch


def to_device_async(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (cast to dtype) on `device`. Host -> CUDA: staged in a pinned buffer from torch's caching host allocator
    and copied non-blocking. A pageable copy would wait for every kernel queued before it, and `x.pin_memory()`
    first asks the driver whether x is pinned (~0.1 ms per call under the profiler on an H100)."""
    device = torch.device(device)
    dtype = dtype or x.dtype
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device, dtype)
    buf = torch.empty(x.shape, dtype=dtype, pin_memory=True)
    buf.copy_(x)
    return buf.to(device, non_blocking=True)
