"""Typed settings of the accelerated runtime; `configs/runtime/accel.yaml` fills them (every field is
commented there too). Validated at construction: a bad value fails naming the setting and what is allowed.

    cfg = RuntimeConfig.from_dict({"name": "accel", "graphs": True})
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vla_accel._config import build_dataclass, to_plain

NAMES = ("reference", "accel")
GEMMS = ("auto", "kernels", "torch")
ATTENTIONS = ("auto", "kernels", "flash", "sdpa")
ROWWISE = ("auto", "triton", "torch")
DTYPES = ("auto", "bfloat16", "float16", "float32")
SCORES = ("auto", "kernel", "exact")
ON_CPU = ("eager", "emulate", "error")

# Token-count buckets of the packed batch: (up to N tokens, step). 592 tokens -> 592, 601 -> 608.
DEFAULT_BUCKET_STEPS = ((1024, 16), (2048, 32), (4096, 64), (8192, 128))


class RuntimeConfigError(ValueError):
    """A runtime setting has a value that is not allowed; the message names it and what is allowed."""


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise RuntimeConfigError(f"runtime.{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _int_list(name: str, value: Any, minimum: int = 1) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value):
        raise RuntimeConfigError(f"runtime.{name} must be a non-empty list of integers >= {minimum}; got {value!r}")
    return tuple(sorted(set(value)))


@dataclass
class RuntimeConfig:
    name: str = "accel"                  # reference (plain PyTorch model) | accel (this runner)
    graphs: bool = True                  # CUDA graphs, captured lazily per (segment, batch size, token bucket); false = eager
    batch_sizes: tuple = (1, 2, 4, 8)    # batch sizes served by graphs; any other batch size runs eagerly
    bucket_steps: tuple = DEFAULT_BUCKET_STEPS  # [[up_to_tokens, step], ...]: packed token counts round up to a multiple of step; above the last up_to: eager
    max_graphs: int = 512                # captured graphs kept (least recently used dropped beyond this)
    dtype: str = "auto"                  # compute dtype: auto (the policy's) | bfloat16 | float16 | float32 (must equal the policy's)
    gemm: str = "auto"                   # auto (kernels' dispatch table when vla_accel.kernels imports, else torch) | kernels | torch (cuBLAS)
    table: str | None = None             # dispatch table JSON for gemm=kernels; null = vla_accel.kernels.default_table(device)
    attention: str = "auto"              # backbone: auto (kernels on CUDA when vla_accel.kernels imports, else flash; sdpa on CPU) | kernels (vla_accel.kernels.attention) | flash (torch's FA2 varlen) | sdpa
    vision_attention: str = "auto"       # vision towers (head dims 64 / 72): auto (torch SDPA on the dense per-image view: cuDNN on an H100, measured fastest for both towers; sdpa on CPU) | flash | sdpa (torch SDPA on [N, H, S, d], its own backend choice) | kernels (power-of-two head dims only, else flash)
    scores: str = "auto"                 # key mass for the pruning decisions: auto (kernel with attention=kernels, else exact) | kernel | exact (llama.key_mass_from_rows)
    rowwise: str = "auto"                # RMSNorm / RoPE / SiLU*up: auto (triton on CUDA, torch on CPU) | triton | torch
    vision_streams: bool = True          # run the two vision towers on two CUDA streams (concurrently)
    last_layer_action_rows: bool = True  # last layer: O-proj, MLP and final norm only for the 56 action rows per sample
    share_weights: bool = True           # the fused QKV / gate-up buffers become the storage of the model's own q/k/v, gate/up weights (no second copy)
    capture_fallback: bool = False       # a failed capture: false = raise (with what to change); true = warn once and run that shape eagerly
    on_cpu: str = "emulate"              # without CUDA: emulate (graphs replaced by recorded eager calls over the same static buffers, for tests) | eager | error
    profile: bool = False                # record CUDA events between vision / backbone / head (runner.last_stats["split_ms"])

    def __post_init__(self) -> None:
        _choice("name", self.name, NAMES)
        for name, allowed in (("gemm", GEMMS), ("attention", ATTENTIONS), ("vision_attention", ATTENTIONS),
                              ("rowwise", ROWWISE), ("dtype", DTYPES),
                              ("scores", SCORES), ("on_cpu", ON_CPU)):
            _choice(name, getattr(self, name), allowed)
        for name in ("graphs", "vision_streams", "last_layer_action_rows", "share_weights", "capture_fallback",
                     "profile"):
            if not isinstance(getattr(self, name), bool):
                raise RuntimeConfigError(f"runtime.{name} must be true or false; got {getattr(self, name)!r}")
        self.batch_sizes = _int_list("batch_sizes", to_plain(self.batch_sizes))
        steps = to_plain(self.bucket_steps)
        ok = isinstance(steps, (list, tuple)) and steps and all(
            isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s)
            for s in steps)
        if not ok:
            raise RuntimeConfigError(f"runtime.bucket_steps must be a list of [up_to_tokens, step] pairs of "
                                     f"positive integers, e.g. [[1024, 16], [2048, 32]]; got {steps!r}")
        steps = tuple((int(a), int(b)) for a, b in steps)
        if [a for a, _ in steps] != sorted({a for a, _ in steps}):
            raise RuntimeConfigError(f"runtime.bucket_steps up_to values must increase; got {steps}")
        if any(a % b for a, b in steps):
            raise RuntimeConfigError(f"runtime.bucket_steps: every up_to must be a multiple of its step; got {steps}")
        self.bucket_steps = steps
        if not isinstance(self.max_graphs, int) or self.max_graphs < 1:
            raise RuntimeConfigError(f"runtime.max_graphs must be a positive integer; got {self.max_graphs!r}")
        if self.table is not None and not isinstance(self.table, str):
            raise RuntimeConfigError(f"runtime.table must be null or a path; got {self.table!r}")

    @staticmethod
    def from_dict(values: Any) -> "RuntimeConfig":
        return build_dataclass(RuntimeConfig, "runtime", values, RuntimeConfigError)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["batch_sizes"] = list(self.batch_sizes)
        d["bucket_steps"] = [list(s) for s in self.bucket_steps]
        return d

    def bucket(self, tokens: int) -> int | None:
        """The padded token count serving `tokens` packed rows, or None (beyond every bucket: eager)."""
        for up_to, step in self.bucket_steps:
            if tokens <= up_to:
                return -(-max(tokens, 1) // step) * step
        return None


__all__ = ["RuntimeConfig", "RuntimeConfigError", "DEFAULT_BUCKET_STEPS"]
