"""Triton kernels for the OFT backbone (FlashDecoding++ ideas): unified-max varlen attention, flat GEMM /
GEMV with fused epilogues, row-wise ops, and a per-GPU profiled dispatch table.

    from vla_accel.kernels import attention, linear, gate_up_silu, linear_residual
    out = attention(q, k, v, cu_seqlens, max_seqlen)            # q, k, v: [T, H, D] packed; cu_seqlens int32 [B+1]
    y = linear(x, w)                                            # x: [M, K], w: [N, K]; dispatched per (N, K, M)

Layers, bottom up (this package imports nothing else of vla_accel): *_kernel.py (@triton.jit only) ->
configs.py (tile configs and their names) -> gemm.py, attention.py, rowwise.py (launchers) -> registry.py
(the GEMM implementation families) -> table.py (dispatch table: schema, files, `choose`) -> launch.py
(dispatching launchers) -> tune.py (the tuner) ; timing.py (CUDA-graph timer), calibrate.py (softmax offset),
reference.py (fp32 references of the GEMMs and attention; the row-wise ops' reference is the model's own
arithmetic, vla_accel.model, which the tests compare against).

On CPU the kernels run under the Triton interpreter: set TRITON_INTERPRET=1 before importing this package
(Triton decides at decoration time).
"""

from .attention import attention
from .calibrate import SoftmaxCalibration, calibrate_phi, default_safe_range, row_logsumexp
from .configs import AttentionConfig, GemmConfig, GemvConfig
from .gemm import flat_gemm, gemv
from .launch import gate_up_silu, linear, linear_residual, run_impl
from .reference import attention_reference, linear_reference
from .registry import FAMILIES, GemmFamily, register
from .table import DispatchTable, choose, choose_attention, default_table, load_table, table_for_gpu, user_table_dir

__all__ = [
    "attention", "attention_reference", "AttentionConfig",
    "flat_gemm", "gemv", "gate_up_silu", "linear_residual", "linear", "run_impl",
    "GemmConfig", "GemvConfig", "FAMILIES", "GemmFamily", "register",
    "DispatchTable", "choose", "choose_attention", "load_table", "default_table", "table_for_gpu", "user_table_dir",
    "SoftmaxCalibration", "calibrate_phi", "default_safe_range", "row_logsumexp",
    "linear_reference",
]
