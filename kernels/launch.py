"""Dispatching launchers: a linear layer through the implementation the table picks for its shape and M.

    y = linear(x, w, table=table)                # x: [..., K], w: [N, K] -> [..., N]
    y = linear(x, w, residual=r)                 # r + x @ w.T (the add in the epilogue)
    h = gate_up_silu(x, w_gate_up)               # silu(x @ Wg.T) * (x @ Wu.T), w_gate_up = cat([Wg, Wu]) [2I, K]
    y = run_impl("flat:bn64.bm16.bk128.w4.s4.k1", x, w)   # one named implementation (registry.py)
"""

from __future__ import annotations

import torch

from .registry import parse_impl
from .table import DispatchTable, choose, default_table


def run_impl(impl: str, x: torch.Tensor, w: torch.Tensor, *, bias: torch.Tensor | None = None,
             residual: torch.Tensor | None = None, gated: bool = False, inplace: bool = False) -> torch.Tensor:
    """Run one named implementation. x: [M, K]; w: [N, K] ([2I, K] gated) -> [M, N] ([M, I]).
    inplace: the result may overwrite `residual` (see registry.py)."""
    family, config = parse_impl(impl)
    return family.run(x, w, config, bias=bias, residual=residual, gated=gated, inplace=inplace)


def _pick(table: DispatchTable | None, x: torch.Tensor, w: torch.Tensor, m: int, op: str,
          impl: str | None) -> str:
    if impl is not None:
        return impl
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
