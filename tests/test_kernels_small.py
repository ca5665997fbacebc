"""Kernels vs their plain-torch references on small and odd shapes, fp32 and fp16.

Without a GPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set below before the kernels
are decorated); with one they run on it. bf16 is covered by test_kernels_gpu.py (the interpreter's bf16
arithmetic is not meaningful).
"""

import os
import subprocess
import sys
import warnings

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # read when a function is decorated: before triton is first imported

import pytest  # noqa: E402
import triton.language.standard  # noqa: E402

import vla_accel.kernels as K  # noqa: E402
from vla_accel.kernels import gemm_kernel  # noqa: E402

from refs import gate_up_silu_ref  # noqa: E402

# Triton decides interpreter vs compiler per function at decoration time, its own library included. If
# something imported triton earlier in this process without the variable, the interpreter cannot work
# here: the module's tests then run in a fresh process instead (test_in_fresh_process).
_JITTED = [gemm_kernel.flat_gemm_kernel, getattr(triton.language.standard, "zeros", None)]
PREIMPORTED = DEVICE == "cpu" and any(type(f).__name__ == "JITFunction" for f in _JITTED)


@pytest.fixture(autouse=True)
def _interpreter_active(request):
    if PREIMPORTED and request.node.name != "test_in_fresh_process":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: see test_in_fresh_process")


@pytest.mark.skipif(not PREIMPORTED, reason="the interpreter is active in this process: tests run here")
def test_in_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


# Tolerances on ||out - ref|| / ||ref|| against an fp32 reference:
TOL = {
    torch.float32: 1e-5,  # exact fp32 products ("ieee" dots), only the summation order differs
    torch.float16: 2e-3,  # output rounded to fp16 (unit roundoff 4.9e-4); fp16 probabilities in attention
}
DTYPES = [torch.float32, torch.float16]
MS = [1, 7, 83]
KS = [200, 96]  # 200: not a multiple of any BLOCK_K used here
N = 80  # not a multiple of the 64-row weight tiles


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def randn(*shape, dtype, scale=1.0, gen):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=DEVICE)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# ---------------------------------------------------------------- GEMM

