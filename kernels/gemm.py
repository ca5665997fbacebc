"""Launchers for the small-M linear kernels (gemm_kernel.py): flat GEMM (optionally split-K), GEMV, and the
fused epilogues (gate*SiLU*up, bias, residual add).

Weights follow torch.nn.Linear: w is [N, K] and y = x @ w.T; x is [M, K] (2-D, last dim contiguous).

    y = flat_gemm(x, w)                                   # [M, N]
    y = flat_gemm(x, w, residual=r, config=GemmConfig(block_n=64, block_m=16, split_k=4))
    h = flat_gemm(x, w_gate_up, gated=True)               # silu(x @ Wg.T) * (x @ Wu.T), [M, N/2]
    y = gemv(x, w)                                        # CUDA-core path, M <= 16

A kernel configuration (configs.py) has a short name (`GemmConfig.name`, `GemvConfig.name`, e.g.
"flat:bn64.bm16.bk128.w4.s4.k2"): that is what the dispatch table (table.py) stores.
"""

from __future__ import annotations

import torch

from . import gemm_kernel as _k
from .configs import GemmConfig, GemvConfig, cdiv as _cdiv, default_gemm_config, next_pow2 as _next_pow2

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (not TF32), so fp32 results match a fp32 reference
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None, bias: torch.Tensor | None,
           gated: bool) -> tuple[torch.Tensor, int, int, int]:
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"x must be [M, K] and w [N, K]; got x {tuple(x.shape)}, w {tuple(w.shape)}")
    if x.dtype not in _DTYPES or w.dtype != x.dtype:
        raise ValueError(f"x and w must share one of {_DTYPES}; got {x.dtype} and {w.dtype}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"K mismatch: x {tuple(x.shape)} vs w {tuple(w.shape)}")
    if x.device != w.device:
        raise ValueError(f"x on {x.device} but w on {w.device}")
    if w.stride(1) != 1:
        raise ValueError("w must be contiguous along K (w.stride(1) == 1)")
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = w.shape[0]
    if gated:
        if n % 2:
            raise ValueError(f"gated weights are [2*I, K] (gate rows then up rows); got {n} rows")
        n //= 2
    if residual is not None and (residual.shape != (m, n) or residual.dtype != x.dtype or residual.stride(1) != 1):
        raise ValueError(f"residual must be [{m}, {n}] {x.dtype}, contiguous along N; got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype or not bias.is_contiguous()):
        raise ValueError(f"bias must be [{n}] {x.dtype}; got {tuple(bias.shape)} {bias.dtype}")
    return x, m, n, k


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def flat_gemm(x: torch.Tensor, w: torch.Tensor, *, bias: torch.Tensor | None = None,
              residual: torch.Tensor | None = None, gated: bool = False,
              config: GemmConfig | str | None = None) -> torch.Tensor:
    """y = epilogue(x @ w.T) with the flat (tensor-core, small-M) kernel.

    x: [M, K]; w: [N, K] ([2*I, K] gate-then-up rows when gated); bias: [N]; residual: [M, N] -> y: [M, N] (or [M, I]).
    """
    x, m, n, k = _check(x, w, residual, bias, gated)
    if isinstance(config, str):
        config = GemmConfig.parse(config)
    cfg = config or default_gemm_config(m, n, k, gated=gated, num_sms=_num_sms(x.device))
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out

    k_tiles = _cdiv(k, cfg.block_k)
    split = max(1, min(cfg.split_k, k_tiles))
    k_per_split = _cdiv(k_tiles, split) * cfg.block_k
    split = _cdiv(k, k_per_split)  # no empty splits
    even_k = k % cfg.block_k == 0
    grid = (_cdiv(n, cfg.block_n), _cdiv(m, cfg.block_m), split)
    res = residual if residual is not None else out
    bias_t = bias if bias is not None else out
    ws = torch.empty((split, 1 + int(gated), m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    _k.flat_gemm_kernel[grid](
        x, w, out, res, bias_t, ws,
        m, n, k, k_per_split,
        x.stride(0), w.stride(0), out.stride(0), res.stride(0),
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k,
        SPLIT=split > 1, EVEN_K=even_k,
        GATED=gated, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        bn, bm = 64, 32
        _k.splitk_reduce_kernel[(_cdiv(n, bn), _cdiv(m, bm))](
            ws, out, res, bias_t,
            m, n, split,
            out.stride(0), res.stride(0),
            BLOCK_N=bn, BLOCK_M=bm,
            GATED=gated, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
            num_warps=4,
        )
    return out


GEMV_MAX_M = 16


def gemv(x: torch.Tensor, w: torch.Tensor, *, bias: torch.Tensor | None = None,
         residual: torch.Tensor | None = None, gated: bool = False,
         config: GemvConfig | str | None = None) -> torch.Tensor:
    """Same contract as flat_gemm, on CUDA cores, for M <= 16 tokens (x: [M, K], w: [N, K] -> [M, N])."""
    x, m, n, k = _check(x, w, residual, bias, gated)
    if m > GEMV_MAX_M:
        raise ValueError(f"gemv handles M <= {GEMV_MAX_M} tokens; got M = {m} (use flat_gemm)")
    if isinstance(config, str):
        config = GemvConfig.parse(config)
    cfg = config or GemvConfig()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    bm = _next_pow2(m)
    # the [BLOCK_N, BLOCK_M, BLOCK_K] register tile grows with M: shrink BLOCK_K to keep it bounded
    bk = max(16, min(cfg.block_k, cfg.block_k * 2 // bm))
    res = residual if residual is not None else out
    bias_t = bias if bias is not None else out
    _k.gemv_kernel[(_cdiv(n, cfg.block_n),)](
        x, w, out, res, bias_t,
        m, n, k,
        x.stride(0), w.stride(0), out.stride(0), res.stride(0),
        BLOCK_N=cfg.block_n, BLOCK_M=bm, BLOCK_K=bk,
        EVEN_K=k % bk == 0, GATED=gated, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        num_warps=cfg.num_warps,
    )
    return out
