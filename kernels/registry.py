"""The linear-layer implementation families the dispatch table may name, in one registry.

An implementation name is "cublas" or "<family>:<config>" (e.g. "flat:bn64.bm16.bk128.w4.s4.k1"). A family
registers how to parse its config names, how to run one, which configs the tuner times at a point (op, N, K,
M) and what its Triton kernel specialises on (so the tuner compiles each variant once). The table validates
names (`family_of(impl).parse`), the launchers run them (`launch.run_impl`) and the tuner iterates
`FAMILIES` for its candidates: a new kernel family is one `register(GemmFamily(...))` at the end of this file.

    run(x [M, K], w [N, K] ([2I, K] gated), config, *, bias, residual, gated, inplace) -> [M, N] ([M, I])
    inplace: the result may overwrite `residual` (cuBLAS accumulates into it; out of place, torch.addmm would
    copy it first; our kernels read it in their epilogue either way).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import flat_gemm_hopper as hopper, rowwise
from .configs import GemmConfig, GemvConfig, auto_split_k
from .gemm import GEMV_MAX_M, flat_gemm, gemv


def _no_candidates(op: str, n: int, k: int, m: int, num_sms: int) -> list[str]:
    return []


@dataclass(frozen=True)
class GemmFamily:
    name: str  # the prefix of its implementation names ("flat" in "flat:bn64...")
    parse: Callable[[str], Any]  # implementation name -> config; ValueError naming what is expected
    run: Callable[..., torch.Tensor]  # run(x, w, config, *, bias, residual, gated, inplace) -> y
    candidates: Callable[[str, int, int, int, int], list[str]] = _no_candidates  # (op, n, k, m, num_sms) -> names
    compile_key: Callable[[str, int, int, Any], tuple] | None = None  # (op, k, m, config) -> Triton specialisation
    example: str = ""  # a valid name, for error messages


FAMILIES: dict[str, GemmFamily] = {}


def register(family: GemmFamily) -> GemmFamily:
    if family.name in FAMILIES:
        raise ValueError(f"kernel family '{family.name}' is registered already")
    FAMILIES[family.name] = family
    family_of.cache_clear()
    parse_impl.cache_clear()
    return family


@functools.lru_cache(maxsize=None)
def family_of(impl: str) -> GemmFamily:
    family = FAMILIES.get(impl.partition(":")[0])
    if family is None:
        raise ValueError(f"unknown implementation '{impl}'; valid families: {list(FAMILIES)} "
                         f"(e.g. {', '.join(repr(f.example) for f in FAMILIES.values())})")
    return family


@functools.lru_cache(maxsize=4096)
def parse_impl(impl: str) -> tuple[GemmFamily, Any]:
    """-> (family, config); ValueError for an unknown family or a bad config name (cached: names repeat)."""
    family = family_of(impl)
    return family, family.parse(impl)


# ---------------------------------------------------------------- cuBLAS (torch): always a candidate, the default
def _parse_cublas(name: str) -> None:
    if name != "cublas":
        raise ValueError(f"bad implementation name '{name}': the vendor GEMM is just 'cublas'")


def _run_cublas(x, w, config, *, bias=None, residual=None, gated=False, inplace=False):
    if gated:
        y = F.linear(x, w)
        if y.is_cuda:  # what the runtime runs when the table says cuBLAS: F.linear + the Triton SiLU*up pass
            h = rowwise.silu_mul(y)
        else:
            inter = w.shape[0] // 2
            h = F.silu(y[:, :inter]) * y[:, inter:]  # the model's SiLU * up (vla_accel.model.llama.silu_mul)
        return h + bias if bias is not None else h
    if residual is not None:
        if inplace and bias is None:
            return residual.addmm_(x, w.t())
        y = torch.addmm(residual, x, w.t())
        return y + bias if bias is not None else y
    return F.linear(x, w, bias)


# ---------------------------------------------------------------- GEMV (CUDA cores, M <= 16)
def _run_gemv(x, w, config, *, bias=None, residual=None, gated=False, inplace=False):
    if x.shape[0] <= GEMV_MAX_M:
        return gemv(x, w, bias=bias, residual=residual, gated=gated, config=config)
    # a table rule past the GEMV's range: the flat kernel's default configuration instead
    return flat_gemm(x, w, bias=bias, residual=residual, gated=gated)


def _gemv_candidates(op: str, n: int, k: int, m: int, num_sms: int) -> list[str]:
    if m > 4:
        return []
    return [GemvConfig(8, 1024, 4).name, GemvConfig(4, 2048, 4).name, GemvConfig(16, 1024, 8).name,
            GemvConfig(16, 512, 4).name]


def _gemv_compile_key(op: str, k: int, m: int, cfg: GemvConfig) -> tuple:
    bm = 1 << (m - 1).bit_length()
    bk = max(16, min(cfg.block_k, cfg.block_k * 2 // bm))  # as gemm.gemv sizes it
    return (op, "gemv", cfg.block_n, bk, bm, cfg.num_warps, k % bk == 0)


# ---------------------------------------------------------------- flat GEMM (tensor cores, small M, split-K)
def _run_flat(x, w, config, *, bias=None, residual=None, gated=False, inplace=False):
    return flat_gemm(x, w, bias=bias, residual=residual, gated=gated, config=config)


def _smem_bytes(cfg: GemmConfig, gated: bool) -> int:
    per_stage = (cfg.block_n * (2 if gated else 1) + cfg.block_m) * cfg.block_k * 2
    return per_stage * cfg.num_stages


FLAT_MAX_M_HOPPER = 128  # on sm_90 the flat family lost to cuBLAS by 13-100 % at every M > 128 of the H100 tune
# (kernels/tables/nvidia-h100-80gb-hbm3.json, meta.profile); the Hopper family covers those M there


def _flat_candidates(op: str, n: int, k: int, m: int, num_sms: int) -> list[str]:
    if m > FLAT_MAX_M_HOPPER and _on_hopper():
        return []
    gated = op == "gate_up_silu"
    n_out = n // 2 if gated else n
    bm = min(256, max(16, 1 << (m - 1).bit_length()))
    bases = []
    if m <= 32:  # narrow weight tiles: more programs for the N = 4096 shapes (tensor-core mma.sync path)
        bases += [GemmConfig(32, bm, 256, 4, 4 if not gated else 3)]
    if m <= 128:
        s = 3 if gated else 4
        bases += [GemmConfig(64, bm, 128, 4, s), GemmConfig(64, min(bm, 64), 256, 4, 3 if not gated else 2),
                  GemmConfig(128, bm, 128, 8, 3)]
    if 32 < m <= 128:
        bases += [GemmConfig(64, bm, 64, 4, 5)]
    if m > 64:
        bases += [GemmConfig(128, 128, 64, 8, 4 if not gated else 3), GemmConfig(128, 64, 64, 4, 4)]
        if not gated:
            bases += [GemmConfig(128, 256, 64, 8, 3)]
    out, seen = [], set()
    for base in bases:
        if _smem_bytes(base, gated) > 200 * 1024:
            continue
        splits = {1, auto_split_k(m, n_out, k, base, num_sms, 1.0), auto_split_k(m, n_out, k, base, num_sms, 2.0)}
        for split in sorted(splits):
            cfg = GemmConfig(base.block_n, base.block_m, base.block_k, base.num_warps, base.num_stages, split)
            if cfg.name not in seen:
                seen.add(cfg.name)
                out.append(cfg.name)
    return out


def _flat_compile_key(op: str, k: int, m: int, cfg: GemmConfig) -> tuple:
    return (op, "flat", cfg.block_n, cfg.block_m, cfg.block_k, cfg.num_warps, cfg.num_stages, cfg.split_k > 1,
            k % cfg.block_k == 0)


# ---------------------------------------------------------------- Hopper flat GEMM (TMA + wgmma, split-K / stream-K)
def _run_hopper(x, w, config, *, bias=None, residual=None, gated=False, inplace=False):
    if config.tma and not (hopper.tma_ok(x) and hopper.tma_ok(w)):
        # the table chose a TMA config for 16-byte aligned operands; an unaligned view cannot back a descriptor
        return _run_cublas(x, w, None, bias=bias, residual=residual, gated=gated, inplace=inplace)
    return hopper.flat_gemm_hopper(x, w, bias=bias, residual=residual, gated=gated,
                                   out=residual if inplace and residual is not None else None, config=config)


# The tuner's share of flat_gemm_hopper.candidates: the (tile, schedule) kinds that won or came within 5 % of the
# best of the family, or of cuBLAS, at some point of the H200 run of benchmarks/gemm_hopper.py (2026-11-30,
# benchmarks/results/gemm_hopper_nvidia-h200_2026-11-30.json; `python -m benchmarks.hopper_table RESULT --kinds`
# derives this set from it, and a test checks that they agree). Kind: (block_m, block_n, block_k, warps, stages,
# schedule, tma) with schedule "dp" (data-parallel), "split" (split-K, the factor the candidate rule picks for the
# shape), "sk1" / "sk2" (stream-K, programs per SM) or "ws" (warp-specialised). Left out, never that close:
# stream-K on the 4-warp tiles and with pointer loads, the 64x256 tile but its split-K, split-K on 128x256 and
# 256x128; and warp specialisation (hung Triton 3.6, see flat_gemm_hopper.WARP_SPEC_MIN_TRITON). Of that run's
# 45 distinct configs 25 remain, on 8 of its 11 compiled tiles (8 kernels to compile per epilogue, not 11).
HOPPER_TUNE_KINDS = frozenset({
    (64, 128, 64, 4, 4, "dp", True), (64, 128, 64, 4, 4, "split", True),
    (64, 256, 64, 8, 4, "split", True),
    (128, 64, 64, 4, 4, "dp", True), (128, 64, 64, 4, 4, "split", True),
    (128, 128, 64, 8, 4, "dp", True), (128, 128, 64, 8, 4, "split", True), (128, 128, 64, 8, 4, "sk1", True),
    (128, 128, 64, 8, 4, "dp", False),  # pointer loads: 1.02x cuBLAS at gate|up M = 128
    (128, 128, 128, 8, 3, "dp", True), (128, 128, 128, 8, 3, "split", True), (128, 128, 128, 8, 3, "sk1", True),
    (128, 256, 64, 8, 3, "dp", True), (128, 256, 64, 8, 3, "sk1", True),
    (256, 128, 64, 8, 3, "dp", True), (256, 128, 64, 8, 3, "sk1", True),
})
HOPPER_MIN_M = 33  # below, one 64-row tile is more than half padding: the GEMV / flat families serve M <= 32


def hopper_kind(cfg: hopper.HopperGemmConfig) -> tuple:
    """(block_m, block_n, block_k, warps, stages, schedule, tma) of a config: what HOPPER_TUNE_KINDS lists."""
    sched = ("ws" if cfg.warp_spec else "split" if cfg.split_k > 1 else f"sk{cfg.stream_k}" if cfg.stream_k
             else "dp")
    return (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, sched, cfg.tma)


def _on_hopper() -> bool:
    # without a GPU (tests, the interpreter) the candidates are listed as for an H100 / H200
    return not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] == 9


def _hopper_candidates(op: str, n: int, k: int, m: int, num_sms: int) -> list[str]:
    if m < HOPPER_MIN_M or not _on_hopper():
        return []
    gated = op == "gate_up_silu"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return [c.name for c in hopper.candidates(m, n // 2 if gated else n, k, gated=gated, num_sms=num_sms)
            if hopper_kind(c) in HOPPER_TUNE_KINDS and (not c.warp_spec or hopper.warp_spec_usable(device))]


def _hopper_compile_key(op: str, k: int, m: int, cfg: hopper.HopperGemmConfig) -> tuple:
    # the schedule (split_k, stream_k) is run-time scalars: one kernel per tile, pipeline, load path and epilogue
    return (op, "hopper", cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, cfg.tma,
            cfg.warp_spec, cfg.tma or k % cfg.block_k == 0)


# ---------------------------------------------------------------- the families, in the tuner's order
register(GemmFamily("cublas", _parse_cublas, _run_cublas, example="cublas"))
register(GemmFamily("gemv", GemvConfig.parse, _run_gemv, _gemv_candidates, _gemv_compile_key,
                    example=GemvConfig().name))
register(GemmFamily("flat", GemmConfig.parse, _run_flat, _flat_candidates, _flat_compile_key,
                    example=GemmConfig().name))
register(GemmFamily("hopper", hopper.HopperGemmConfig.parse, _run_hopper, _hopper_candidates, _hopper_compile_key,
                    example=hopper.HopperGemmConfig().name))
