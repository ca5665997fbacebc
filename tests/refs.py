"""References the kernel tests compare against: for the row-wise ops and the gated epilogue, the model's own
arithmetic (one reference per op; vla_accel.kernels keeps no copy of it)."""

import torch

from vla_accel.kernels import linear_reference
from vla_accel.model.llama import apply_rope, rope_cos_sin, silu_mul


def gate_up_silu_ref(x, w_gate_up):
    """fp32 [M, I]: the model's SiLU(gate) * up of the fp32 product x @ [Wg; Wu].T."""
    return silu_mul(*linear_reference(x, w_gate_up, out_dtype=torch.float32).chunk(2, dim=-1))


def rope_split_ref(qkv, positions, heads: int, theta: float = 10000.0):
    """qkv [T, 3*H*d] -> q, k [T, H, d] rotated by the model's apply_rope at `positions` (its own cos / sin)."""
    T = qkv.shape[0]
    d = qkv.shape[1] // (3 * heads)
    c, s = rope_cos_sin(positions[None], d, theta, qkv.dtype)  # [1, 1, T, d]
    out = []
    for part in (0, 1):
        x = qkv[:, part * heads * d:(part + 1) * heads * d].view(1, T, heads, d).transpose(1, 2)
        out.append(apply_rope(x, c, s).transpose(1, 2)[0])
    return out
