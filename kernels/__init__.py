"""Triton kernels for the OFT backbone (FlashDecoding++ ideas): unified-max varlen attention, flat GEMM /
GEMV with fused epilogues, and a per-GPU profiled dispatch table.

    from vla_accel.kernels import attention, linear, gate_up_silu, linear_residual
    out = attention(q, k, v, cu_seqlens, max_seqlen)            # q, k, v: [T, H, D] packed; cu_seqlens int32 [B+1]
    y = linear(x, w)                                            # x: [M, K], w: [N, K]; dispatched per (N, K, M)

On CPU the kernels run under the Triton interpreter: set TRITON_INTERPRET=1 before importing this package
(Triton decides at decoration time).
"""

from .attention import AttentionConfig, attention
from .calibrate import SoftmaxCalibration, calibrate_phi, default_safe_range, row_logsumexp
from .dispatch import (
                       DispatchTable,
                       build_rules,
                       choose,
                       choose_attention,
                       default_table,
                       gate_up_silu,
                       linear,
                       linear_residual,
                       load_table,
                       run_impl,
)
from .gemm import GemmConfig, GemvConfig, flat_gemm, gemv
from .reference import attention_reference, gate_up_silu_reference, linear_reference

__all__ = [
    "attention", "attention_reference", "AttentionConfig",
    "flat_gemm", "gemv", "gate_up_silu", "linear_residual", "linear", "run_impl",
    "GemmConfig", "GemvConfig",
    "DispatchTable", "choose", "choose_attention", "load_table", "default_table", "build_rules",
    "SoftmaxCalibration", "calibrate_phi", "default_safe_range", "row_logsumexp",
    "linear_reference", "gate_up_silu_reference",
]
