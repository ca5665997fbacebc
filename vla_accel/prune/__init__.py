"""SpecPrune-VLA token pruning for OpenVLA-OFT, as an actor around any policy (see docs/specprune-vla.md).

    from vla_accel.prune import make_actor
    actor = make_actor(policy, {"name": "specprune", ...})     # or an omegaconf node of configs/prune/<name>.yaml
    actor.reset([0]); actions, infos = actor.act_batch([obs], [instruction], [0])

`name: none` gives the plain `ChunkedActor`; any other name builds `SpecPrune` from the mapping's fields.
Parts: changed.py (changed patches), scores.py (attention from chosen rows), static.py / dynamic.py
(token sets), controller.py (coarse / fine), plan.py (the decisions of one forward: vla_accel.protocols.PruneDecisions),
keep.py (KeepPlan: fixed token sets replayed as decisions), flops.py, overlay.py, demo.py.
"""

from __future__ import annotations

from typing import Any

from .._config import to_plain
from .config import PruneConfigError, SpecPruneConfig
from .controller import ActionController
from .keep import KeepPlan
from .plan import Dims, PrunePlan
from .wrapper import SpecPrune


def make_actor(policy, prune_cfg: Any):
    """The actor for `prune_cfg` (dict or omegaconf node of configs/prune/<name>.yaml)."""
    values = to_plain(prune_cfg)
    if isinstance(values, SpecPruneConfig):
        return SpecPrune(policy, values)
    if not isinstance(values, dict) or not isinstance(values.get("name"), str):
        raise PruneConfigError(f"prune config needs a 'name' (none, specprune, static_only, dynamic_only, ...); "
                               f"got {values!r}")
    if values["name"] == "none":
        from ..policy import ChunkedActor

        return ChunkedActor(policy)
    return SpecPrune(policy, values)


__all__ = ["make_actor", "SpecPrune", "SpecPruneConfig", "PruneConfigError", "PrunePlan", "KeepPlan", "Dims",
           "ActionController"]
