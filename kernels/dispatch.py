"""Heuristic dataflow (FlashDecoding++ section 3): pick the linear-layer implementation from (shape, M, table).

    table = load_table("kernels/tables/nvidia-h100-80gb-hbm3.json")   # or default_table(device)
    choose(table, (12288, 4096), m=150)          # -> "flat:bn64.bm256.bk64.w8.s3.k1"  (a pure function)
    y = linear(x, w, table=table)                # x: [..., K], w: [N, K] -> [..., N]
    y = linear(x, w, residual=r)                 # r + x @ w.T
    h = gate_up_silu(x, w_gate_up)               # silu(x @ Wg.T) * (x @ Wu.T), w_gate_up = cat([Wg, Wu]) [2I, K]

Implementations ("impl" names):
  "cublas"               torch (F.linear / addmm; the gated op adds silu * up in torch)
  "gemv:bn16.bk512.w4"   CUDA-core GEMV (M <= 16), gemm.GemvConfig
  "flat:bn64.bm16...."   flat tensor-core GEMM, optionally split-K, gemm.GemmConfig

Table (JSON): per GPU and dtype, for each key "<op>:<N>x<K>" (op: linear | linear_residual | gate_up_silu),
a list of rules [m_max, impl] in increasing m_max: impl serves every M in (previous m_max, m_max]. M above
the last rule, unknown shapes, other dtypes and no table at all give "cublas": the safe default.
linear_residual falls back to the linear rules of the same shape when it has none of its own (the residual
add is a cheap epilogue). The same table carries the attention kernel's tile configuration per head dim
("d128") and max sequence length, [L_max, "attn:bm64.bn64.w4.s3"] (choose_attention; none: the default).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .attention import AttentionConfig
from .gemm import GEMV_MAX_M, GemmConfig, GemvConfig, flat_gemm, gemv

OPS = ("linear", "linear_residual", "gate_up_silu")
FAMILIES = ("cublas", "gemv", "flat")
FORMAT = "vla_accel.kernels.dispatch/1"
TABLE_DIR = Path(__file__).parent / "tables"


def shape_key(op: str, shape: tuple[int, int]) -> str:
    if op not in OPS:
        raise ValueError(f"unknown op '{op}'; valid ops: {list(OPS)}")
    n, k = shape
    return f"{op}:{int(n)}x{int(k)}"


def impl_family(impl: str) -> str:
    return impl.partition(":")[0]


def validate_impl(impl: str) -> str:
    family = impl_family(impl)
    if family == "cublas" and impl == "cublas":
        return impl
    if family == "gemv":
        GemvConfig.parse(impl)
        return impl
    if family == "flat":
        GemmConfig.parse(impl)
        return impl
    raise ValueError(f"unknown implementation '{impl}'; valid families: {list(FAMILIES)} "
                     f"(e.g. 'cublas', '{GemvConfig().name}', '{GemmConfig().name}')")


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


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.lru_cache(maxsize=None)
def _packaged_table(gpu_name: str) -> DispatchTable:
    path = TABLE_DIR / f"{gpu_slug(gpu_name)}.json"
    if gpu_name and path.is_file():
        return load_table(path)
    return DispatchTable(gpu=gpu_name)  # no rules: cuBLAS everywhere


def default_table(device: torch.device | str | None = None) -> DispatchTable:
    """The packaged table tuned for this GPU (kernels/tables/<gpu>.json), else an empty one (all cuBLAS)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return DispatchTable(gpu=str(device))
    if not torch.cuda.is_available():
        return DispatchTable(gpu="cpu")
    return _packaged_table(torch.cuda.get_device_name(device))


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


def build_rules(points: list[tuple[int, dict[str, float]]], *, margin: float = 0.01) -> list[tuple[int, str]]:
    """Rules from profiled times: points = [(m, {impl: time})] at increasing m.

    At each m the fastest impl wins, except that cuBLAS is kept unless the winner beats it by more than
    `margin` (relative), so that noise never installs a kernel slower than cuBLAS. Neighbouring points with
    the same winner merge into one rule.
    """
    rules: list[tuple[int, str]] = []
    for m, times in sorted(points):
        best = min(times, key=times.get)
        if "cublas" in times and times[best] > times["cublas"] * (1.0 - margin):
            best = "cublas"
        if rules and rules[-1][1] == best:
            rules[-1] = (m, best)
        else:
            rules.append((m, best))
    return rules


