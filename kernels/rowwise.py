"""Launchers of the row-wise kernels (rowwise_kernel.py) used by the accelerated runtime.

    y = rms_norm(x, w, eps)                        # x: [T, D] -> [T, D]; Llama's RMSNorm, one pass
    q, k = rope_split(qkv, positions, cos, sin, heads)   # qkv: [T, 3*H*d] -> rotated q, k: [T, H, d]
    a = silu_mul(gu)                               # gu: [T, 2I] = [gate | up] -> silu(gate) * up: [T, I]
    y = add_layer_norm(x, r, g, w, b, eps)         # x += r * g (in place), then y = LayerNorm(x) (vision towers)
    # cos, sin: half-tables [P, d/2] (cos / sin of position x inverse frequency, the first half of Llama's)

Their reference is the model's own arithmetic (vla_accel.model.llama: rms_norm, apply_rope, silu_mul; vit:
add_layer_norm); the tests compare against it.
No host synchronisation: every launcher is CUDA-graph safe. On CPU the kernels run only under the Triton
interpreter (TRITON_INTERPRET=1 before the first import of this package).
"""

from __future__ import annotations

import torch
import triton

from . import rowwise_kernel as _k


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _check_rows(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{name} must be 2-D [T, N] with a contiguous last dim; got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")


# ---------------------------------------------------------------- RMSNorm
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, D], w: [D] -> w * (x * rsqrt(mean(x^2) + eps)) in x's dtype (fp32 statistics)."""
    _check_rows("x", x)
    T, D = x.shape
    if w.shape != (D,):
        raise ValueError(f"norm weight must be [{D}], got {tuple(w.shape)}")
    y = out if out is not None else torch.empty_like(x)
    if T:
        block = _pow2(D)
        _k.rms_norm_kernel[(T,)](x, w, y, x.stride(0), y.stride(0), D, float(eps), BLOCK=block,
                                 num_warps=8 if block >= 4096 else 4)
    return y


# ---------------------------------------------------------------- RoPE
def rope_split(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv: [T, 3*H*d] rows [q | k | v]; positions: [T] int64 (RoPE index of each row) -> q, k [T, H, d]
    rotated (Llama's rotate_half convention), contiguous. v stays a view of qkv."""
    _check_rows("qkv", qkv)
    T, N = qkv.shape
    d = N // (3 * heads)
    if 3 * heads * d != N or d % 2 or _pow2(d // 2) != d // 2:
        raise ValueError(f"qkv width {N} is not 3 * {heads} heads * a head dim with a power-of-two half")
    if cos.shape[1] != d // 2 or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [P, {d // 2}], got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if positions.shape != (T,) or positions.dtype != torch.int64:
        raise ValueError(f"positions must be int64 [{T}], got {positions.dtype} {tuple(positions.shape)}")
    q = torch.empty((T, heads, d), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty_like(q)
    if T:
        _k.rope_split_kernel[(T, 2)](qkv, positions, cos, sin, q, k, qkv.stride(0), heads * d, heads,
                                     HALF=d // 2, BLOCK_H=_pow2(heads), num_warps=4)
    return q, k


# ---------------------------------------------------------------- SiLU * up
def silu_mul(gu: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gu: [T, 2I] = [gate | up] -> silu(gate) * up: [T, I]."""
    _check_rows("gu", gu)
    T, N = gu.shape
    if N % 2:
        raise ValueError(f"gate|up width must be even, got {N}")
    inter = N // 2
    y = out if out is not None else torch.empty((T, inter), dtype=gu.dtype, device=gu.device)
    if T:
        block = min(1024, _pow2(inter))
        _k.silu_mul_kernel[(T, triton.cdiv(inter, block))](gu, y, gu.stride(0), y.stride(0), inter, BLOCK=block,
                                                           num_warps=4)
    return y


# ---------------------------------------------------------------- residual (+ layer scale) + LayerNorm
def add_layer_norm(x: torch.Tensor, r: torch.Tensor, g: torch.Tensor | None, w: torch.Tensor, b: torch.Tensor,
                   eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, D] residual stream, UPDATED IN PLACE to x + r * g (g: layer scale [D], None = 1); returns
    LayerNorm(x) * w + b [T, D]. One pass instead of torch's addcmul + layer_norm."""
    _check_rows("x", x)
    _check_rows("r", r)
    T, D = x.shape
    if r.shape != x.shape or w.shape != (D,) or b.shape != (D,) or (g is not None and g.shape != (D,)):
        raise ValueError(f"add_layer_norm: x {tuple(x.shape)} needs r of the same shape and g / w / b of [{D}]; "
                         f"got r {tuple(r.shape)}, g {None if g is None else tuple(g.shape)}, w {tuple(w.shape)}, "
                         f"b {tuple(b.shape)}")
    y = out if out is not None else torch.empty_like(x)
    if T:
        block = _pow2(D)
        _k.add_layer_norm_kernel[(T,)](x, r, g if g is not None else w, w, b, y, x.stride(0), r.stride(0),
                                       y.stride(0), D, float(eps), HAS_G=g is not None, BLOCK=block,
                                       num_warps=8 if block >= 2048 else 4)
    return y
