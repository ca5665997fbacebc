"""Launcher of the Hopper flat GEMM (flat_gemm_hopper_kernel.py) for M = 64..768 tokens: persistent, split-K or
stream-K schedules with a deterministic in-kernel reduction, TMA or pointer loads, fused epilogues.

Weights follow torch.nn.Linear: w is [N, K] row-major and y = x @ w.T; x is [M, K] (rows contiguous).

    y = flat_gemm_hopper(x, w)                                         # [M, N]
    y = flat_gemm_hopper(x, w, bias=b)                                 # + b
    flat_gemm_hopper(x, w, residual=h, out=h)                          # h += x @ w.T, in place
    a = flat_gemm_hopper(x, w_gate_up, gated=True)                     # silu(x @ Wg.T) * (x @ Wu.T): [M, N/2]
    y = flat_gemm_hopper(x, w, config="hopper:bm128.bn128.bk64.w8.s4.k1.sk1.tma1.ws0")

A configuration (HopperGemmConfig) names the tile, the pipeline and the schedule:
  k  (split_k)   > 1: every tile's K is cut into k equal parts, one program each (grid = k x tiles);
  sk (stream_k)  > 0: sk programs per SM, persistent; the tiles of all full waves but the last are computed
                  whole, the rest (between one and two waves' worth) are cut evenly over all programs;
  ws (warp_spec): one persistent program per SM over whole tiles, warp-specialised (producer / consumers);
  none of these: one program per tile (data-parallel).
Partial sums go to an fp32 workspace and are added in a fixed order inside the kernel (see the kernel's
docstring): results are bitwise reproducible for a given configuration, M and device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import flat_gemm_hopper_kernel as _k
from .gemm import _check as check_linear_args

_FIELDS = ("bm", "bn", "bk", "w", "s", "k", "sk", "tma", "ws")
FAMILY = "hopper"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclass(frozen=True)
class HopperGemmConfig:
    """Tile, pipeline and schedule of flat_gemm_hopper_kernel. Tiles are [block_m tokens] x [block_n weight rows]."""
    block_m: int = 128  # tokens per tile (the MMA's M side: 64 rows per warpgroup)
    block_n: int = 128  # weight rows per tile (the MMA's N side)
    block_k: int = 64  # 64 bf16 = 128-byte rows: the widest shared-memory swizzle
    num_warps: int = 8
    num_stages: int = 4  # software-pipelining depth: tiles of x and W in flight per program
    split_k: int = 1  # > 1: split every tile's K this many ways (grid = split_k x tiles)
    stream_k: int = 0  # > 0: persistent stream-K with this many programs per SM (split_k must be 1)
    tma: bool = True  # loads through tensor descriptors (copy engine); False: pointer loads (cp.async)
    warp_spec: bool = False  # persistent data-parallel tiles, warp-specialised by Triton (a TMA producer and two
    # consumer warpgroups: 12 warps); needs tma, num_warps 4 and neither split_k nor stream_k

    def __post_init__(self):
        for field in ("block_m", "block_n", "block_k"):
            v = getattr(self, field)
            if not _pow2(v) or v < 16:
                raise ValueError(f"HopperGemmConfig.{field} must be a power of two >= 16; got {v}")
        if self.num_warps not in (4, 8, 16):
            raise ValueError(f"HopperGemmConfig.num_warps must be 4, 8 or 16; got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"HopperGemmConfig.num_stages must be >= 1; got {self.num_stages}")
        if self.split_k < 1 or self.stream_k < 0:
            raise ValueError(f"HopperGemmConfig: split_k must be >= 1 and stream_k >= 0; got {self.split_k}, "
                             f"{self.stream_k}")
        if self.split_k > 1 and self.stream_k:
            raise ValueError("HopperGemmConfig: split_k > 1 and stream_k > 0 are exclusive schedules")
        if self.warp_spec and (not self.tma or self.num_warps != 4 or self.split_k > 1 or self.stream_k):
            raise ValueError("HopperGemmConfig: warp_spec needs tma, num_warps = 4, split_k = 1 and stream_k = 0 "
                             "(Triton 3.6 specialises only that form on sm_90)")

    @property
    def name(self) -> str:
        return (f"{FAMILY}:bm{self.block_m}.bn{self.block_n}.bk{self.block_k}.w{self.num_warps}.s{self.num_stages}"
                f".k{self.split_k}.sk{self.stream_k}.tma{int(self.tma)}.ws{int(self.warp_spec)}")

    @staticmethod
    def parse(name: str) -> "HopperGemmConfig":
        head, _, body = name.partition(":")
        fields = {}
        for part in body.split(".") if body else []:
            key = part.rstrip("0123456789")
            digits = part[len(key):]
            fields[key] = int(digits) if digits else None
        if head != FAMILY or sorted(fields) != sorted(_FIELDS) or None in fields.values():
            raise ValueError(f"bad Hopper GEMM config name '{name}': expected e.g. '{HopperGemmConfig().name}'")
        for flag in ("tma", "ws"):
            if fields[flag] not in (0, 1):
                raise ValueError(f"bad Hopper GEMM config name '{name}': {flag} must be 0 or 1")
        return HopperGemmConfig(fields["bm"], fields["bn"], fields["bk"], fields["w"], fields["s"], fields["k"],
                                fields["sk"], bool(fields["tma"]), bool(fields["ws"]))

    def smem_bytes(self, gated: bool, itemsize: int = 2) -> int:
        """Shared memory of the load pipeline (x tile + W tile(s) per stage); the epilogue reuses it."""
        return (self.block_m + self.block_n * (2 if gated else 1)) * self.block_k * itemsize * self.num_stages


@dataclass(frozen=True)
class Schedule:
    """How the tiles of one launch are spread over its programs (all of it follows from shape, config, SMs)."""
    programs: int  # launch grid
    tiles: int  # output tiles
    iters: int  # K iterations per tile
    dp_tiles: int  # tiles [0, dp_tiles) are data-parallel, the rest stream-K
    max_seg: int  # workspace slots per stream-K tile (1: no tile is split, no workspace)

    @property
    def sk_tiles(self) -> int:
        return self.tiles - self.dp_tiles


def schedule(m: int, n: int, k: int, cfg: HopperGemmConfig, num_sms: int) -> Schedule:
    """Pure: the launch schedule of an [m, k] x [n, k]^T product (n: output columns) under cfg on num_sms SMs."""
    tiles = _cdiv(m, cfg.block_m) * _cdiv(n, cfg.block_n)
    iters = _cdiv(k, cfg.block_k)
    if cfg.stream_k:
        programs = min(cfg.stream_k * num_sms, tiles * iters)
        waves, rem = divmod(tiles, programs)
        # all full waves but the last run whole tiles; the last full wave plus the remainder are cut evenly, so
        # every program gets >= one tile's worth of iterations (short segments cost a pipeline fill each)
        dp_tiles = tiles if rem == 0 else max(0, (waves - 1) * programs)
    elif cfg.warp_spec:
        programs, dp_tiles = min(tiles, num_sms), tiles
    elif cfg.split_k > 1:
        split = min(cfg.split_k, iters)
        programs, dp_tiles = tiles * split, 0
    else:
        programs, dp_tiles = tiles, tiles
    sk_iters = (tiles - dp_tiles) * iters
    max_seg = 1
    if sk_iters:
        shortest = sk_iters // programs  # every range holds >= this many iterations
        max_seg = min(programs, _cdiv(iters, shortest) + 1)
    return Schedule(programs, tiles, iters, dp_tiles, max_seg)


# ---------------------------------------------------------------- the configurations worth timing on Hopper

SMEM_LIMIT = 220 * 1024  # sm_90 allows 227 KB per block; headroom for the barriers and the epilogue's scratch
REGS_FOR_ACC = 128  # fp32 accumulator registers per thread above which the 255-register budget spills
# (block_m, block_n, block_k, num_warps, num_stages), widest first per height; why each is there:
TILES = (
    (64, 128, 64, 4, 4),  # M <= 64: one warpgroup of 64 token rows
    (64, 256, 64, 8, 4),  # M <= 64: two warpgroups side by side along N; x re-read half as often
    (128, 64, 64, 4, 4),  # narrow weight tiles: twice the tiles of bn128, to fill 132 SMs at N = 4096
    (128, 128, 64, 8, 4),  # the general Hopper tile
    (128, 128, 128, 8, 3),  # longer K steps: half the barrier round trips per byte
    (128, 256, 64, 8, 3),  # CUTLASS's favourite: x re-read half as often as with bn128
    (256, 128, 64, 8, 3),  # M <= 256 in one row of tiles: every weight byte leaves HBM once
)
WS_TILES = ((128, 128, 64, 4, 3), (128, 64, 64, 4, 4))  # warp-specialised: num_warps 4 (-> 12 warps)
POINTER_TILES = ((128, 128, 64, 8, 4),)  # the same tile without TMA: what the copy engine buys
SPLITS = (2, 3, 4, 6, 8)


def _token_heights(m: int) -> tuple[int, ...]:
    if m <= 64:
        return (64,)
    if m <= 128:
        return (64, 128)
    return (128, 256)


def _fits(tile: tuple[int, int, int, int, int], gated: bool, consumer_warps: int | None = None) -> int:
    """num_stages that fit the shared memory (0: fewer than 3 fit, or the accumulators would spill). Two stages
    cannot hide HBM latency behind one tile step's MMAs (the gated 128x128x128 tile is the case: it also spills)."""
    bm, bn, bk, warps, stages = tile
    if bm * bn * (2 if gated else 1) > REGS_FOR_ACC * 32 * (consumer_warps or warps):
        return 0
    per_stage = (bm + bn * (2 if gated else 1)) * bk * 2
    stages = min(stages, SMEM_LIMIT // per_stage)
    return stages if stages >= 3 else 0


def candidates(m: int, n: int, k: int, *, gated: bool = False, num_sms: int = 132) -> list[HopperGemmConfig]:
    """Configurations worth timing for an [m, k] x [n, k]^T product (n: output columns, the gate width when gated).

    Per tile: data-parallel; stream-K (one program per SM, two for 4-warp tiles that leave room for a second);
    the split-K factor whose grid fills the last wave best (when the tiles alone leave SMs idle). Plus the
    warp-specialised persistent tiles and one pointer-load tile.
    """
    out: list[HopperGemmConfig] = []
    heights = _token_heights(m)
    for tile in TILES:
        bm, bn, bk, warps, _ = tile
        stages = _fits(tile, gated)
        if bm not in heights or not stages:
            continue
        base = HopperGemmConfig(bm, bn, bk, warps, stages)
        out += [base, HopperGemmConfig(bm, bn, bk, warps, stages, stream_k=1)]
        if warps == 4 and base.smem_bytes(gated) <= SMEM_LIMIT // 2:
            out.append(HopperGemmConfig(bm, bn, bk, warps, stages, stream_k=2))
        tiles = _cdiv(m, bm) * _cdiv(n, bn)
        iters = _cdiv(k, bk)
        if tiles < 1.5 * num_sms:
            def fill(s: int) -> float:  # busy fraction of the SMs over the split grid's waves
                return tiles * s / (_cdiv(tiles * s, num_sms) * num_sms)
            splits = [s for s in SPLITS if iters // s >= 8]
            if splits:
                best = max(splits, key=lambda s: (round(fill(s), 2), -s))
                out.append(HopperGemmConfig(bm, bn, bk, warps, stages, split_k=best))
    for tile in WS_TILES:
        bm, bn, bk, warps, _ = tile
        stages = _fits(tile, gated, consumer_warps=8)
        if bm in heights and stages:
            out.append(HopperGemmConfig(bm, bn, bk, warps, stages, warp_spec=True))
    for tile in POINTER_TILES:
        bm, bn, bk, warps, _ = tile
        stages = _fits(tile, gated)
        if bm in heights and stages:
            out += [HopperGemmConfig(bm, bn, bk, warps, stages, tma=False),
                    HopperGemmConfig(bm, bn, bk, warps, stages, stream_k=1, tma=False)]
    return out


def _check(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
           out: torch.Tensor | None, gated: bool) -> tuple[torch.Tensor, int, int, int]:
    x, m, n, k = check_linear_args(x, w, residual, bias, gated)  # the flat GEMM's contract (gemm.py)
    if residual is not None and residual.device != x.device:
        raise ValueError(f"flat_gemm_hopper: residual on {residual.device} but x on {x.device}")
    if out is not None and (out.shape != (m, n) or out.dtype != x.dtype or out.stride(1) != 1
                            or out.device != x.device):
        raise ValueError(f"flat_gemm_hopper: out must be [{m}, {n}] {x.dtype} on {x.device}, contiguous along N; got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if max(m * x.stride(0), w.shape[0] * w.stride(0), m * n) >= 2**31:
        raise ValueError(f"flat_gemm_hopper: offsets are int32; x [{m}, {k}], w {tuple(w.shape)} or the [{m}, {n}] "
                         f"output reach 2^31 elements: split M")
    return x, m, n, k


def tma_ok(t: torch.Tensor) -> bool:
    """Whether a 2-D tensor can back a TMA descriptor: 16-byte aligned base and row stride, unit column stride."""
    return (t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0)


def _descriptor(t: torch.Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor  # Triton >= 3.4; imported only on this path
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


# Tile counters of the in-kernel reduction, one zeroed int32 buffer per (device, stream): every launch leaves
# them at zero, so launches in one stream may share a buffer; launches that can overlap (other streams) may not.
# A buffer outgrown by a larger launch stays allocated (_RETIRED): a captured CUDA graph may still point at it.
_COUNTERS: dict[tuple[str, int], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []
_MIN_COUNTERS = 1 << 16  # more stream-K tiles than any shape here has (the backbone's largest: 12 x 344)


def _counters(device: torch.device, n: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is not None and buf.numel() >= n:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # inside a graph capture a fresh buffer is zeroed by the graph itself on every replay; it cannot be cached
        # (eager launches would find it uninitialised). Warm up on the capture stream to avoid the memset node.
        return torch.zeros(n, dtype=torch.int32, device=device)
    if buf is not None:
        _RETIRED.append(buf)
    buf = torch.zeros(max(n, _MIN_COUNTERS), dtype=torch.int32, device=device)
    _COUNTERS[key] = buf
    return buf


# Warp specialisation hangs Triton 3.6 on sm_90: on the H200 (2026-11-30, benchmarks/results/gemm_hopper_nvidia-h200_
# 2026-11-30.md) all 8 ws1 variants gave no result within 120 s (compile plus one launch), the other 28 built in
# seconds. Later Triton versions are untested on a GPU: they are allowed (the tuner's compile wall limit guards them).
WARP_SPEC_MIN_TRITON = (3, 7)


def triton_version() -> tuple[int, int]:
    import triton

    major, minor = (int("".join(c for c in part if c.isdigit()) or 0) for part in triton.__version__.split(".")[:2])
    return major, minor


def warp_spec_usable(device: torch.device | str) -> bool:
    """Whether ws1 configs may run on `device`: always in the interpreter (CPU), on a GPU from Triton 3.7 on."""
    return torch.device(device).type != "cuda" or triton_version() >= WARP_SPEC_MIN_TRITON


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the H100 / H200 count: what the interpreter plans for unless told otherwise


def flat_gemm_hopper(x: torch.Tensor, w: torch.Tensor, *, bias: torch.Tensor | None = None,
                     residual: torch.Tensor | None = None, gated: bool = False, out: torch.Tensor | None = None,
                     config: HopperGemmConfig | str | None = None, num_sms: int | None = None) -> torch.Tensor:
    """out = epilogue(x @ w.T). x: [M, K]; w: [N, K] ([2*I, K] gate rows then up rows when gated); bias: [N];
    residual: [M, N]; out: [M, N] destination (may be `residual`: in-place add) -> [M, N] (or [M, I]).

    config: a HopperGemmConfig or its name (default: HopperGemmConfig()); num_sms: the SM count the stream-K
    schedule plans for (default: the device's).
    """
    x, m, n, k = _check(x, w, bias, residual, out, gated)
    cfg = HopperGemmConfig.parse(config) if isinstance(config, str) else (config or HopperGemmConfig())
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(_empty_k_result(m, n, x, bias, residual, gated))
    if cfg.warp_spec and not warp_spec_usable(x.device):
        raise ValueError(f"flat_gemm_hopper: {cfg.name} is warp-specialised, which hangs Triton "
                         f"{'.'.join(map(str, triton_version()))} on sm_90 (needs Triton >= "
                         f"{'.'.join(map(str, WARP_SPEC_MIN_TRITON))}); use a ws0 config")
    w_gate, w_up = (w[:n], w[n:]) if gated else (w, w)
    sched = schedule(m, n, k, cfg, num_sms or _num_sms(x.device))
    if cfg.tma:
        operands = (("x", x), ("w", w_gate)) + ((("w's up rows", w_up),) if gated else ())
        bad = [label for label, t in operands if not tma_ok(t)]
        if bad:
            raise ValueError(f"flat_gemm_hopper: config {cfg.name} loads through TMA, which needs 16-byte aligned "
                             f"rows (K * itemsize % 16 == 0, aligned base); {', '.join(bad)} is not; "
                             f"use tma0 (pointer loads)")
        xa = _descriptor(x, [cfg.block_m, cfg.block_k])
        wa = _descriptor(w_gate, [cfg.block_n, cfg.block_k])
        wu = _descriptor(w_up, [cfg.block_n, cfg.block_k]) if gated else wa
    else:
        xa, wa, wu = x, w_gate, w_up
    counters = _counters(x.device, sched.sk_tiles)
    ws = (torch.empty(sched.sk_tiles * sched.max_seg * (1 + int(gated)) * cfg.block_m * cfg.block_n,
                      dtype=torch.float32, device=x.device)
          if sched.max_seg > 1 else counters.view(torch.float32))  # unused: any fp32 pointer (one specialisation)
    res = residual if residual is not None else out
    _k.flat_gemm_hopper_kernel[(sched.programs,)](
        xa, wa, wu, out, res, bias if bias is not None else out, ws, counters,
        m, n, k,
        x.stride(0), w.stride(0), out.stride(0), res.stride(0),
        sched.dp_tiles, sched.max_seg,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        USE_TMA=cfg.tma, EVEN_K=cfg.tma or k % cfg.block_k == 0, WARP_SPEC=cfg.warp_spec,
        GATED=gated, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _empty_k_result(m: int, n: int, x: torch.Tensor, bias, residual, gated: bool) -> torch.Tensor:
    y = torch.zeros((m, n), dtype=torch.float32, device=x.device)  # x @ w.T over K = 0; silu(0) * 0 = 0
    if bias is not None:
        y += bias.float()
    if residual is not None:
        y += residual.float()
    return y.to(x.dtype)
