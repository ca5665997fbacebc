"""Analytic matmul FLOPs of the Llama backbone (multiply-add = 2 FLOPs).

Per layer with n tokens (bidirectional attention: every token attends to all n):
    projections  2 * n * (4 D^2 + 3 D I)      q, k, v, o (D x D each) + gate, up, down (D x I each)
    attention    4 * n * n * D                q k^T and p v over all heads
    scores       2 * R * n * D                the pruning plan's R query rows against all keys (key_mass_from_rows)
Norms, RoPE, softmax and the vision / action-head parts are left out (they are not pruned).
"""

from __future__ import annotations

from typing import Sequence


def layer_flops(n: int, hidden: int, intermediate: int) -> int:
    D, I = hidden, intermediate
    return 2 * n * (4 * D * D + 3 * D * I) + 4 * n * n * D


def score_flops(rows: int, keys: int, hidden: int) -> int:
    return 2 * rows * keys * hidden


def backbone_flops(tokens_per_layer: Sequence[int], hidden: int, intermediate: int,
                   score_rows: Sequence[int] | None = None) -> int:
    """Sum over layers; score_rows[i] = query rows scored at layer i (0 where none)."""
    total = sum(layer_flops(int(n), hidden, intermediate) for n in tokens_per_layer)
    if score_rows is not None:
        total += sum(score_flops(int(r), int(n), hidden) for r, n in zip(score_rows, tokens_per_layer))
    return total
