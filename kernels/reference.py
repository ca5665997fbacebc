"""Plain-torch fp32 references of the GEMMs and of attention (the ground truth of the kernel tests).

Each takes the same arguments as its fast counterpart; `out_dtype` (default: the input dtype) lets a test keep
the fp32 result instead of rounding it. The row-wise ops (RMSNorm, RoPE, SiLU * up, residual + LayerNorm) and the
gated epilogue have one reference, the model's own arithmetic (vla_accel.model.llama / vit): the tests compare
against that, and this package keeps no copy of it (it imports nothing of vla_accel outside itself).
"""

from __future__ import annotations

import math

import torch


def linear_reference(x: torch.Tensor, w: torch.Tensor, *, bias: torch.Tensor | None = None,
                     residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    # x: [M, K], w: [N, K], bias: [N], residual: [M, N] -> [M, N]
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    if residual is not None:
        y = y + residual.float()
    return y.to(out_dtype or x.dtype)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                        max_seqlen: int, *, causal: bool = False, phi: float | None = None,
                        safe_range: tuple[float, float] | None = None, score_rows: torch.Tensor | None = None,
                        sm_scale: float | None = None, out_dtype: torch.dtype | None = None):
    """Softmax attention per packed sequence, in fp32, with a plain (max-subtracted) softmax.

    q, k, v: [T, H, D]; cu_seqlens: int32 [B+1]; score_rows: bool [T] or None.
    Returns out [T, H, D], or (out, key_mass [T] fp32) when score_rows is given: for each key, the
    softmax probability it receives, averaged over heads and over the selected query rows of its own
    sequence (0 in sequences with no selected rows). phi and safe_range do not change the result
    (the unified-max softmax computes the same function); they are accepted for a common signature.
    """
    del phi, safe_range, max_seqlen
    t, h, d = q.shape
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    out = torch.empty((t, h, d), dtype=torch.float32, device=q.device)
    key_mass = torch.zeros(t, dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].float().transpose(0, 1)  # [H, L, D]
        ks = k[start:end].float().transpose(0, 1)
        vs = v[start:end].float().transpose(0, 1)
        s = qs @ ks.transpose(1, 2) * scale  # [H, L, L]
        if causal:
            n = end - start
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        p = torch.softmax(s, dim=-1)
        out[start:end] = (p @ vs).transpose(0, 1)
        if score_rows is not None:
            sel = score_rows[start:end].bool()
            if sel.any():
                key_mass[start:end] = p[:, sel, :].mean(dim=(0, 1))
    out = out.to(out_dtype or q.dtype)
    return (out, key_mass) if score_rows is not None else out