# ---------------------------------------------------------------- dispatching launchers

def run_impl(impl: str, x: torch.Tensor, w: torch.Tensor, *, bias: torch.Tensor | None = None,
             residual: torch.Tensor | None = None, gated: bool = False, inplace: bool = False) -> torch.Tensor:
    """Run one named implementation. x: [M, K]; w: [N, K] ([2I, K] gated) -> [M, N] ([M, I]).
    inplace: the result may overwrite `residual` (cuBLAS accumulates into it; out of place, torch.addmm would
    copy it first; our kernels read it in their epilogue either way)."""
    family = impl_family(impl)
    if family == "cublas" and impl == "cublas":
        if gated:
            y = F.linear(x, w)
            inter = w.shape[0] // 2
            h = F.silu(y[:, :inter]) * y[:, inter:]
            return h + bias if bias is not None else h
        if residual is not None:
            if inplace and bias is None:
                return residual.addmm_(x, w.t())
            y = torch.addmm(residual, x, w.t())
            return y + bias if bias is not None else y
        return F.linear(x, w, bias)
    if family == "gemv" and x.shape[0] <= GEMV_MAX_M:
        return gemv(x, w, bias=bias, residual=residual, gated=gated, config=GemvConfig.parse(impl))
    if family == "gemv":  # a table rule past the GEMV's range: the flat kernel's default instead
        return flat_gemm(x, w, bias=bias, residual=residual, gated=gated)
    if family == "flat":
        return flat_gemm(x, w, bias=bias, residual=residual, gated=gated, config=GemmConfig.parse(impl))
    validate_impl(impl)
    raise AssertionError("unreachable")


def _pick(table: DispatchTable | None, x: torch.Tensor, w: torch.Tensor, m: int, op: str,
          impl: str | None) -> str:
    if impl is not None:
        return validate_impl(impl)
    if table is None:
        table = default_table(x.device)
    if str(x.dtype).replace("torch.", "") != table.dtype:
        return "cublas"
    return choose(table, tuple(w.shape), m, op)


def linear(x: torch.Tensor, w: torch.Tensor, *, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, table: DispatchTable | None = None,
           impl: str | None = None, inplace: bool = False) -> torch.Tensor:
    """y = x @ w.T (+ bias) (+ residual), dispatched per (w shape, M). x: [..., K], w: [N, K] -> [..., N].

    table None: default_table(x.device); impl: force one implementation by name; inplace: the result may
    overwrite `residual` (see run_impl).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    r2 = residual.reshape(-1, w.shape[0]) if residual is not None else None
    op = "linear_residual" if residual is not None else "linear"
    chosen = _pick(table, x2, w, x2.shape[0], op, impl)
    return run_impl(chosen, x2, w, bias=bias, residual=r2, inplace=inplace).reshape(*lead, w.shape[0])


def linear_residual(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, *, bias: torch.Tensor | None = None,
                    table: DispatchTable | None = None, impl: str | None = None,
                    inplace: bool = False) -> torch.Tensor:
    """residual + x @ w.T. x: [..., K], w: [N, K], residual: [..., N] -> [..., N] (inplace: see run_impl)."""
    return linear(x, w, bias=bias, residual=residual, table=table, impl=impl, inplace=inplace)


def gate_up_silu(x: torch.Tensor, w_gate_up: torch.Tensor, *, bias: torch.Tensor | None = None,
                 table: DispatchTable | None = None, impl: str | None = None) -> torch.Tensor:
    """silu(x @ Wg.T) * (x @ Wu.T). x: [..., K], w_gate_up = cat([Wg, Wu]): [2I, K] -> [..., I]."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    chosen = _pick(table, x2, w_gate_up, x2.shape[0], "gate_up_silu", impl)
    return run_impl(chosen, x2, w_gate_up, bias=bias, gated=True).reshape(*lead, w_gate_up.shape[0] // 2)