GEMM_CONFIGS = [
    K.GemmConfig(block_n=64, block_m=16, block_k=64, num_warps=4, num_stages=2, split_k=1),
    K.GemmConfig(block_n=32, block_m=32, block_k=32, num_warps=4, num_stages=2, split_k=3),  # split-K + reduction
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("cfg", GEMM_CONFIGS, ids=lambda c: c.name)
def test_flat_gemm_matches_reference(dtype, m, k, cfg, gen):
    x = randn(m, k, dtype=dtype, gen=gen)
    w = randn(N, k, dtype=dtype, scale=k ** -0.5, gen=gen)
    y = K.flat_gemm(x, w, config=cfg)
    assert y.shape == (m, N) and y.dtype == dtype
    assert rel_err(y, K.linear_reference(x, w, out_dtype=torch.float32)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", GEMM_CONFIGS, ids=lambda c: c.name)
def test_flat_gemm_epilogues(dtype, cfg, gen):
    m, k = 83, 200
    x = randn(m, k, dtype=dtype, gen=gen)
    w = randn(N, k, dtype=dtype, scale=k ** -0.5, gen=gen)
    bias = randn(N, dtype=dtype, gen=gen)
    res = randn(m, N, dtype=dtype, gen=gen)
    y = K.flat_gemm(x, w, bias=bias, residual=res, config=cfg)
    ref = K.linear_reference(x, w, bias=bias, residual=res, out_dtype=torch.float32)
    assert rel_err(y, ref) < TOL[dtype]
    w2 = randn(2 * N, k, dtype=dtype, scale=k ** -0.5, gen=gen)
    h = K.flat_gemm(x, w2, gated=True, config=cfg)
    assert h.shape == (m, N)
    assert rel_err(h, gate_up_silu_ref(x, w2)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 7])
def test_gemv_matches_reference(dtype, m, gen):
    k = 200
    cfg = K.GemvConfig(block_n=16, block_k=64, num_warps=4)
    x = randn(m, k, dtype=dtype, gen=gen)
    w = randn(N, k, dtype=dtype, scale=k ** -0.5, gen=gen)
    res = randn(m, N, dtype=dtype, gen=gen)
    assert rel_err(K.gemv(x, w, config=cfg), K.linear_reference(x, w, out_dtype=torch.float32)) < TOL[dtype]
    ref = K.linear_reference(x, w, residual=res, out_dtype=torch.float32)
    assert rel_err(K.gemv(x, w, residual=res, config=cfg), ref) < TOL[dtype]
    w2 = randn(2 * N, k, dtype=dtype, scale=k ** -0.5, gen=gen)
    ref = gate_up_silu_ref(x, w2)
    assert rel_err(K.gemv(x, w2, gated=True, config=cfg), ref) < TOL[dtype]


def test_gemm_argument_checks(gen):
    x = randn(4, 32, dtype=torch.float32, gen=gen)
    with pytest.raises(ValueError, match="K mismatch"):
        K.flat_gemm(x, randn(16, 48, dtype=torch.float32, gen=gen))
    with pytest.raises(ValueError, match="share one of"):
        K.flat_gemm(x, randn(16, 32, dtype=torch.float16, gen=gen))
    with pytest.raises(ValueError, match="M <= 16"):
        K.gemv(randn(17, 32, dtype=torch.float32, gen=gen), randn(16, 32, dtype=torch.float32, gen=gen))
    with pytest.raises(ValueError, match="gate rows then up rows"):
        K.flat_gemm(x, randn(15, 32, dtype=torch.float32, gen=gen), gated=True)


def test_dispatched_ops_run_the_chosen_kernel(gen):
    m, k = 7, 96
    x = randn(m, k, dtype=torch.float32, gen=gen)
    w = randn(N, k, dtype=torch.float32, scale=k ** -0.5, gen=gen)
    w2 = randn(2 * N, k, dtype=torch.float32, scale=k ** -0.5, gen=gen)
    res = randn(m, N, dtype=torch.float32, gen=gen)
    flat = K.GemmConfig(32, 16, 32, 4, 2, 2).name
    table = K.DispatchTable(gpu="test", dtype="float32", rules={
        f"linear:{N}x{k}": [(4, K.GemvConfig(16, 32, 4).name), (100, flat)],
        f"gate_up_silu:{2 * N}x{k}": [(100, flat)],
    })
    assert K.choose(table, (N, k), m) == flat
    y = K.linear(x.view(1, m, k), w, table=table)  # leading dims are flattened and restored
    assert y.shape == (1, m, N)
    assert rel_err(y[0], K.linear_reference(x, w, out_dtype=torch.float32)) < TOL[torch.float32]
    ref = K.linear_reference(x, w, residual=res, out_dtype=torch.float32)
    assert rel_err(K.linear_residual(x, w, res, table=table), ref) < TOL[torch.float32]
    ref = gate_up_silu_ref(x, w2)
    assert rel_err(K.gate_up_silu(x, w2, table=table), ref) < TOL[torch.float32]
    assert rel_err(K.gate_up_silu(x, w2, impl="cublas"), ref) < TOL[torch.float32]


# ---------------------------------------------------------------- attention

H, D = 2, 32
RAGGED = [83, 1, 40, 129]  # one single-token sequence, lengths off the block grid


def packed(lengths, dtype, gen, scale=1.0, heads=H, dim=D):
    t = sum(lengths)
    q = randn(t, heads, dim, dtype=dtype, scale=scale, gen=gen)
    k = randn(t, heads, dim, dtype=dtype, gen=gen)
    v = randn(t, heads, dim, dtype=dtype, gen=gen)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    return q, k, v, cu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_reference(dtype, causal, gen):
    q, k, v, cu = packed(RAGGED, dtype, gen)
    out = K.attention(q, k, v, cu, max(RAGGED), causal=causal)
    ref = K.attention_reference(q, k, v, cu, max(RAGGED), causal=causal, out_dtype=torch.float32)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    online = K.attention(q, k, v, cu, max(RAGGED), causal=causal, online=True)
    assert rel_err(online, ref) < TOL[dtype]


def test_attention_long_sequence_769(gen):
    q, k, v, cu = packed([769], torch.float32, gen, heads=1, dim=16)
    out = K.attention(q, k, v, cu, 769, config="attn:bm64.bn64.w4.s1")  # a config given by name
    assert rel_err(out, K.attention_reference(q, k, v, cu, 769, out_dtype=torch.float32)) < TOL[torch.float32]


@pytest.mark.parametrize("causal", [False, True])
def test_attention_key_mass(causal, gen):
    q, k, v, cu = packed(RAGGED, torch.float32, gen)
    sel = torch.rand(sum(RAGGED), generator=gen).to(DEVICE) < 0.3
    sel[83:84] = False  # the single-token sequence has no selected row: its key mass must be 0
    out, mass = K.attention(q, k, v, cu, max(RAGGED), causal=causal, score_rows=sel)
    ref, ref_mass = K.attention_reference(q, k, v, cu, max(RAGGED), causal=causal, score_rows=sel,
                                          out_dtype=torch.float32)
    assert rel_err(out, ref) < TOL[torch.float32]
    assert mass.dtype == torch.float32 and mass.shape == (sum(RAGGED),)
    assert rel_err(mass, ref_mass) < 1e-5  # fp32 sums over heads/rows in another order
    assert mass[83].item() == 0.0
    # each sequence with selected rows distributes a total mass of 1 over its keys
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        expected = 1.0 if sel[a:b].any() else 0.0
        assert abs(mass[a:b].sum().item() - expected) < 1e-5


def _check_key_mass(mass, ref_mass, sel, cu, tol):
    assert mass.dtype == torch.float32 and mass.shape == sel.shape
    assert rel_err(mass, ref_mass) < tol
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):  # a sequence with selected rows spreads a mass of 1 over its keys
        expected = 1.0 if sel[a:b].any() else 0.0
        assert abs(mass[a:b].sum().item() - expected) < 1e-4


