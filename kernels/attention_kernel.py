"""Triton kernel: varlen (packed) softmax attention with the unified-max softmax of FlashDecoding++.

Only @triton.jit code lives here; checks, allocation and launch are in attention.py.

Logits are handled in the log2 domain: s2 = (q . k) * sm_scale * log2(e).
  unified pass : p = exp2(s2 - phi2) with ONE fixed phi2 per model. The sums l = sum p and acc = sum p v
                 need no running max, no rescaling and no per-block row reduction other than l itself.
                 Safety is checked once per row, at the end, on lse2 = log2(l) (the row's log-sum-exp):
                 lse2 in [lo2, hi2] bounds every p by 2^hi2 (no overflow) and the largest p from below by
                 2^(lo2 - log2(n_keys)) (no underflow of the whole row).
  online pass  : the usual running-max (flash-attention) softmax, exact for any finite logits.
A program owns BLOCK_M query rows of one (sequence, head). It stores the unified result of its safe rows; if
any row left the safe range, it recomputes the tile with the online pass (a non-inlined call, so that the
rare fallback does not raise the register count of the common path) and stores those rows.
Key blocks that lie fully inside the sequence (and, if causal, fully below the diagonal) run without masks.

Grid of the attention kernel: (query tiles, batch * heads), the tile index reversed. Programs are issued in
grid order (axis 0 fastest), so the tiles of one (sequence, head) run side by side and share its K/V in L2
(with a ragged batch of 8, K + V of all heads is 37-62 MB, more than the 50 MB L2); the last tile (causal:
the most keys) of each head starts first.

Optional key-mass scoring (SCORE): the attention kernel then also stores every row's log-sum-exp
(LSE [T, H], log2 units of the scaled logits). A separate, small kernel (attention_key_mass_kernel) computes
p = exp2(s2 - lse2) for the selected query rows only (SEL[row] != 0) and adds
p / (H * selected rows of the sequence) into KEY_MASS[key]. Its programs own one key block of one
(sequence, head), so the scoring work is spread over all SMs instead of lengthening the attention tiles that
hold selected rows.
"""

import triton
import triton.language as tl


