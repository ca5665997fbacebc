"""The kernels in bf16 at the real Llama-2-7B / OFT shapes, on a CUDA GPU (marker gpu)."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton's interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vla_accel.kernels as K  # noqa: E402
from vla_accel.kernels import run_impl  # noqa: E402
from vla_accel.kernels.tune import ATTN_CONFIGS, attention_batches, candidates  # noqa: E402

from refs import gate_up_silu_ref  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# ||out - ref|| / ||ref|| vs an fp32 reference on the same bf16 inputs: bf16 output rounding (unit roundoff
# 3.9e-3) and bf16 probabilities in p @ v give ~3e-3; the bound is 1e-2.
TOL = 1e-2
SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate": (11008, 4096), "down": (4096, 11008)}
MS = [1, 7, 83, 300, 600]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def weights():
    gen = torch.Generator(device="cuda").manual_seed(0)
    return {name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / k ** 0.5
            for name, (n, k) in {**SHAPES, "gate_up": (22016, 4096)}.items()}


def x_for(m, k, seed=1):
    gen = torch.Generator(device="cuda").manual_seed(seed + m)
    return torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("m", MS)
def test_every_candidate_kernel_at_real_shapes(weights, name, m):
    w = weights[name]
    x = x_for(m, w.shape[1])
    res = x_for(m, w.shape[0], seed=2)
    ref = K.linear_reference(x, w, out_dtype=torch.float32)
    ref_res = K.linear_reference(x, w, residual=res, out_dtype=torch.float32)
    for impl in candidates("linear", *w.shape, m, torch.cuda.get_device_properties(0).multi_processor_count):
        y = torch.full((m, w.shape[0]), float("nan"), device="cuda", dtype=torch.bfloat16)
        y.copy_(run_impl(impl, x, w))  # poisoned destination: every element must be written
        assert rel_err(y, ref) < TOL, impl
    assert rel_err(K.flat_gemm(x, w, residual=res), ref_res) < TOL
    if m <= 16:
        assert rel_err(K.gemv(x, w, residual=res), ref_res) < TOL


@pytest.mark.parametrize("m", MS)
def test_gate_up_silu_at_real_shape(weights, m):
    w = weights["gate_up"]
    x = x_for(m, 4096)
    ref = gate_up_silu_ref(x, w)
    for impl in candidates("gate_up_silu", *w.shape, m, torch.cuda.get_device_properties(0).multi_processor_count):
        assert rel_err(run_impl(impl, x, w, gated=True), ref) < TOL, impl
    assert rel_err(K.gate_up_silu(x, w), ref) < TOL  # dispatched by the packaged table (or cuBLAS)


@pytest.mark.parametrize("m", [1, 64, 150, 592])
def test_dispatched_linear_with_packaged_table(weights, m):
    table = K.default_table()
    for name in ("o", "down"):
        w = weights[name]
        x, res = x_for(m, w.shape[1]), x_for(m, w.shape[0], seed=3)
        ref = K.linear_reference(x, w, residual=res, out_dtype=torch.float32)
        assert rel_err(K.linear_residual(x, w, res, table=table), ref) < TOL
        assert rel_err(K.linear(x, w, table=table), K.linear_reference(x, w, out_dtype=torch.float32)) < TOL


# ---------------------------------------------------------------- attention

HEADS, DIM = 32, 128
LENGTHS = [[592], [83, 769, 150, 1, 300]]


def packed(lengths, scale=1.0, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    t = sum(lengths)
    q, k, v = (torch.randn(t, HEADS, DIM, device="cuda", generator=gen) for _ in range(3))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    return (q * scale).bfloat16(), k.bfloat16(), v.bfloat16(), cu


@pytest.mark.parametrize("lengths", LENGTHS, ids=["b1", "ragged"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_bf16(lengths, causal):
    q, k, v, cu = packed(lengths)
    sel = torch.zeros(q.shape[0], dtype=torch.bool, device="cuda")
    sel[::7] = True
    stats = {}
    out, mass = K.attention(q, k, v, cu, max(lengths), causal=causal, score_rows=sel, stats=stats)
    ref, ref_mass = K.attention_reference(q, k, v, cu, max(lengths), causal=causal, score_rows=sel,
                                          out_dtype=torch.float32)
    assert rel_err(out, ref) < TOL
    assert rel_err(mass, ref_mass) < TOL  # probabilities from bf16 logits, summed in fp32
    assert stats["fallback_rows"].item() == 0
    assert rel_err(K.attention(q, k, v, cu, max(lengths), causal=causal, online=True), ref) < TOL


@pytest.mark.parametrize("scale", [40.0, 1e-4])
def test_attention_bf16_adversarial(scale):
    # 40: logits ~ +-450, far past the window; 1e-4 with phi = 100: every row underflows
    q, k, v, cu = packed(LENGTHS[1], scale=scale)
    phi = 0.0 if scale > 1 else 100.0
    stats = {}
    out = K.attention(q, k, v, cu, 769, phi=phi, stats=stats)
    ref = K.attention_reference(q, k, v, cu, 769, out_dtype=torch.float32)
    assert torch.isfinite(out).all()
    assert stats["fallback_rows"].item() > 0
    assert rel_err(out, ref) < TOL


def test_attention_captures_in_a_cuda_graph():
    q, k, v, cu = packed(LENGTHS[1])
    sel = torch.ones(q.shape[0], dtype=torch.bool, device="cuda")
    K.attention(q, k, v, cu, 769, score_rows=sel)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, mass = K.attention(q, k, v, cu, 769, score_rows=sel)
    q.copy_(packed(LENGTHS[1], seed=5)[0])
    graph.replay()
    torch.cuda.synchronize()
    ref, ref_mass = K.attention_reference(q, k, v, cu, 769, score_rows=sel, out_dtype=torch.float32)
    assert rel_err(out, ref) < TOL and rel_err(mass, ref_mass) < TOL


@pytest.mark.parametrize("cfg", [c.name for c in ATTN_CONFIGS])
def test_every_attention_tile_config_with_key_mass(cfg):
    # the tuner's candidates on the benchmark's ragged batch (L = 640), text rows ending each sequence
    lengths = attention_batches(640)["ragged8"]
    q, k, v, cu = packed(lengths)
    sel = torch.zeros(q.shape[0], dtype=torch.bool, device="cuda")
    for a, n in zip(cu.tolist()[:-1], lengths):
        sel[a + n - max(1, n // 10):a + n] = True
    out, mass = K.attention(q, k, v, cu, max(lengths), score_rows=sel, config=cfg)
    ref, ref_mass = K.attention_reference(q, k, v, cu, max(lengths), score_rows=sel, out_dtype=torch.float32)
    assert rel_err(out, ref) < TOL
    assert rel_err(mass, ref_mass) < TOL
    # scoring only adds a store to the attention kernel: the output is the same (allowing for compiled code that
    # differs in instruction order, a few bf16 ulps at most)
    assert rel_err(K.attention(q, k, v, cu, max(lengths), config=cfg), out) < 1e-4
