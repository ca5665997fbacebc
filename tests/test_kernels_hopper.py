"""The Hopper flat GEMM (kernels/flat_gemm_hopper*.py): every schedule and epilogue against fp64 references.

Without a GPU the kernel runs in the Triton interpreter (TRITON_INTERPRET=1, set below before triton is first
imported) in fp32 and fp16 (the interpreter's bf16 arithmetic is not meaningful); with one, the same tests run on
it, and the `gpu` tests check bf16 at the real Llama-2-7B and vision-tower shapes against torch in fp32.
"""

import os
import subprocess
import sys

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # read when a function is decorated: before triton is first imported

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vla_accel.kernels import flat_gemm_hopper_kernel  # noqa: E402
from vla_accel.kernels.flat_gemm_hopper import (  # noqa: E402
    REGS_FOR_ACC,
    SMEM_LIMIT,
    HopperGemmConfig,
    candidates,
    flat_gemm_hopper,
    schedule,
    tma_ok,
    warp_spec_usable,
)

# If triton was imported in this process before the variable was set, its kernels are compiled, not interpreted,
# and cannot run on the CPU: the module's tests then run in a fresh process (test_in_fresh_process).
PREIMPORTED = DEVICE == "cpu" and type(flat_gemm_hopper_kernel.flat_gemm_hopper_kernel).__name__ == "JITFunction"


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


# ||out - ref|| / ||ref|| against an fp64 reference on the same (rounded) inputs:
TOL = {
    torch.float32: 1e-5,  # exact fp32 products ("ieee" dots), fp32 sums: only the summation order differs (~1e-7)
    torch.float16: 2e-3,  # output rounded to fp16 (unit roundoff 4.9e-4 -> rel-L2 ~3e-4); fp32 accumulation
}
DTYPES = [torch.float32, torch.float16]
MS = [1, 83, 208, 769]  # 769: one row past a multiple of every tile height
N, K = 80, 200  # neither a multiple of the 64-wide tiles nor of BLOCK_K
SMS = 5  # SMs the stream-K schedules plan for here: few, so tiles are split into 2-3 segments

# One config per schedule x load path; small tiles keep the interpreter fast.
VARIANTS = {
    "dp-ptr": HopperGemmConfig(64, 64, 64, 4, 2, tma=False),
    "dp-tma": HopperGemmConfig(64, 64, 64, 4, 2),
    "split3-ptr": HopperGemmConfig(32, 64, 32, 4, 2, split_k=3, tma=False),
    "split3-tma": HopperGemmConfig(64, 32, 32, 4, 2, split_k=3),
    "streamk-ptr": HopperGemmConfig(32, 32, 64, 4, 2, stream_k=1, tma=False),
    "streamk-tma": HopperGemmConfig(64, 32, 32, 4, 2, stream_k=2),
    "ws-tma": HopperGemmConfig(64, 64, 64, 4, 2, warp_spec=True),
}


def variant_config(name: str) -> HopperGemmConfig:
    cfg = VARIANTS[name]
    if cfg.warp_spec and not warp_spec_usable(DEVICE):
        pytest.skip("warp-specialised configs hang Triton < 3.7 on sm_90 (flat_gemm_hopper.WARP_SPEC_MIN_TRITON)")
    return cfg


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randn(*shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=DEVICE)


def reference(x, w, *, bias=None, residual=None, gated=False):
    # fp64: x [M, K], w [N, K] ([2I, K] gated) -> [M, N] ([M, I])
    y = x.double() @ w.double().t()
    if gated:
        inter = w.shape[0] // 2
        y = F.silu(y[:, :inter]) * y[:, inter:]
    if bias is not None:
        y = y + bias.double()
    if residual is not None:
        y = y + residual.double()
    return y


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# ---------------------------------------------------------------- schedule (pure)

def _segments(sched):
    """Brute force over the stream-K region: {tile: [(program, first iteration, end)]} from the programs' ranges."""
    total = sched.sk_tiles * sched.iters
    segs = {}
    for p in range(sched.programs):
        lo, hi = p * total // sched.programs, (p + 1) * total // sched.programs
        it = lo
        while it < hi:
            t = it // sched.iters
            end = min(hi, (t + 1) * sched.iters)
            segs.setdefault(t, []).append((p, it, end))
            it = end
    return segs