@triton.jit
def _scores(q, K_blk, offs_n, offs_m, seq_len, qk_scale, shift, MASK: tl.constexpr, CAUSAL: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    # q: [BLOCK_M, D]; K_blk: pointers [BLOCK_N, D]; shift: scalar or [BLOCK_M, 1]
    # -> s2 - shift: [BLOCK_M, BLOCK_N] (-inf where masked)
    if MASK:
        k = tl.load(K_blk, mask=(offs_n < seq_len)[:, None], other=0.0)
    else:
        k = tl.load(K_blk)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - shift
    if MASK:
        valid = (offs_n < seq_len)[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
    return s


@triton.jit
def _load_v(V_blk, offs_n, seq_len, MASK: tl.constexpr):
    if MASK:
        return tl.load(V_blk, mask=(offs_n < seq_len)[:, None], other=0.0)
    return tl.load(V_blk)


@triton.jit
def _unified_blocks(acc, l, q, k_base, v_base, stride_kt, stride_vt, offs_m, seq_len, n_lo, n_hi, qk_scale, phi2,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    # acc [BLOCK_M, D] += sum_j exp2(s2_j - phi2) v_j ; l [BLOCK_M] += sum_j exp2(s2_j - phi2), keys n_lo..n_hi
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s = _scores(q, k_base + offs_n[:, None] * stride_kt + offs_d[None, :], offs_n, offs_m, seq_len, qk_scale,
                    phi2, MASK, CAUSAL, DOT_PRECISION)
        p = tl.math.exp2(s)
        l += tl.sum(p, 1)
        v = _load_v(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], offs_n, seq_len, MASK)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l


@triton.jit
def _online_blocks(acc, l, m, q, k_base, v_base, stride_kt, stride_vt, offs_m, seq_len, n_lo, n_hi, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    # running-max softmax: acc / l is the output and m the row max of s2 so far
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s = _scores(q, k_base + offs_n[:, None] * stride_kt + offs_d[None, :], offs_n, offs_m, seq_len, qk_scale,
                    0.0, MASK, CAUSAL, DOT_PRECISION)
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.math.exp2(m - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = _load_v(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], offs_n, seq_len, MASK)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m = m_new
    return acc, l, m


@triton.jit
def _online_tile(q, k_base, v_base, stride_kt, stride_vt, out_ptrs, lse_ptrs, take, offs_m, seq_len, n_full, n_end,
                 qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, SCORE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # the online-softmax tile: writes the rows that `take` admits (and, if SCORE, their log-sum-exp)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: fully masked blocks give alpha 1, p 0
    acc, l, m = _online_blocks(acc, l, m, q, k_base, v_base, stride_kt, stride_vt, offs_m, seq_len, 0, n_full,
                               qk_scale, HEAD_DIM, BLOCK_N, False, CAUSAL, DOT_PRECISION)
    acc, l, m = _online_blocks(acc, l, m, q, k_base, v_base, stride_kt, stride_vt, offs_m, seq_len, n_full, n_end,
                               qk_scale, HEAD_DIM, BLOCK_N, True, CAUSAL, DOT_PRECISION)
    tl.store(out_ptrs, (acc / l[:, None]).to(out_ptrs.dtype.element_ty), mask=take[:, None])
    if SCORE:
        tl.store(lse_ptrs, m + tl.math.log2(l), mask=take)


@triton.jit
def _tile(Q, K, V, OUT, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
          h, pid_m, seq_start, seq_len, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          CAUSAL: tl.constexpr):
    # addressing of one program's tile: query rows pid_m*BLOCK_M.. of head h in the sequence at seq_start
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query positions inside the sequence
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    rows = seq_start.to(tl.int64) + offs_m  # packed row index
    q_ptrs = Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
    k_base = K + seq_start.to(tl.int64) * stride_kt + h * stride_kh
    v_base = V + seq_start.to(tl.int64) * stride_vt + h * stride_vh
    out_ptrs = OUT + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    # keys [0, n_full): whole blocks needing no mask; [n_full, n_end): the masked rest
    n_full = (seq_len // BLOCK_N) * BLOCK_N
    n_end = seq_len
    if CAUSAL:
        n_full = tl.minimum(n_full, (pid_m * BLOCK_M // BLOCK_N) * BLOCK_N)
        n_end = tl.minimum(seq_len, (pid_m + 1) * BLOCK_M)
    return offs_m, row_ok, rows, q_ptrs, k_base, v_base, out_ptrs, n_full, n_end


@triton.jit(noinline=True)
def _online_fallback(Q, K, V, OUT, LSE, FLAGS,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                     num_heads, h, pid_m, seq_start, seq_len, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     SCORE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Not inlined (scalar arguments only): the rarely run fallback gets its own register allocation instead of
    # raising the unified path's, which would cost occupancy on every call. The rows to redo are read back
    # from FLAGS.
    offs_m, row_ok, rows, q_ptrs, k_base, v_base, out_ptrs, n_full, n_end = _tile(
        Q, K, V, OUT, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        h, pid_m, seq_start, seq_len, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL)
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    take = tl.load(FLAGS + rows * num_heads + h, mask=row_ok, other=0) != 0
    _online_tile(q, k_base, v_base, stride_kt, stride_vt, out_ptrs, LSE + rows * num_heads + h, take, offs_m, seq_len,
                 n_full, n_end, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, SCORE, DOT_PRECISION)


@triton.jit
def attention_fwd_kernel(
    Q, K, V, OUT,  # [T, H, D] each (last dim contiguous)
    CU_SEQLENS,  # int32 [B+1]
    LSE,  # fp32 [T, H]: row log-sum-exp of s2, written when SCORE (read by attention_key_mass_kernel)
    FLAGS,  # int8 [T, H]: 1 where the row left the safe range (always written; read back by the fallback)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    num_heads, qk_scale, phi2, lo2, hi2,  # qk_scale = sm_scale * log2(e); phi2, lo2, hi2 in log2 units
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, UNIFIED: tl.constexpr, SCORE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # grid: (query tiles, batch * heads). Axis 0 is issued fastest: the tiles of one (sequence, head) run
    # together and share its K/V in L2; they run last-first (causal: the tile with the most keys starts first)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    seq_start = tl.load(CU_SEQLENS + b)
    seq_len = tl.load(CU_SEQLENS + b + 1) - seq_start
    if pid_m * BLOCK_M >= seq_len:
        return

    offs_m, row_ok, rows, q_ptrs, k_base, v_base, out_ptrs, n_full, n_end = _tile(
        Q, K, V, OUT, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        h, pid_m, seq_start, seq_len, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL)
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    if UNIFIED:
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        l = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc, l = _unified_blocks(acc, l, q, k_base, v_base, stride_kt, stride_vt, offs_m, seq_len, 0, n_full,
                                 qk_scale, phi2, HEAD_DIM, BLOCK_N, False, CAUSAL, DOT_PRECISION)
        acc, l = _unified_blocks(acc, l, q, k_base, v_base, stride_kt, stride_vt, offs_m, seq_len, n_full, n_end,
                                 qk_scale, phi2, HEAD_DIM, BLOCK_N, True, CAUSAL, DOT_PRECISION)
        lse2 = tl.math.log2(l)
        # NaN (lse2 != lse2), 0 (-inf) and inf sums all count as unsafe
        bad = ((lse2 < lo2) | (lse2 > hi2) | (lse2 != lse2)) & row_ok
        good = row_ok & (bad == 0)
        tl.store(out_ptrs, (acc / l[:, None]).to(OUT.dtype.element_ty), mask=good[:, None])
        if SCORE:  # LSE and FLAGS are both [T, H]
            tl.store(LSE + rows * num_heads + h, phi2 + lse2, mask=good)
        tl.store(FLAGS + rows * num_heads + h, bad.to(tl.int8), mask=row_ok)
        if tl.sum(bad.to(tl.int32), 0) > 0:
            tl.debug_barrier()  # the flags written above are read back by other threads of this program
            _online_fallback(Q, K, V, OUT, LSE, FLAGS, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                             stride_vh, stride_ot, stride_oh, num_heads, h, pid_m, seq_start, seq_len, qk_scale,
                             HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, SCORE, DOT_PRECISION)
    else:
        tl.store(FLAGS + rows * num_heads + h, tl.zeros([BLOCK_M], dtype=tl.int8), mask=row_ok)
        _online_tile(q, k_base, v_base, stride_kt, stride_vt, out_ptrs, LSE + rows * num_heads + h, row_ok, offs_m,
                     seq_len, n_full, n_end, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, SCORE, DOT_PRECISION)


@triton.jit
def attention_key_mass_kernel(
    Q, K,  # [T, H, D] (last dim contiguous)
    CU_SEQLENS,  # int32 [B+1]
    SEL,  # uint8 [T]: query rows to score
    LSE,  # fp32 [T, H]: row log-sum-exp of s2 (log2 units), from attention_fwd_kernel
    KEY_MASS,  # fp32 [T], zero-initialised: += p(row, key) / (H * selected rows of the sequence)
    stride_qt, stride_qh, stride_kt, stride_kh,
    num_heads, qk_scale,  # qk_scale = sm_scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,  # row tiles whose selection is read with one load (power of two)
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # grid: (key blocks, batch * heads). A program holds one block of BLOCK_N keys of one (sequence, head) and
    # sweeps the sequence's query rows in tiles of BLOCK_M; only tiles holding a selected row are computed.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    seq_start = tl.load(CU_SEQLENS + b)
    seq_len = tl.load(CU_SEQLENS + b + 1) - seq_start
    n0 = pid_n * BLOCK_N
    if n0 >= seq_len:
        return

    offs_n = n0 + tl.arange(0, BLOCK_N)  # key positions inside the sequence
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < seq_len
    k_ptrs = K + (seq_start.to(tl.int64) + offs_n)[:, None] * stride_kt + h * stride_kh + offs_d[None, :]
    k = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)  # [BLOCK_N, D]
    mass = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum over selected rows of p(row, key)
    n_sel = 0  # selected rows of the sequence
    tile_ids = tl.arange(0, GROUP)
    for g0 in range(0, seq_len, GROUP * BLOCK_M):
        # the selection of GROUP row tiles in one load: [GROUP, BLOCK_M] bytes
        offs_g = g0 + tile_ids[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        sel_g = tl.load(SEL + seq_start + offs_g, mask=offs_g < seq_len, other=0)
        n_sel += tl.sum(tl.sum(sel_g.to(tl.int32), 1), 0)
        # bit i: tile i of the group holds a selected row (a scalar: the loop below keeps no vector live)
        tile_bits = tl.sum((tl.max(sel_g, 1) != 0).to(tl.int32) << tile_ids, 0)
        for i in range(GROUP):
            m0 = g0 + i * BLOCK_M
            has_sel = ((tile_bits >> i) & 1) != 0
            if CAUSAL:
                has_sel = has_sel & (m0 + BLOCK_M > n0)  # some row of the tile sees a key of this block
            if has_sel:
                offs_m = m0 + tl.arange(0, BLOCK_M)
                rows = seq_start.to(tl.int64) + offs_m  # packed row index
                sel = (tl.load(SEL + rows, mask=offs_m < seq_len, other=0) != 0)  # [BLOCK_M]
                q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=sel[:, None],
                            other=0.0)  # [BLOCK_M, D]
                lse2 = tl.load(LSE + rows * num_heads + h, mask=sel, other=0.0)  # [BLOCK_M]
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse2[:, None]
                valid = sel[:, None] & key_ok[None, :]
                if CAUSAL:
                    valid = valid & (offs_n[None, :] <= offs_m[:, None])
                p = tl.math.exp2(tl.where(valid, s, float("-inf")))  # [BLOCK_M, BLOCK_N], <= 1
                mass += tl.sum(p, 0)
    if n_sel > 0:
        coef = 1.0 / (n_sel.to(tl.float32) * num_heads)
        tl.atomic_add(KEY_MASS + seq_start + offs_n, mass * coef, mask=key_ok, sem="relaxed")
