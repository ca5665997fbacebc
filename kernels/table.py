"""The dispatch table (FlashDecoding++ section 3): which implementation serves a linear layer of shape [N, K] at M
tokens, per GPU, and which attention tiles serve a head dim and sequence length. `choose` is a pure function.

    table = load_table("kernels/tables/nvidia-h100-80gb-hbm3.json")   # or default_table(device)
    choose(table, (12288, 4096), m=150)          # -> "flat:bn64.bm256.bk64.w8.s3.k1"
    choose_attention(table, 128, 608)            # -> "attn:bm64.bn32.w4.s3" or None (the default tiles)

JSON: per GPU and dtype, for each key "<op>:<N>x<K>" (op: linear | linear_residual | gate_up_silu) a list of
rules [m_max, impl] in increasing m_max: impl (a name of registry.py) serves every M in (previous m_max, m_max].
M above the last rule, unknown shapes, other dtypes and no table at all give "cublas": the safe default.
linear_residual falls back to the linear rules of the same shape when it has none of its own (the residual add is
a cheap epilogue). Attention: per head dim ("d128") [L_max, "attn:..."] rules (none: the default tiles).

Where tables live: `vla-accel-tune` writes to the user's cache (`user_table_dir()`: $XDG_CACHE_HOME/vla_accel/tables
or ~/.cache/vla_accel/tables) unless given a path; `default_table` loads <gpu>.json from there first, then the one
packaged with this module (kernels/tables/), else an empty table (cuBLAS everywhere).
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .configs import AttentionConfig
from .registry import FAMILIES, parse_impl

OPS = ("linear", "linear_residual", "gate_up_silu")
FORMAT = "vla_accel.kernels.dispatch/1"
TABLE_DIR = Path(__file__).parent / "tables"  # tables packaged with the module (read only)


def shape_key(op: str, shape: tuple[int, int]) -> str:
    if op not in OPS:
        raise ValueError(f"unknown op '{op}'; valid ops: {list(OPS)}")
    n, k = shape
    return f"{op}:{int(n)}x{int(k)}"


def impl_family(impl: str) -> str:
    return impl.partition(":")[0]


def validate_impl(impl: str) -> str:
    """impl, if it names a registered family with a valid config; else ValueError listing the families."""
    parse_impl(impl)
    return impl


@dataclass
class DispatchTable:
    gpu: str = ""  # torch.cuda.get_device_name() of the GPU the table was tuned on
    dtype: str = "bfloat16"  # activation / weight dtype it was tuned for
    rules: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # key -> [(m_max, impl)], ascending
    attention: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # "d128" -> [(L_max, attn config)]
    meta: dict = field(default_factory=dict)  # provenance and raw profile data (not read by choose)

    def __post_init__(self):
        for key, rules in self.rules.items():
            op = key.partition(":")[0]
            if op not in OPS:
                raise ValueError(f"table key '{key}': unknown op '{op}'; valid ops: {list(OPS)}")
            ms = [m for m, _ in rules]
            if ms != sorted(ms) or len(set(ms)) != len(ms):
                raise ValueError(f"table key '{key}': m_max values must be strictly increasing; got {ms}")
            for _, impl in rules:
                validate_impl(impl)
        self.rules = {k: [(int(m), str(i)) for m, i in v] for k, v in self.rules.items()}
        for key, rules in self.attention.items():
            for _, name in rules:
                AttentionConfig.parse(name)
        self.attention = {k: [(int(m), str(i)) for m, i in v] for k, v in self.attention.items()}

    def switch_points(self, key: str) -> list[tuple[int, str, str]]:
        """[(first M of the new family, old family, new family)] along M, for reading the table."""
        out, prev = [], None
        bounds = [0] + [m for m, _ in self.rules.get(key, [])]
        for (m_max, impl), lower in zip(self.rules.get(key, []), bounds):
            fam = impl_family(impl)
            if prev is not None and fam != prev:
                out.append((lower + 1, prev, fam))
            prev = fam
        return out

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "gpu": self.gpu, "dtype": self.dtype,
            "rules": {k: [[m, impl] for m, impl in v] for k, v in sorted(self.rules.items())},
            "switch_points": {k: [list(s) for s in self.switch_points(k)] for k in sorted(self.rules)},
            "attention": {k: [[m, c] for m, c in v] for k, v in sorted(self.attention.items())},
            "meta": self.meta,
        }

    @staticmethod
    def from_dict(d: dict) -> "DispatchTable":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a dispatch table (format {d.get('format')!r}, expected {FORMAT!r})")
        return DispatchTable(gpu=d.get("gpu", ""), dtype=d.get("dtype", "bfloat16"),
                             rules={k: [(int(m), str(i)) for m, i in v] for k, v in d.get("rules", {}).items()},
                             attention={k: [(int(m), str(c)) for m, c in v] for k, v in d.get("attention", {}).items()},
                             meta=d.get("meta", {}))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")


def load_table(path: str | Path) -> DispatchTable:
    return DispatchTable.from_dict(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------- where tables live
def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def user_table_dir() -> Path:
    """Where vla-accel-tune writes by default and default_table looks first: $XDG_CACHE_HOME/vla_accel/tables
    (XDG_CACHE_HOME unset: ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vla_accel" / "tables"


def user_table_path(gpu_name: str) -> Path:
    return user_table_dir() / f"{gpu_slug(gpu_name)}.json"


def table_path(gpu_name: str) -> Path | None:
    """The table default_table uses for this GPU: the user's tuned one, else the packaged one, else None."""
    if not gpu_name:
        return None
    for path in (user_table_path(gpu_name), TABLE_DIR / f"{gpu_slug(gpu_name)}.json"):
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=None)
def _load_cached(path: str, mtime_ns: int) -> DispatchTable:
    return load_table(path)


