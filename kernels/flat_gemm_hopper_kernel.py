"""Triton kernel for flat GEMMs on Hopper (sm_90) at M = 64..768 tokens: out = epilogue(x @ W^T).

Only @triton.jit code lives here; shape checks, schedules and workspaces are in flat_gemm_hopper.py.

Tiles are [BLOCK_M tokens, BLOCK_N weight rows]: the tokens fill the tensor-core instruction's M side (64 rows
per warpgroup), the weight rows its N side. Tile t covers tokens (t % num_m) and weight rows (t // num_m): the
m-tiles of one weight block are neighbours in launch order, so they run together and the block comes from
HBM once (the activations, <= 17 MB here, stay in L2).

One kernel, three schedules, chosen by the launch grid P and one scalar (num_dp_tiles):
  tiles [0, num_dp_tiles)       data-parallel: program p computes tiles p, p + P, ... over the full K;
  tiles [num_dp_tiles, tiles)   stream-K: their K iterations, laid out tile after tile, are cut into P equal
                                contiguous ranges, one per program (a range may cover parts of several tiles).
Split-K by S is the stream-K region over all tiles with P = S * tiles; plain data-parallel is P = tiles.

A tile computed by several programs ("segments") is finished deterministically: every segment writes its fp32
partial sum to its own workspace slot (slot = its rank among the tile's segments), then takes a ticket from the
tile's counter (one atomic add, acquire-release). The segment holding the last ticket adds the slots in slot
order (a fixed order, whoever arrives last), applies the epilogue and resets the counter to zero for the next
launch. No program ever waits for another, so any grid size is safe; the atomics only elect the finisher and
never change the result.

Loads: USE_TMA reads x and W tiles through host-built tensor descriptors (the copy engine; out-of-range rows
and columns read as zero); otherwise masked pointer loads (cp.async on sm_90; the only path the interpreter
must support). Epilogues (constexpr): GATED silu(x @ Wg^T) * (x @ Wu^T); HAS_BIAS + bias[N]; HAS_RES
+ residual[M, N] (the output may be the residual itself: each element is read before it is written, by the
same program).
"""

import triton
import triton.language as tl


