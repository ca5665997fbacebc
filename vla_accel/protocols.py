"""The seams of one policy step, declared. A step, top to bottom:

    obs --Policy.prepare--> ids, pixels, proprio              (vla_accel/policy.py)
        --Actor.act_batch--> one batched query per step       (ChunkedActor: policy.py; SpecPrune: prune/wrapper.py)
        --PruneDecisions--> which tokens each layer keeps      (PrunePlan: prune/plan.py; KeepPlan: prune/keep.py)
        --Executor--> normalized actions, action hidden states (OpenVLAOFT: model/oft.py; AccelRunner: runtime/)
        --Policy.postprocess--> env-ready actions [8, 7]       (the actor queues the chunk, one action per env step)

The decisions are made and stated on the host (numpy); each executor applies them in its own layout: the reference
model on padded [B, S, D] tensors (model/llama.py), the runner on packed rows (runtime/runner.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch


@dataclass(frozen=True)
class Keep:
    """The tokens that enter a layer after a prune, per sample (host arrays). Sample b keeps counts[b] tokens, in
    order; entries at and past counts[b] are padding (0)."""

    index: np.ndarray  # int64 [B, S']: index of each kept token in the sample's current sequence
    positions: np.ndarray  # int64 [B, S']: its original position (RoPE index)
    counts: np.ndarray  # int64 [B]: tokens kept per sample

    @property
    def valid(self) -> np.ndarray:  # bool [B, S']
        return np.arange(self.index.shape[1]) < self.counts[:, None]

    @property
    def uniform(self) -> bool:  # every sample keeps S' tokens (no padding)
        return bool((self.counts == self.index.shape[1]).all())


@dataclass(frozen=True)
class Rows:
    """The query rows whose attention scores a layer, per sample (host arrays)."""

    index: np.ndarray  # int64 [B, R]: index in the sample's current sequence (0 where not valid)
    valid: np.ndarray  # bool [B, R]


@runtime_checkable
class PruneDecisions(Protocol):
    """One batched forward's pruning. The executor calls, for every layer i in order: keep(i) (before the layer;
    None: the tokens stay as they are), rows(i) (None: no scoring at i), and, after layer i's attention when rows
    were given, scores(i, key_mass). Tokens may change only before layers i with i - 1 in prune_layers, and rows
    come only at score_layers: an executor may run the layers in between as one piece."""

    score_layers: Sequence[int]  # sorted: layers whose key mass `scores` takes
    prune_layers: Sequence[int]  # sorted: layers AFTER which tokens may be dropped
    blocking_layers: Sequence[int]  # score layers whose key mass is read at once: an executor may hand it over early,
    #                                 as a host tensor, while it runs the rest of the layer

    def keep(self, i: int) -> Keep | None: ...

    def rows(self, i: int) -> Rows | None: ...

    def scores(self, i: int, key_mass: torch.Tensor) -> None:
        """key_mass [B, S_i] fp32, per sample in its current token order (padding entries 0), on the executor's
        device or the host: per key, the softmax probability it receives, averaged over heads and the rows."""


@runtime_checkable
class Executor(Protocol):
    """The forward: (input_ids [B, P] (right-padded prompts, 29871 appended), pixel_values [B, 6n, 224, 224],
    proprio [B, 8] normalized, all on the executor's device; prompt_lens int64 [B] on the HOST; decisions) ->
    (normalized actions [B, 8, 7] fp32, action hidden states [B, 56, D])."""

    def __call__(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, proprio: torch.Tensor,
                 prompt_lens: torch.Tensor | None = None,
                 decisions: PruneDecisions | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def describe(self) -> dict[str, Any]:
        """{"executor": name, ...what it resolved}."""


@runtime_checkable
class Actor(Protocol):
    """Streams (one per env) -> one action per stream per step; queries the policy when a stream's queue is empty."""

    def reset(self, streams: Sequence[int]) -> None: ...

    def act_batch(self, obs_list: Sequence[dict], instructions: Sequence[str],
                  streams: Sequence[int]) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """-> (actions [N, 7] env-ready, one info dict per stream: queried, latency_ms, batch_size, tokens_kept...)"""

    def describe(self) -> dict[str, Any]: ...


__all__ = ["Keep", "Rows", "PruneDecisions", "Executor", "Actor"]
