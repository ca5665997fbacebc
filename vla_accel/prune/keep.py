"""KeepPlan: fixed token sets as PruneDecisions (vla_accel.protocols) -- no scoring, no device reads.

    plan = KeepPlan({2: [pos_0, pos_1], 6: [...]})   # layer i -> per sample, the original positions entering i
    plan = KeepPlan.from_prune_plan(prune_plan)       # replay the token sets a PrunePlan chose

Used to replay SpecPrune's decisions through another executor (equivalence checks: the same tokens through the
reference and the runner) and to time an executor at exactly those token counts without the pruning logic.
Positions per sample must ascend (tokens keep their order) and be present in the sequence entering that layer;
the first prune is taken against the unpruned sequence, where a token's index is its position.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from ..protocols import Keep, Rows


class KeepPlan:
    score_layers: tuple = ()
    blocking_layers: tuple = ()

    def __init__(self, keep: Mapping[int, Keep | Sequence], *, validate: bool = True):
        """keep: layer i (>= 1) -> a Keep, or per sample the ascending original positions entering layer i.
        validate: check that the positions exist in the sequence entering that layer (on the host)."""
        if any(int(i) < 1 for i in keep):
            raise ValueError(f"KeepPlan: tokens can be dropped only before layers >= 1; got {sorted(keep)}")
        self._given = {int(i): k if isinstance(k, Keep) else [_positions(p, i) for p in k] for i, k in keep.items()}
        self.prune_layers = sorted(i - 1 for i in self._given)  # pieces of the forward end after these layers
        self.validate = validate
        self._current: list[np.ndarray] | None = None  # per sample, the positions entering the current layer

    @staticmethod
    def from_prune_plan(plan, **kw) -> "KeepPlan":
        return KeepPlan(dict(plan.kept), **kw)

    def keep(self, i: int) -> Keep | None:
        if i == 0:
            self._current = None  # a new forward (a KeepPlan may be replayed any number of times)
        k = self._given.get(i)
        if k is None:
            return None
        if not isinstance(k, Keep):
            k = self._index(i, k)
        self._current = [k.positions[b, :n] for b, n in enumerate(k.counts)]
        return k

    def rows(self, i: int) -> Rows | None:
        return None

    def scores(self, i: int, key_mass: torch.Tensor) -> None:  # never asked for: no rows
        raise RuntimeError("KeepPlan scores no layer")

    def _index(self, i: int, positions: list[np.ndarray]) -> Keep:
        """Per sample positions -> Keep: the index of each position in the sequence entering layer i."""
        B, width = len(positions), max(len(p) for p in positions)
        if self._current is not None and len(self._current) != B:
            raise ValueError(f"KeepPlan: layer {i} gives {B} samples, the layer before {len(self._current)}")
        index = np.zeros((B, width), dtype=np.int64)
        pos = np.zeros((B, width), dtype=np.int64)
        for b, p in enumerate(positions):
            pos[b, :len(p)] = p
            if self._current is None:  # the unpruned sequence: index == position
                index[b, :len(p)] = p
                continue
            cur = self._current[b]
            idx = np.searchsorted(cur, p)
            if self.validate and (idx.max(initial=0) >= len(cur) or not np.array_equal(cur[idx], p)):
                raise ValueError(f"KeepPlan: layer {i} keeps positions of sample {b} that are not in the sequence "
                                 f"entering it")
            index[b, :len(p)] = idx
        return Keep(index, pos, np.array([len(p) for p in positions], dtype=np.int64))


def _positions(p, layer: int) -> np.ndarray:
    p = np.asarray(p.cpu() if isinstance(p, torch.Tensor) else p, dtype=np.int64).reshape(-1)
    if len(p) and (p.min() < 0 or (np.diff(p) <= 0).any()):
        raise ValueError(f"KeepPlan: the positions entering layer {layer} must be >= 0 and strictly ascending")
    return p