@triton.jit
def _mainloop(X, W, WU, off_m, off_n, k_lo, k_hi, M, N, K, stride_xm, stride_wn,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr,
              EVEN_K: tl.constexpr, GATED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # K iterations [k_lo, k_hi) of one tile -> acc, acc_up: [BLOCK_M, BLOCK_N] fp32 (acc_up only when GATED)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:
        for kt in range(k_lo, k_hi):
            k0 = kt * BLOCK_K
            a = X.load([off_m, k0])  # [BLOCK_M, BLOCK_K]
            b = W.load([off_n, k0])  # [BLOCK_N, BLOCK_K]
            acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
            if GATED:
                acc_up = tl.dot(a, WU.load([off_n, k0]).T, acc_up, input_precision=DOT_PRECISION)
    else:
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m[:, None] < M
        n_mask = offs_n[:, None] < N
        x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
        w_ptrs = W + offs_n[:, None] * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
        wu_ptrs = WU + offs_n[:, None] * stride_wn + offs_k[None, :]
        for kt in range(k_lo, k_hi):
            k0 = kt * BLOCK_K
            if EVEN_K:
                a = tl.load(x_ptrs + k0, mask=m_mask, other=0.0)
                b = tl.load(w_ptrs + k0, mask=n_mask, other=0.0)
            else:
                k_mask = (k0 + offs_k)[None, :] < K
                a = tl.load(x_ptrs + k0, mask=m_mask & k_mask, other=0.0)
                b = tl.load(w_ptrs + k0, mask=n_mask & k_mask, other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
            if GATED:
                if EVEN_K:
                    bu = tl.load(wu_ptrs + k0, mask=n_mask, other=0.0)
                else:
                    bu = tl.load(wu_ptrs + k0, mask=n_mask & k_mask, other=0.0)
                acc_up = tl.dot(a, tl.trans(bu), acc_up, input_precision=DOT_PRECISION)
    return acc, acc_up


@triton.jit
def _epilogue(acc, acc_up, off_m, off_n, M, N, OUT, RES, BIAS, stride_om, stride_rm,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    # acc, acc_up: [BLOCK_M, BLOCK_N] fp32 sums over the full K -> out[off_m:, off_n:] (masked to [M, N])
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if GATED:  # silu(g) * u in fp32; a bias applies to the product, as for an ungated layer
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        acc = acc + tl.load(RES + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "num_dp_tiles", "max_seg"])
def flat_gemm_hopper_kernel(
    X, W, WU,  # x [M, K], W [N, K] (gate rows when GATED), WU [N, K] up rows: pointers, or descriptors if USE_TMA
    OUT, RES, BIAS,  # out [M, N]; residual [M, N] (HAS_RES); bias [N] (HAS_BIAS)
    WS, COUNTERS,  # fp32 partial sums [stream-K tiles, max_seg, 1 + GATED, BLOCK_M, BLOCK_N]; int32 [stream-K tiles]
    M, N, K,
    stride_xm, stride_wn, stride_om, stride_rm,
    num_dp_tiles,  # tiles computed whole (data-parallel); the rest are stream-K
    max_seg,  # workspace slots per stream-K tile (>= the most segments any tile has)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_TMA: tl.constexpr, EVEN_K: tl.constexpr, WARP_SPEC: tl.constexpr,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_tiles = num_m * tl.cdiv(N, BLOCK_N)
    iters = tl.cdiv(K, BLOCK_K)  # K iterations per tile

    # ---- data-parallel tiles (WARP_SPEC: Triton splits this loop into a TMA producer warpgroup and consumer
    # warpgroups; on sm_90 with Triton 3.6 it does so for num_warps = 4 only, giving 12 warps)
    for tile in tl.range(pid, num_dp_tiles, num_programs, warp_specialize=WARP_SPEC):
        off_m = (tile % num_m) * BLOCK_M
        off_n = (tile // num_m) * BLOCK_N
        acc, acc_up = _mainloop(X, W, WU, off_m, off_n, 0, iters, M, N, K, stride_xm, stride_wn,
                                BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA, EVEN_K, GATED, DOT_PRECISION)
        _epilogue(acc, acc_up, off_m, off_n, M, N, OUT, RES, BIAS, stride_om, stride_rm,
                  BLOCK_M, BLOCK_N, GATED, HAS_BIAS, HAS_RES)

    if WARP_SPEC:  # data-parallel schedules only: Triton 3.6 specialises the tile loop only without what follows
        return

    # ---- stream-K tiles: this program's iterations [it, end) of the region's sk_iters (int64: P * sk_iters
    # exceeds 2^31 for split-K grids at large M)
    sk_iters = (num_tiles - num_dp_tiles).to(tl.int64) * iters
    it = pid.to(tl.int64) * sk_iters // num_programs
    end = (pid + 1).to(tl.int64) * sk_iters // num_programs
    SLOT: tl.constexpr = (1 + GATED) * BLOCK_M * BLOCK_N
    offs_slot = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    while it < end:
        t_local = it // iters  # tile index within the stream-K region
        tile_begin = t_local * iters
        k_lo = (it - tile_begin).to(tl.int32)
        k_hi = tl.minimum(end - tile_begin, iters).to(tl.int32)
        tile = (num_dp_tiles + t_local).to(tl.int32)
        off_m = (tile % num_m) * BLOCK_M
        off_n = (tile // num_m) * BLOCK_N
        acc, acc_up = _mainloop(X, W, WU, off_m, off_n, k_lo, k_hi, M, N, K, stride_xm, stride_wn,
                                BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA, EVEN_K, GATED, DOT_PRECISION)
        # programs holding this tile's first and last iteration: p(i) = ((i + 1) * P - 1) // sk_iters is the
        # owner of iteration i when program p owns [p * sk_iters // P, (p + 1) * sk_iters // P)
        first = ((tile_begin + 1) * num_programs - 1) // sk_iters
        last = ((tile_begin + iters) * num_programs - 1) // sk_iters
        if first == last:
            _epilogue(acc, acc_up, off_m, off_n, M, N, OUT, RES, BIAS, stride_om, stride_rm,
                      BLOCK_M, BLOCK_N, GATED, HAS_BIAS, HAS_RES)
        else:
            tile_ws = WS + t_local * max_seg * SLOT  # [max_seg, 1 + GATED, BLOCK_M, BLOCK_N]
            seg = pid - first
            tl.store(tile_ws + seg * SLOT + offs_slot, acc, cache_modifier=".cg")
            if GATED:
                tl.store(tile_ws + seg * SLOT + BLOCK_M * BLOCK_N + offs_slot, acc_up, cache_modifier=".cg")
            tl.debug_barrier()  # every thread's partial is written before the (single-thread) release below
            ticket = tl.atomic_add(COUNTERS + t_local, 1, sem="acq_rel", scope="gpu")
            if ticket == last - first:  # the last segment to arrive finishes the tile
                tl.store(COUNTERS + t_local, 0)
                total = tl.load(tile_ws + offs_slot, cache_modifier=".cg")
                total_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                if GATED:
                    total_up = tl.load(tile_ws + BLOCK_M * BLOCK_N + offs_slot, cache_modifier=".cg")
                for s in range(1, last - first + 1):  # slot order: the same sum whoever finishes
                    total += tl.load(tile_ws + s * SLOT + offs_slot, cache_modifier=".cg")
                    if GATED:
                        total_up += tl.load(tile_ws + s * SLOT + BLOCK_M * BLOCK_N + offs_slot, cache_modifier=".cg")
                _epilogue(total, total_up, off_m, off_n, M, N, OUT, RES, BIAS, stride_om, stride_rm,
                          BLOCK_M, BLOCK_N, GATED, HAS_BIAS, HAS_RES)
        it = tile_begin + iters
