"""Launcher: varlen softmax attention with the unified-max softmax (attention_kernel.py).

    out = attention(q, k, v, cu_seqlens, max_seqlen)                       # bidirectional
    out, key_mass = attention(q, k, v, cu, L, score_rows=text_rows)        # + attention mass per key
    stats = {}; attention(q, k, v, cu, L, phi=cal.phi, stats=stats)       # stats["fallback_rows"]: device int

q, k, v: [T_total, H, D] packed sequences (flash-attn varlen layout), cu_seqlens int32 [B+1], D a power of
two in [16, 256]. phi: the model's fixed softmax offset, in units of scaled logits (q.k * sm_scale),
calibrated offline (calibrate.py); safe_range: (lo, hi) around phi, same units (default per dtype,
calibrate.default_safe_range). Rows whose log-sum-exp of logits minus phi leaves [lo, hi] are recomputed
in-kernel with the online softmax: the result is finite for any finite logits.

With score_rows, the attention kernel also stores each row's log-sum-exp and a second, small kernel
(attention_key_mass_kernel) computes the key mass from the selected rows only: the attention itself runs
as without scoring.

No host synchronisation happens here (CUDA-graph friendly): the fallback count in `stats` stays a
device tensor until the caller reads it.
"""

from __future__ import annotations

import math

import torch

from . import attention_kernel as _k
from .calibrate import default_safe_range
from .configs import AttentionConfig, cdiv, default_attention_config
from .table import choose_attention, default_table

LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# key-mass kernel: (query rows, keys) per step. 64 x 64 with 4 warps and at most 4 row tiles per selection
# load needs 128 registers (Triton 3.6, sm_90): 4 programs per SM; 16 row tiles per load took 153.
_SCORE_TILES_GPU = (64, 64)
_SCORE_TILES_CPU = (32, 32)  # interpreter: cheaper steps
_SCORE_GROUP_MAX = 4  # row tiles whose selection the key-mass kernel reads with one load


def _check(q, k, v, cu_seqlens, score_rows):
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must be [T, H, D] of one shape; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of {_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    d = q.shape[2]
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head dim must be a power of two in [16, 256]; got {d}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous along the head dim")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be int32 [B+1]; got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    if score_rows is not None and (score_rows.shape != (q.shape[0],) or score_rows.device != q.device):
        raise ValueError(f"score_rows must be [T] = [{q.shape[0]}] on {q.device}; got {tuple(score_rows.shape)}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *,
              causal: bool = False, phi: float | None = None, safe_range: tuple[float, float] | None = None,
              score_rows: torch.Tensor | None = None, sm_scale: float | None = None, stats: dict | None = None,
              online: bool = False, config: AttentionConfig | str | None = None, table=None):
    """Softmax attention over packed sequences. Returns out [T, H, D] (q's dtype), or (out, key_mass fp32 [T])
    when score_rows (bool [T]) is given. See the module docstring; attention_reference has the semantics.

    online=True forces the online-softmax path everywhere (the baseline the unified path is measured against).
    config: tile configuration (or its name); else the table's attention rule for (D, max_seqlen)
    (table None: table.default_table(q.device)), else default_attention_config.
    stats, if a dict, receives "fallback_rows" (int64 device tensor: rows x heads that left the safe range),
    "rows" (T * H) and "flags" (bool [T, H]).
    """
    _check(q, k, v, cu_seqlens, score_rows)
    t, h, d = q.shape
    batch = cu_seqlens.numel() - 1
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    lo, hi = safe_range if safe_range is not None else default_safe_range(q.dtype)
    if not lo < hi:
        raise ValueError(f"safe_range must be (lo, hi) with lo < hi; got {safe_range}")
    phi = 0.0 if phi is None else float(phi)
    cfg = _pick_config(config, table, d, max_seqlen, q.device)

    out = torch.empty_like(q)  # [T, H, D]
    scoring = score_rows is not None
    want_flags = stats is not None
    # unused buffers are never touched by the kernels (constexpr flags): pass `out` instead of allocating
    if scoring:
        key_mass = torch.zeros(t, dtype=torch.float32, device=q.device)  # [T]
        lse = torch.empty((t, h), dtype=torch.float32, device=q.device)  # [T, H], every row of a sequence written
        # bool rows are read as bytes in place (no conversion kernel)
        sel = score_rows.view(torch.uint8) if score_rows.dtype == torch.bool else (score_rows != 0).view(torch.uint8)
    else:
        key_mass = lse = sel = out
    # every row inside a sequence gets its flag written; zeros only matter for rows outside all sequences
    flags = (torch.zeros if want_flags else torch.empty)((t, h), dtype=torch.int8, device=q.device)
    if t > 0 and max_seqlen > 0:
        dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
        # grid: (query tiles, B*H): the tiles of one (sequence, head) are issued together (see the kernel)
        grid = (cdiv(max_seqlen, cfg.block_m), batch * h)
        _k.attention_fwd_kernel[grid](
            q, k, v, out, cu_seqlens, lse, flags,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            h, scale * LOG2E, phi * LOG2E, lo * LOG2E, hi * LOG2E,
            HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            CAUSAL=causal, UNIFIED=not online, SCORE=scoring, DOT_PRECISION=dot_precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if scoring:  # the selected rows x all keys of their sequence, one program per (key block, head)
            bm, bn = _SCORE_TILES_GPU if q.device.type == "cuda" else _SCORE_TILES_CPU
            n_tiles = cdiv(max_seqlen, bm)
            group = min(_SCORE_GROUP_MAX, max(2, 1 << (n_tiles - 1).bit_length()))  # power of two
            _k.attention_key_mass_kernel[(cdiv(max_seqlen, bn), batch * h)](
                q, k, cu_seqlens, sel, lse, key_mass,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                h, scale * LOG2E,
                HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, GROUP=group,
                CAUSAL=causal, DOT_PRECISION=dot_precision,
                num_warps=4, num_stages=1,
            )
    if want_flags:
        stats["flags"] = flags.bool()
        stats["fallback_rows"] = flags.sum(dtype=torch.int64)
        stats["rows"] = t * h
    return (out, key_mass) if scoring else out


def _pick_config(config, table, head_dim: int, max_seqlen: int, device: torch.device) -> AttentionConfig:
    if isinstance(config, AttentionConfig):
        return config
    if isinstance(config, str):
        return AttentionConfig.parse(config)
    if device.type == "cuda":
        name = choose_attention(table if table is not None else default_table(device), head_dim, max_seqlen)
        if name is not None:
            return AttentionConfig.parse(name)
    return default_attention_config(head_dim, max_seqlen, device)