def table_for_gpu(gpu_name: str) -> DispatchTable:
    """The table for a GPU by name (see table_path); an empty table (cuBLAS everywhere) when there is none."""
    path = table_path(gpu_name)
    if path is None:
        return DispatchTable(gpu=gpu_name)
    return _load_cached(str(path), path.stat().st_mtime_ns)


def default_table(device: torch.device | str | None = None) -> DispatchTable:
    """The table for this GPU (table_for_gpu); on a CPU device, an empty one."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return DispatchTable(gpu=str(device))
    if not torch.cuda.is_available():
        return DispatchTable(gpu="cpu")
    return table_for_gpu(torch.cuda.get_device_name(device))


# ---------------------------------------------------------------- the choice
def choose(table: DispatchTable | None, shape: tuple[int, int], m: int, op: str = "linear") -> str:
    """Pure: the implementation for an [N, K] weight and M tokens, per the table's rules ("cublas" if none)."""
    if table is None or m <= 0:
        return "cublas"
    rules = table.rules.get(shape_key(op, shape))
    if rules is None and op == "linear_residual":
        rules = table.rules.get(shape_key("linear", shape))
    for m_max, impl in rules or ():
        if m <= m_max:
            return impl
    return "cublas"


def choose_attention(table: DispatchTable | None, head_dim: int, max_seqlen: int) -> str | None:
    """Pure: the attention tile config name for (head dim, max sequence length), or None (use the default)."""
    if table is None:
        return None
    for l_max, name in table.attention.get(f"d{int(head_dim)}", ()):
        if max_seqlen <= l_max:
            return name
    return None


__all__ = ["DispatchTable", "FAMILIES", "OPS", "FORMAT", "TABLE_DIR", "choose", "choose_attention", "default_table",
           "gpu_slug", "impl_family", "load_table", "shape_key", "table_for_gpu", "table_path", "user_table_dir",
           "user_table_path", "validate_impl"]