@pytest.mark.parametrize("m", [1, 64, 83, 208, 256, 608, 769, 4176])
@pytest.mark.parametrize("cfg", [HopperGemmConfig(128, 128, 64, 8, 4, stream_k=1), HopperGemmConfig(64, 64, 64, 4, 4,
                                 stream_k=2), HopperGemmConfig(128, 256, 64, 8, 3, split_k=3),
                                 HopperGemmConfig(256, 128, 64, 8, 3, split_k=8), HopperGemmConfig(128, 64, 64, 4, 4)],
                         ids=lambda c: c.name)
@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008), (1152, 4304), (80, 200)])
def test_schedule_covers_every_iteration_once(m, cfg, n, k):
    sched = schedule(m, n, k, cfg, num_sms=132)
    assert sched.tiles == -(-m // cfg.block_m) * -(-n // cfg.block_n)
    assert 1 <= sched.programs and 0 <= sched.dp_tiles <= sched.tiles
    segs = _segments(sched)
    assert sorted(segs) == list(range(sched.sk_tiles))  # every stream-K tile is covered ...
    for t, parts in segs.items():
        assert parts[0][1] == t * sched.iters and parts[-1][2] == (t + 1) * sched.iters  # ... whole, in order
        assert all(a[2] == b[1] for a, b in zip(parts, parts[1:]))
        assert len(parts) <= sched.max_seg  # the workspace has a slot for every segment
        first, last = parts[0][0], parts[-1][0]
        assert [p for p, _, _ in parts] == list(range(first, last + 1))  # consecutive programs: slot = p - first
        # the kernel's owner formula for the tile's first and last iteration
        total, progs = sched.sk_tiles * sched.iters, sched.programs
        assert ((t * sched.iters + 1) * progs - 1) // total == first
        assert ((t + 1) * sched.iters * progs - 1) // total == last
    if cfg.split_k > 1:
        split = min(cfg.split_k, sched.iters)
        assert sched.programs == sched.tiles * split and all(len(p) == split for p in segs.values())
    if cfg.stream_k:
        assert sched.programs <= cfg.stream_k * 132
        if sched.sk_tiles and sched.tiles >= sched.programs:  # with a full wave, every share is >= one tile's worth
            assert sched.sk_tiles * sched.iters // sched.programs >= sched.iters


def test_schedule_modes():
    dp = schedule(208, 4096, 4096, HopperGemmConfig(128, 128, 64, 8, 4), 132)
    assert (dp.programs, dp.dp_tiles, dp.max_seg) == (64, 64, 1)  # one program per tile, no workspace
    ws = schedule(208, 4096, 4096, HopperGemmConfig(128, 128, 64, 4, 3, warp_spec=True), 132)
    assert (ws.programs, ws.dp_tiles, ws.max_seg) == (64, 64, 1)
    ws = schedule(608, 11008, 4096, HopperGemmConfig(128, 128, 64, 4, 3, warp_spec=True), 132)
    assert ws.programs == 132 and ws.dp_tiles == ws.tiles == 5 * 86  # persistent: one program per SM
    sk = schedule(208, 4096, 4096, HopperGemmConfig(128, 128, 64, 8, 4, stream_k=1), 132)
    assert sk.programs == 132 and sk.dp_tiles == 0  # 64 tiles < 132 SMs: all of them are cut
    sk = schedule(608, 12288, 4096, HopperGemmConfig(128, 128, 64, 8, 4, stream_k=1), 132)
    assert sk.tiles == 480 and sk.dp_tiles == 2 * 132  # 3 full waves + 84: the last wave and the rest are cut
    sp = schedule(208, 4096, 4096, HopperGemmConfig(128, 128, 64, 8, 4, split_k=40), 132)
    assert sp.programs == 64 * 40  # split capped at the 64 K iterations: no empty programs
    assert schedule(64, 64, 100, HopperGemmConfig(64, 64, 64, 4, 2, split_k=8), 132).programs == 2


# output columns, K, gated: the backbone's four GEMMs and two tower shapes
CANDIDATE_SHAPES = [(12288, 4096, False), (4096, 4096, False), (11008, 4096, True), (4096, 11008, False),
                    (4096, 1024, False), (1152, 4304, False)]


@pytest.mark.parametrize("m", [64, 128, 208, 320, 608, 768, 4096])
@pytest.mark.parametrize("n,k,gated", CANDIDATE_SHAPES)
def test_candidates_fit_the_chip(n, k, gated, m):
    cfgs = candidates(m, n, k, gated=gated, num_sms=132)
    names = [c.name for c in cfgs]
    assert len(names) == len(set(names)) >= 4
    assert [HopperGemmConfig.parse(nm) for nm in names] == cfgs
    assert any(c.stream_k for c in cfgs) and any(c.split_k == 1 and not c.stream_k for c in cfgs)
    for c in cfgs:
        assert c.smem_bytes(gated) <= SMEM_LIMIT and c.num_stages >= 3, c.name
        threads = 32 * (8 if c.warp_spec else c.num_warps)  # warp-specialised: two 4-warp consumer groups
        assert c.block_m * c.block_n * (2 if gated else 1) <= REGS_FOR_ACC * threads, c.name
        assert c.block_m <= max(64, 1 << (m - 1).bit_length()), c.name  # no tile taller than M rounded up
        if c.split_k > 1:
            s = schedule(m, n, k, c, 132)
            assert s.tiles < 1.5 * 132 and s.iters // c.split_k >= 8, c.name


# ---------------------------------------------------------------- numerics on odd shapes

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference(variant, m, dtype, gen):
    if m == 769 and dtype == torch.float16 and not variant.endswith("tma"):
        pytest.skip("interpreter time: M = 769 runs in fp16 for the TMA variants, in fp32 for all")
    cfg = variant_config(variant)
    x = randn(m, K, dtype=dtype, gen=gen)
    w = randn(N, K, dtype=dtype, gen=gen, scale=K ** -0.5)
    out = torch.full((m, N), float("nan"), dtype=dtype, device=DEVICE)  # poisoned: every element must be written
    y = flat_gemm_hopper(x, w, out=out, config=cfg, num_sms=SMS)
    assert y is out and y.shape == (m, N) and y.dtype == dtype
    assert not y.isnan().any()
    assert rel_err(y, reference(x, w)) < TOL[dtype]


EPILOGUES = ["bias", "residual", "residual-inplace", "gated", "gated-bias", "bias-residual"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_epilogues(variant, epilogue, dtype, gen):
    cfg = variant_config(variant)
    m = 83
    gated = epilogue.startswith("gated")
    x = randn(m, K, dtype=dtype, gen=gen)
    w = randn(2 * N if gated else N, K, dtype=dtype, gen=gen, scale=K ** -0.5)
    bias = randn(N, dtype=dtype, gen=gen) if "bias" in epilogue else None
    res = randn(m, N, dtype=dtype, gen=gen) if "residual" in epilogue else None
    ref = reference(x, w, bias=bias, residual=res, gated=gated)
    out = res if epilogue == "residual-inplace" else None
    y = flat_gemm_hopper(x, w, bias=bias, residual=res, gated=gated, out=out, config=cfg, num_sms=SMS)
    if out is not None:
        assert y.data_ptr() == res.data_ptr()  # accumulated into the residual
    assert y.shape == (m, N)
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("sms", [4, 20])  # 4: 1 DP wave + 5 cut tiles; 20: > tiles, every tile cut in 3-4
def test_stream_k_segments(sms, gen):
    cfg = HopperGemmConfig(32, 32, 32, 4, 2, stream_k=1)
    x = randn(83, K, dtype=torch.float32, gen=gen)
    w = randn(2 * N, K, dtype=torch.float32, gen=gen, scale=K ** -0.5)
    sched = schedule(83, N, K, cfg, sms)
    assert sched.max_seg > 1 and sched.sk_tiles > 0
    y = flat_gemm_hopper(x, w, gated=True, config=cfg, num_sms=sms)
    assert rel_err(y, reference(x, w, gated=True)) < TOL[torch.float32]


@pytest.mark.parametrize("variant", ["split3-tma", "streamk-ptr", "ws-tma"])
def test_deterministic_and_counters_reset(variant, gen):
    # the same inputs twice -> the same bits (the fix-up adds partials in slot order, whoever finishes); every
    # launch leaves the tile counters at zero, so the next launch starts clean
    from vla_accel.kernels import flat_gemm_hopper as launcher
    cfg = variant_config(variant)
    x = randn(208, K, dtype=torch.float16, gen=gen)
    w = randn(2 * N, K, dtype=torch.float16, gen=gen, scale=K ** -0.5)
    first = flat_gemm_hopper(x, w, gated=True, config=cfg, num_sms=SMS)
    second = flat_gemm_hopper(x, w, gated=True, config=cfg, num_sms=SMS)
    assert torch.equal(first.view(torch.int16), second.view(torch.int16))
    for buf in launcher._COUNTERS.values():
        assert int(buf.abs().sum()) == 0


def test_empty_and_degenerate_shapes(gen):
    w = randn(N, K, dtype=torch.float32, gen=gen)
    assert flat_gemm_hopper(randn(0, K, dtype=torch.float32, gen=gen), w).shape == (0, N)
    x0, w0 = randn(5, 0, dtype=torch.float32, gen=gen), randn(N, 0, dtype=torch.float32, gen=gen)
    bias = randn(N, dtype=torch.float32, gen=gen)
    assert torch.equal(flat_gemm_hopper(x0, w0, bias=bias), bias.expand(5, N))


# ---------------------------------------------------------------- through the registry (what the table dispatches)

@pytest.mark.parametrize("epilogue", ["plain", "bias", "residual", "residual-inplace", "gated"])
def test_runs_through_the_registry(epilogue, gen):
    """run_impl("hopper:...") as the dispatching launchers call it: inplace=True accumulates into the residual."""
    from vla_accel.kernels import run_impl

    cfg = HopperGemmConfig(64, 32, 32, 4, 2, split_k=3)
    m, dtype, gated = 83, torch.float32, epilogue == "gated"
    x = randn(m, K, dtype=dtype, gen=gen)
    w = randn(2 * N if gated else N, K, dtype=dtype, gen=gen, scale=K ** -0.5)
    bias = randn(N, dtype=dtype, gen=gen) if epilogue == "bias" else None
    res = randn(m, N, dtype=dtype, gen=gen) if epilogue.startswith("residual") else None
    ref = reference(x, w, bias=bias, residual=res, gated=gated)
    before = res.clone() if res is not None else None
    y = run_impl(cfg.name, x, w, bias=bias, residual=res, gated=gated, inplace=epilogue == "residual-inplace")
    assert y.shape == (m, N) and rel_err(y, ref) < TOL[dtype]
    if epilogue == "residual-inplace":
        assert y.data_ptr() == res.data_ptr()
    elif res is not None:
        assert y.data_ptr() != res.data_ptr() and torch.equal(res, before)  # out of place leaves it alone


def test_registry_falls_back_to_cublas_where_tma_cannot_read(gen):
    """A TMA config the table chose meets operands with unaligned rows (13 fp16 columns): cuBLAS runs instead of
    failing; the launcher itself refuses them."""
    from vla_accel.kernels import run_impl

    cfg = HopperGemmConfig(64, 64, 64, 4, 2)
    x13, w13 = randn(4, 13, dtype=torch.float16, gen=gen), randn(16, 13, dtype=torch.float16, gen=gen)
    assert torch.equal(run_impl(cfg.name, x13, w13), F.linear(x13, w13))
    with pytest.raises(ValueError, match="use tma0"):
        flat_gemm_hopper(x13, w13, config=cfg)


# ---------------------------------------------------------------- arguments and configs

def test_config_names_round_trip():
    for cfg in VARIANTS.values():
        assert HopperGemmConfig.parse(cfg.name) == cfg
    assert HopperGemmConfig().name == "hopper:bm128.bn128.bk64.w8.s4.k1.sk0.tma1.ws0"
    for bad in ["hopper:bm128.bn128", "flat:bm128.bn128.bk64.w8.s4.k1.sk0.tma1.ws0",
                "hopper:bm128.bn128.bk64.w8.s4.k1.sk0.tma2.ws0", "hopper:bm128.bn128.bk64.w8.s4.k.sk0.tma1.ws0"]:
        with pytest.raises(ValueError, match="config name"):
            HopperGemmConfig.parse(bad)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        HopperGemmConfig(96, 128, 64)
    with pytest.raises(ValueError, match="exclusive"):
        HopperGemmConfig(split_k=2, stream_k=1)
    with pytest.raises(ValueError, match="warp_spec needs"):
        HopperGemmConfig(num_warps=8, warp_spec=True)


def test_argument_checks(gen):
    x = randn(4, 32, dtype=torch.float32, gen=gen)
    w = randn(16, 32, dtype=torch.float32, gen=gen)
    with pytest.raises(ValueError, match="K mismatch"):
        flat_gemm_hopper(x, randn(16, 48, dtype=torch.float32, gen=gen))
    with pytest.raises(ValueError, match="share one of"):
        flat_gemm_hopper(x, w.half())
    with pytest.raises(ValueError, match="gate rows then up rows"):
        flat_gemm_hopper(x, randn(15, 32, dtype=torch.float32, gen=gen), gated=True)
    with pytest.raises(ValueError, match="residual must be"):
        flat_gemm_hopper(x, w, residual=randn(4, 8, dtype=torch.float32, gen=gen))
    with pytest.raises(ValueError, match="out must be"):
        flat_gemm_hopper(x, w, out=randn(4, 16, dtype=torch.float16, gen=gen))
    with pytest.raises(ValueError, match=r"bias must be \[16\]"):
        flat_gemm_hopper(x, w, bias=randn(8, dtype=torch.float32, gen=gen))
    # 13 fp16 columns: 26-byte rows cannot back a TMA descriptor; the pointer loads handle them
    x13, w13 = randn(4, 13, dtype=torch.float16, gen=gen), randn(16, 13, dtype=torch.float16, gen=gen)
    assert not tma_ok(x13)
    with pytest.raises(ValueError, match="use tma0"):
        flat_gemm_hopper(x13, w13, config=HopperGemmConfig(64, 64, 64, 4, 2))
    y = flat_gemm_hopper(x13, w13, config=HopperGemmConfig(64, 64, 64, 4, 2, tma=False))
    assert rel_err(y, reference(x13, w13)) < TOL[torch.float16]


# ---------------------------------------------------------------- GPU: bf16 at the real shapes

GPU_TOL = 1e-2  # bf16 output rounding (unit roundoff 3.9e-3 -> rel-L2 ~2e-3) plus fp32 sums over K = 4096-11008
# op, [N, K] of the weight as the runtime holds it (fused QKV / gate|up rows), epilogue
REAL = {
    "qkv": (12288, 4096, ""), "o": (4096, 4096, "residual"), "gate_up": (22016, 4096, "gated"),
    "down": (4096, 11008, "residual"), "dino_fc1": (4096, 1024, "bias"),
    "siglip_fc2": (1152, 4304, "bias"),  # K = 4304: not a multiple of BLOCK_K (the K tail)
}
GPU_CONFIGS = [  # one per schedule and load path, tiles the benchmark compiles too (Triton's cache is shared)
    HopperGemmConfig(128, 128, 64, 8, 4, stream_k=1),
    HopperGemmConfig(256, 128, 64, 8, 3, split_k=2),  # too many accumulator registers when gated: skipped there
    HopperGemmConfig(64, 128, 64, 4, 4, split_k=4),
    HopperGemmConfig(128, 128, 64, 4, 3, warp_spec=True),
    HopperGemmConfig(128, 128, 64, 8, 4, stream_k=1, tma=False),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [64, 208, 608])
@pytest.mark.parametrize("name", list(REAL))
def test_gpu_bf16_real_shapes(name, m):
    n, k, epilogue = REAL[name]
    gen = torch.Generator(device="cuda").manual_seed(m)
    bf = dict(device="cuda", dtype=torch.bfloat16, generator=gen)
    x = torch.randn(m, k, **bf)
    w = torch.randn(n, k, **bf) / k ** 0.5
    n_out = n // 2 if epilogue == "gated" else n
    bias = torch.randn(n_out, **bf) if epilogue == "bias" else None
    res = torch.randn(m, n_out, **bf) if epilogue == "residual" else None
    y32 = x.float() @ w.float().t()  # torch.matmul in fp32 on the same bf16 inputs
    if epilogue == "gated":
        y32 = F.silu(y32[:, :n_out]) * y32[:, n_out:]
    ref = y32 + (bias.float() if bias is not None else 0) + (res.float() if res is not None else 0)
    for cfg in GPU_CONFIGS:
        if cfg.warp_spec and not warp_spec_usable("cuda"):
            continue  # hangs Triton < 3.7 (flat_gemm_hopper.WARP_SPEC_MIN_TRITON)
        threads = 32 * (8 if cfg.warp_spec else cfg.num_warps)
        if cfg.block_m * cfg.block_n * (2 if epilogue == "gated" else 1) > REGS_FOR_ACC * threads:
            continue
        out = torch.full((m, n_out), float("nan"), device="cuda", dtype=torch.bfloat16)
        y = flat_gemm_hopper(x, w, bias=bias, residual=res, gated=epilogue == "gated", out=out, config=cfg)
        again = flat_gemm_hopper(x, w, bias=bias, residual=res, gated=epilogue == "gated", config=cfg)
        torch.cuda.synchronize()
        assert not y.isnan().any(), cfg.name
        assert rel_err(y, ref) <= GPU_TOL, cfg.name
        assert torch.equal(y.view(torch.int16), again.view(torch.int16)), f"{cfg.name}: not deterministic"
    if res is not None:  # in place: h += x @ w.T
        h = res.clone()
        flat_gemm_hopper(x, w, residual=h, out=h, config=GPU_CONFIGS[0])
        assert rel_err(h, ref) <= GPU_TOL
