"""Tile configurations of the kernels and their names: what the dispatch table stores and the tuner varies.

    GemmConfig(block_n=64, block_m=16).name          # "flat:bn64.bm16.bk128.w4.s4.k1"
    GemmConfig.parse("flat:bn64.bm16.bk128.w4.s4.k2")
    GemvConfig().name, AttentionConfig().name        # "gemv:bn8.bk1024.w4", "attn:bm64.bn64.w4.s3"

A name is "<family>:<key><int>.<key><int>...". The untuned defaults (`default_gemm_config`,
`default_attention_config`) serve shapes the table does not cover.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def config_fields(name: str, family: str, keys: tuple[str, ...], what: str = "kernel",
                  example: str | None = None) -> dict[str, int]:
    """A kernel config name "family:key1N.key2N..." -> {key: N}; ValueError unless it has exactly `keys`, each a
    positive integer (shared by the GEMM, GEMV and attention configs)."""
    head, _, body = name.partition(":")
    parts = body.split(".") if body else []
    fields = {}
    for part in parts:
        key = part.rstrip("0123456789")
        fields[key] = int(part[len(key):]) if part[len(key):] else -1
    if head != family or sorted(fields) != sorted(keys) or min(fields.values(), default=0) <= 0:
        example = example or family + ":" + ".".join(f"{k}16" for k in keys)
        raise ValueError(f"bad {what} config name '{name}': expected e.g. '{example}'")
    return fields


@dataclass(frozen=True)
class GemmConfig:
    """Tile configuration of flat_gemm_kernel (tiles are [block_n weight rows] x [block_m tokens])."""
    block_n: int = 64  # weight rows per program (the MMA's M side: 64 per warpgroup)
    block_m: int = 16  # tokens per program (the MMA's N side: padded to >= 16)
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4  # software-pipelining depth (>= 2: loads of the next tiles overlap the math)
    split_k: int = 1  # programs along K; > 1 adds an fp32 workspace and a reduction launch

    @property
    def name(self) -> str:
        return (f"flat:bn{self.block_n}.bm{self.block_m}.bk{self.block_k}"
                f".w{self.num_warps}.s{self.num_stages}.k{self.split_k}")

    @staticmethod
    def parse(name: str) -> "GemmConfig":
        fields = config_fields(name, "flat", ("bn", "bm", "bk", "w", "s", "k"))
        return GemmConfig(fields["bn"], fields["bm"], fields["bk"], fields["w"], fields["s"], fields["k"])


@dataclass(frozen=True)
class GemvConfig:
    """Tile configuration of gemv_kernel (CUDA cores; the M tokens are padded to a power of two)."""
    block_n: int = 8
    block_k: int = 1024
    num_warps: int = 4

    @property
    def name(self) -> str:
        return f"gemv:bn{self.block_n}.bk{self.block_k}.w{self.num_warps}"

    @staticmethod
    def parse(name: str) -> "GemvConfig":
        fields = config_fields(name, "gemv", ("bn", "bk", "w"))
        return GemvConfig(fields["bn"], fields["bk"], fields["w"])


@dataclass(frozen=True)
class AttentionConfig:
    """Tile configuration of attention_fwd_kernel; its name ("attn:bm64.bn64.w4.s3") is what tables store."""
    block_m: int = 64  # query rows per program
    block_n: int = 64  # keys per step
    num_warps: int = 4
    num_stages: int = 3

    @property
    def name(self) -> str:
        return f"attn:bm{self.block_m}.bn{self.block_n}.w{self.num_warps}.s{self.num_stages}"

    @staticmethod
    def parse(name: str) -> "AttentionConfig":
        fields = config_fields(name, "attn", ("bm", "bn", "w", "s"), what="attention",
                               example="attn:bm64.bn64.w4.s3")
        return AttentionConfig(fields["bm"], fields["bn"], fields["w"], fields["s"])


def default_gemm_config(m: int, n: int, k: int, *, gated: bool = False, num_sms: int = 132) -> GemmConfig:
    """A reasonable untuned configuration (the tuned table overrides it)."""
    stages = 3 if gated else 4
    if m <= 64:
        cfg = GemmConfig(block_n=64, block_m=max(16, next_pow2(m)), block_k=128, num_warps=4, num_stages=stages)
    else:
        cfg = GemmConfig(block_n=128, block_m=128, block_k=64, num_warps=8, num_stages=stages)
    return GemmConfig(cfg.block_n, cfg.block_m, cfg.block_k, cfg.num_warps, cfg.num_stages,
                      auto_split_k(m, n, k, cfg, num_sms))


def auto_split_k(m: int, n: int, k: int, cfg: GemmConfig, num_sms: int, waves: float = 1.0) -> int:
    """Smallest split of K that gives at least `waves` x num_sms programs (each keeps >= 4 K-tiles)."""
    tiles = cdiv(n, cfg.block_n) * cdiv(m, cfg.block_m)
    k_tiles = cdiv(k, cfg.block_k)
    split = 1
    while tiles * split < waves * num_sms and k_tiles // (split * 2) >= 4 and split < 8:
        split *= 2
    return split


def default_attention_config(head_dim: int, max_seqlen: int, device: torch.device) -> AttentionConfig:
    """Untuned choice (the dispatch table's attention rules override it on a tuned GPU)."""
    if device.type != "cuda":
        return AttentionConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)  # interpreter: few, cheap steps
    return AttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
