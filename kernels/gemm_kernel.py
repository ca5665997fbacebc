"""Triton kernels for small-M linear layers: flat GEMM (split-K capable), its split-K reduction, and a GEMV.

Only @triton.jit code lives here; shape checks, allocation and launch are in gemm.py.

All kernels work on tiles in the "swapped" orientation: an accumulator tile is [BLOCK_N, BLOCK_M]
(weight rows x tokens), i.e. y^T = W @ x^T. The weight side (large N) then fills the tensor-core
instruction's M dimension (64 per warpgroup on Hopper) and the few tokens become its N dimension,
which only needs padding to 16 (Triton's minimum dot size) instead of 64.

Epilogues (constexpr-selected):
  GATED   : W holds [gate rows; up rows] ([2*N, K]); out = silu(x @ Wg^T) * (x @ Wu^T)    -> [M, N]
  HAS_BIAS: out += bias[N]
  HAS_RES : out += residual[M, N]
"""

import triton
import triton.language as tl


@triton.jit
def _epilogue_store(acc, acc_up, offs_n, offs_m, M, N, OUT, RES, BIAS, stride_om, stride_rm,
                    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    # acc, acc_up: [BLOCK_N, BLOCK_M] fp32 (acc_up only read when GATED); offs_n: [BLOCK_N]; offs_m: [BLOCK_M]
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    if GATED:
        # silu(g) * u in fp32; bias (if any) applies to the product's output, as for an ungated layer
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0)
        acc = acc + bias.to(tl.float32)[:, None]
    if HAS_RES:
        res = tl.load(RES + offs_m[None, :] * stride_rm + offs_n[:, None], mask=mask, other=0.0)
        acc = acc + res.to(tl.float32)
    tl.store(OUT + offs_m[None, :] * stride_om + offs_n[:, None], acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def flat_gemm_kernel(
    X, W, OUT, RES, BIAS, WS,  # x [M, K]; w [N or 2N, K]; out [M, N]; residual [M, N]; bias [N]; ws fp32 [S, G, M, N]
    M, N, K, k_per_split,  # N = output columns (gate width when GATED); k_per_split: multiple of BLOCK_K
    stride_xm, stride_wn, stride_om, stride_rm,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,  # True: write fp32 partial sums to WS (reduced by splitk_reduce_kernel)
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks along K
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)

    w_ptrs = W + offs_n[:, None] * stride_wn  # [BLOCK_N, 1]
    x_ptrs = X + offs_m[None, :] * stride_xm  # [1, BLOCK_M]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            w = tl.load(w_ptrs + offs_k[None, :], mask=n_mask[:, None], other=0.0)  # [BLOCK_N, BLOCK_K]
            xt = tl.load(x_ptrs + offs_k[:, None], mask=m_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
        else:
            k_mask = offs_k < k_end
            w = tl.load(w_ptrs + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            xt = tl.load(x_ptrs + offs_k[:, None], mask=m_mask[None, :] & k_mask[:, None], other=0.0)
        acc = tl.dot(w, xt, acc, input_precision=DOT_PRECISION)
        if GATED:
            if EVEN_K:
                wu = tl.load(w_ptrs + N * stride_wn + offs_k[None, :], mask=n_mask[:, None], other=0.0)
            else:
                wu = tl.load(w_ptrs + N * stride_wn + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                             other=0.0)
            acc_up = tl.dot(wu, xt, acc_up, input_precision=DOT_PRECISION)

    if SPLIT:
        # partial sums: ws[pid_k, g, m, n]
        mask = n_mask[:, None] & m_mask[None, :]
        base = WS + pid_k * (1 + GATED) * M * N + offs_m[None, :] * N + offs_n[:, None]
        tl.store(base, acc, mask=mask)
        if GATED:
            tl.store(base + M * N, acc_up, mask=mask)
    else:
        _epilogue_store(acc, acc_up, offs_n, offs_m, M, N, OUT, RES, BIAS, stride_om, stride_rm,
                        GATED, HAS_BIAS, HAS_RES)


@triton.jit(do_not_specialize=["M"])
def splitk_reduce_kernel(
    WS, OUT, RES, BIAS,  # ws fp32 [S, G, M, N]; out [M, N]
    M, N, num_splits,
    stride_om, stride_rm,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    ptrs = WS + offs_m[None, :] * N + offs_n[:, None]  # [BLOCK_N, BLOCK_M]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for s in range(0, num_splits):
        acc += tl.load(ptrs + s * (1 + GATED) * M * N, mask=mask, other=0.0)
        if GATED:
            acc_up += tl.load(ptrs + s * (1 + GATED) * M * N + M * N, mask=mask, other=0.0)
    _epilogue_store(acc, acc_up, offs_n, offs_m, M, N, OUT, RES, BIAS, stride_om, stride_rm,
                    GATED, HAS_BIAS, HAS_RES)


@triton.jit(do_not_specialize=["M"])
def gemv_kernel(
    X, W, OUT, RES, BIAS,  # x [M, K] (M <= BLOCK_M); w [N or 2N, K]; out [M, N]
    M, N, K,
    stride_xm, stride_wn, stride_om, stride_rm,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
):
    # CUDA-core path for the smallest M: element-wise products accumulate in a [BLOCK_N, BLOCK_M, BLOCK_K]
    # register tile; the reduction over K happens once, after the loop.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_ptrs = W + offs_n[:, None] * stride_wn  # [BLOCK_N, 1]
    x_ptrs = X + offs_m[:, None] * stride_xm  # [BLOCK_M, 1]
    acc3 = tl.zeros([BLOCK_N, BLOCK_M, BLOCK_K], dtype=tl.float32)
    acc3_up = tl.zeros([BLOCK_N, BLOCK_M, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            w = tl.load(w_ptrs + offs_k[None, :], mask=n_mask[:, None], other=0.0)  # [BLOCK_N, BLOCK_K]
            x = tl.load(x_ptrs + offs_k[None, :], mask=m_mask[:, None], other=0.0)  # [BLOCK_M, BLOCK_K]
        else:
            k_mask = offs_k < K
            w = tl.load(w_ptrs + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            x = tl.load(x_ptrs + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        xf = x.to(tl.float32)[None, :, :]
        acc3 += w.to(tl.float32)[:, None, :] * xf
        if GATED:
            if EVEN_K:
                wu = tl.load(w_ptrs + N * stride_wn + offs_k[None, :], mask=n_mask[:, None], other=0.0)
            else:
                wu = tl.load(w_ptrs + N * stride_wn + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                             other=0.0)
            acc3_up += wu.to(tl.float32)[:, None, :] * xf
    acc = tl.sum(acc3, axis=2)  # [BLOCK_N, BLOCK_M]
    acc_up = tl.sum(acc3_up, axis=2)
    _epilogue_store(acc, acc_up, offs_n, offs_m, M, N, OUT, RES, BIAS, stride_om, stride_rm,
                    GATED, HAS_BIAS, HAS_RES)