@pytest.mark.parametrize("causal", [False, True])
def test_attention_key_mass_long_sequences_in_several_row_groups(causal, gen):
    # 769 keys: 25 row tiles of 32 (the interpreter's scoring tiles), several selection groups of the scoring kernel;
    # the selected rows end each sequence (the model's text rows), one sequence has none
    lengths = [769, 83, 150]
    q, k, v, cu = packed(lengths, torch.float32, gen, heads=1, dim=16)
    sel = torch.zeros(sum(lengths), dtype=torch.bool, device=DEVICE)
    sel[769 - 40:769] = True  # the last 40 rows of the first sequence: the end of tile 23 and tile 24
    sel[769 + 83 + 150 - 1] = True  # the very last row of the third sequence
    sel[5] = True  # and one early row, alone in its tile
    cfg = "attn:bm32.bn64.w4.s1"
    out, mass = K.attention(q, k, v, cu, max(lengths), causal=causal, score_rows=sel, config=cfg)
    ref, ref_mass = K.attention_reference(q, k, v, cu, max(lengths), causal=causal, score_rows=sel,
                                          out_dtype=torch.float32)
    assert rel_err(out, ref) < TOL[torch.float32]
    _check_key_mass(mass, ref_mass, sel, cu, 1e-5)
    assert (mass[769:769 + 83] == 0).all()
    if causal:  # the last row of the third sequence sees all of its keys; no row of it sees past itself
        assert (mass[769 + 83:] > 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_scoring_leaves_the_output_unchanged(dtype, gen):
    q, k, v, cu = packed(RAGGED, dtype, gen)
    sel = torch.zeros(sum(RAGGED), dtype=torch.bool, device=DEVICE)
    sel[::5] = True
    plain = K.attention(q, k, v, cu, max(RAGGED))
    out, _ = K.attention(q, k, v, cu, max(RAGGED), score_rows=sel)
    assert torch.equal(out, plain)


@pytest.mark.parametrize("online", [False, True])
def test_attention_key_mass_of_fallback_rows(online, gen):
    # logits ~ +-200: every unified row overflows and is redone online; the key mass must use the
    # online pass's log-sum-exp (overflow would give inf or 0 mass)
    q, k, v, cu = packed(RAGGED, torch.float32, gen, scale=35.0)
    sel = torch.zeros(sum(RAGGED), dtype=torch.bool, device=DEVICE)
    sel[40:83] = True
    sel[84:] = True
    stats = {}
    with warnings.catch_warnings():  # the interpreter's numpy warns about the discarded overflowing pass
        warnings.simplefilter("ignore", RuntimeWarning)
        out, mass = K.attention(q, k, v, cu, max(RAGGED), score_rows=sel, stats=stats, online=online)
    ref, ref_mass = K.attention_reference(q, k, v, cu, max(RAGGED), score_rows=sel, out_dtype=torch.float32)
    assert online or stats["fallback_rows"].item() > 0
    assert torch.isfinite(mass).all()
    assert rel_err(out, ref) < TOL[torch.float32]
    # near one-hot softmax rows: the key mass is a sum of p = exp(s - lse) with |s| ~ 200, an fp32
    # rounding of s of ~1e-5 relative moves p by ~1e-3 relative
    _check_key_mass(mass, ref_mass, sel, cu, 1e-3)


def test_attention_key_mass_fp16(gen):
    q, k, v, cu = packed(RAGGED, torch.float16, gen)
    sel = torch.rand(sum(RAGGED), generator=gen).to(DEVICE) < 0.3
    _, mass = K.attention(q, k, v, cu, max(RAGGED), causal=True, score_rows=sel)
    _, ref_mass = K.attention_reference(q, k, v, cu, max(RAGGED), causal=True, score_rows=sel,
                                        out_dtype=torch.float32)
    _check_key_mass(mass, ref_mass, sel, cu, TOL[torch.float16])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", ["overflow", "underflow"])
def test_attention_adversarial_logits_fall_back(dtype, causal, case, gen):
    # overflow: logits ~ +-200 (exp(200) is inf in fp32); underflow: phi far above every logit
    q, k, v, cu = packed(RAGGED, dtype, gen, scale=35.0 if case == "overflow" else 1.0)
    phi = 0.0 if case == "overflow" else 150.0
    stats = {}
    with warnings.catch_warnings():  # the interpreter's numpy warns about the discarded overflowing pass
        warnings.simplefilter("ignore", RuntimeWarning)
        out = K.attention(q, k, v, cu, max(RAGGED), causal=causal, phi=phi, stats=stats)
    ref = K.attention_reference(q, k, v, cu, max(RAGGED), causal=causal, out_dtype=torch.float32)
    assert torch.isfinite(out).all()
    assert stats["fallback_rows"].item() > 0
    assert stats["rows"] == sum(RAGGED) * H
    assert rel_err(out, ref) < TOL[dtype]


def test_attention_flags_exactly_the_rows_outside_the_window(gen):
    q, k, v, cu = packed(RAGGED, torch.float32, gen)
    lo, hi = -1.0, 1.0
    stats = {}
    K.attention(q, k, v, cu, max(RAGGED), phi=0.5, safe_range=(lo, hi), stats=stats)
    lse = K.row_logsumexp(q, k, cu)  # [T, H]
    expected = (lse - 0.5 < lo) | (lse - 0.5 > hi)
    assert torch.equal(stats["flags"].cpu(), expected.cpu())


def test_attention_no_fallback_on_ordinary_logits(gen):
    q, k, v, cu = packed(RAGGED, torch.float32, gen)
    stats = {}
    K.attention(q, k, v, cu, max(RAGGED), stats=stats)
    assert stats["fallback_rows"].item() == 0


def test_attention_argument_checks(gen):
    q, k, v, cu = packed([5, 3], torch.float32, gen)
    with pytest.raises(ValueError, match="int32"):
        K.attention(q, k, v, cu.long(), 5)
    with pytest.raises(ValueError, match="power of two"):
        K.attention(q[..., :24], k[..., :24], v[..., :24], cu, 5)
    with pytest.raises(ValueError, match="one shape"):
        K.attention(q, k[:4], v, cu, 5)
    with pytest.raises(ValueError, match="lo < hi"):
        K.attention(q, k, v, cu, 5, safe_range=(1.0, -1.0))


# ---------------------------------------------------------------- tuner: choice of the attention tiles

def _prof_row(length, b1, ragged, sdpa_b1, sdpa_ragged):
    batch = lambda t, s: {"lengths": [], "times_us": t, "errors": {}, "sdpa": s}  # noqa: E731
    return {"L": length, "batches": {"b1": batch(b1, sdpa_b1), "ragged8": batch(ragged, sdpa_ragged)}}


def test_tuner_picks_the_attention_config_with_the_smallest_worst_ratio():
    from vla_accel.kernels.tune import attention_choice, attention_rules
    a, b, c = "attn:bm32.bn64.w4.s3", "attn:bm64.bn64.w4.s3", "attn:bm64.bn32.w4.s3"
    # a is fastest on batch 1 (10 vs 12 us; SDPA 11) but 1.25x SDPA on the ragged batch; b is 1.09x / 0.92x
    row_128 = _prof_row(128, {a: 10.0, b: 12.0}, {a: 150.0, b: 110.0}, ("sdpa_flash", 11.0), ("sdpa_nested", 120.0))
    assert attention_choice(row_128) == b
    # without SDPA times the reference is each shape's fastest config: a 1.36x on ragged, c 1.2x on b1
    row_256 = _prof_row(256, {a: 10.0, c: 12.0}, {a: 150.0, c: 110.0}, None, None)
    assert attention_choice(row_256) == c
    # a config missing on one shape (it failed there) cannot be chosen, however fast elsewhere
    row_384 = _prof_row(384, {a: 1.0, b: 20.0}, {b: 100.0}, ("sdpa_flash", 20.0), ("sdpa_nested", 100.0))
    assert attention_choice(row_384) == b
    # rows of the batch-1-only format still give their fastest config; equal neighbours are merged
    row_512 = {"L": 512, "times_us": {a: 30.0, b: 25.0}}
    assert attention_rules([row_512, row_256, row_128, row_384]) == [(128, b), (256, c), (512, b)]
