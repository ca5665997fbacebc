"""CPU: the runtime's row-wise Triton kernels (kernels/rowwise.py) under the Triton interpreter, against the
plain-torch arithmetic of the model. Shapes include odd sizes. fp32: the kernels must agree to fp32 rounding
(1e-6). bf16: the interpreter truncates when it casts fp32 -> bf16 (the GPU rounds), one bf16 ulp (2^-7
relative) per cast and the kernels cast twice (e.g. silu, then the product): 2 ulp allowed. The GPU tests
(test_runtime_gpu.py) check the compiled kernels at the real shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of vla_accel.kernels
triton = pytest.importorskip("triton")

from vla_accel.kernels import rowwise as R  # noqa: E402
from vla_accel.model.llama import rope_cos_sin, silu_mul  # noqa: E402
from vla_accel.model.vit import add_layer_norm  # noqa: E402
from vla_accel.runtime.config import RuntimeConfig  # noqa: E402
from vla_accel.runtime.fused import Ops, rope_table  # noqa: E402

from refs import rope_split_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ROWS = [1, 7, 83]
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2)}


@pytest.fixture(autouse=True)
def _interpreted():
    if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("vla_accel.kernels was imported before TRITON_INTERPRET=1 could be set (another test module)")


@pytest.mark.parametrize("T", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm(T, dtype):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, 96, generator=g).to(DEV, dtype)
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(DEV, dtype)
    from vla_accel.model.llama import RMSNorm

    norm = RMSNorm(96, 1e-6).to(DEV, dtype)
    norm.weight.data.copy_(w)
    with torch.no_grad():
        torch.testing.assert_close(R.rms_norm(x, w, 1e-6), norm(x), **TOL[dtype])


@pytest.mark.parametrize("T", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_split_matches_model(T, dtype):
    H, d = 4, 16
    g = torch.Generator().manual_seed(T)
    qkv = torch.randn(T, 3 * H * d, generator=g).to(DEV, dtype)
    pos = torch.randint(0, 700, (T,), generator=g).to(DEV)
    cos, sin = rope_table(1024, d, 10000.0, dtype, DEV)
    want = rope_split_ref(qkv, pos, H)  # the model's own RoPE
    for got, ref in zip(R.rope_split(qkv, pos, cos, sin, H), want):
        torch.testing.assert_close(got, ref, **TOL[dtype])
    for got, ref in zip(Ops(RuntimeConfig(rowwise="torch"), DEV, dtype).rope(qkv, pos, cos, sin, H), want):
        assert torch.equal(got, ref)  # the fallback IS the model's arithmetic on the runtime's half-tables


def test_rope_table_is_the_models():
    """The runtime's half-tables are the model's cos / sin, bit for bit (both halves of cat(freqs, freqs))."""
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = rope_table(700, 16, 10000.0, dtype, "cpu")
        c, s = rope_cos_sin(torch.arange(700)[None], 16, 10000.0, dtype)
        assert torch.equal(torch.cat([cos, cos], -1), c[0, 0]) and torch.equal(torch.cat([sin, sin], -1), s[0, 0])


def test_add_layer_norm_is_what_the_blocks_compute():
    """vit.add_layer_norm (the reference of the fused tower op) == a DINOv2 block's residual update + the next
    LayerNorm through the model's own modules, bit for bit in bf16."""
    from vla_accel.model.config import oft_tiny
    from vla_accel.model.vit import Block

    torch.manual_seed(0)
    cfg = next(t for t in oft_tiny().towers if t.layer_scale)
    blk = Block(cfg).to(torch.bfloat16)
    scale = next(blk.ls1.parameters())  # LayerScale's one parameter
    with torch.no_grad():
        scale.normal_()
        x, r = torch.randn(2, 7, cfg.width, dtype=torch.bfloat16), torch.randn(2, 7, cfg.width, dtype=torch.bfloat16)
        got_x, got_y = add_layer_norm(x, r, scale, blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
        want_x = x + blk.ls1(r)
        assert torch.equal(got_x, want_x) and torch.equal(got_y, blk.norm2(want_x))


@pytest.mark.parametrize("T", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(T, dtype):
    gu = torch.randn(T, 2 * 172, generator=torch.Generator().manual_seed(T)).to(DEV, dtype)
    g, u = gu.chunk(2, dim=-1)
    torch.testing.assert_close(R.silu_mul(gu), silu_mul(g, u), **TOL[dtype])


def test_shape_errors():
    with pytest.raises(ValueError, match="power-of-two half"):
        R.rope_split(torch.zeros(2, 3 * 4 * 12), torch.zeros(2, dtype=torch.long), torch.zeros(8, 6),
                     torch.zeros(8, 6), 4)
    with pytest.raises(ValueError, match="contiguous last dim"):
        R.silu_mul(torch.zeros(4, 8).t())


@pytest.mark.parametrize("T", ROWS)
@pytest.mark.parametrize("with_scale", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else []))
def test_add_layer_norm_matches_tower_arithmetic(T, with_scale, dtype):
    """x += r * g in place, then LayerNorm: against the towers' own arithmetic (vit.add_layer_norm; it rounds r * g
    before the sum, the kernel rounds once: within the tolerances). D = 72 is not a power of two (masked lanes);
    bf16 only on a GPU (the interpreter's bf16 casts are not the GPU's)."""
    g = torch.Generator().manual_seed(100 + T)
    D = 72
    x = torch.randn(T, D, generator=g).to(DEV, dtype)
    r = torch.randn(T, D, generator=g).to(DEV, dtype)
    gam = (0.1 * torch.randn(D, generator=g)).to(DEV, dtype) if with_scale else None
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(DEV, dtype)
    b = (0.1 * torch.randn(D, generator=g)).to(DEV, dtype)
    x_ref, want = add_layer_norm(x.clone(), r, gam, w, b, 1e-6)
    got = R.add_layer_norm(x, r, gam, w, b, 1e-6)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=4e-3) \
        if dtype == torch.float16 else TOL[torch.bfloat16]
    torch.testing.assert_close(x, x_ref, **tol)  # the residual stream, updated in place
    torch.testing.assert_close(got, want, **tol)


def test_add_layer_norm_shape_errors():
    x = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="r of the same shape"):
        R.add_layer_norm(x, torch.zeros(3, 7), None, torch.ones(8), torch.zeros(8), 1e-6)
    with pytest.raises(ValueError, match="contiguous last dim"):
        R.add_layer_norm(torch.zeros(8, 3).t(), torch.zeros(3, 8), None, torch.ones(8), torch.zeros(8), 1e-6)
