"""The pruning plan of ONE batched forward: SpecPrune's decisions, a `vla_accel.protocols.PruneDecisions`.

    plan = PrunePlan(dims, schedule, static=..., dynamic=..., prompt_lens=lens, k_local=..., similarity=...)
    actions, hidden = executor(ids, pixels, proprio, lens, decisions=plan)
    plan.summary()                     # per sample: tokens per layer and camera, rules, fates, FLOPs

The executor calls, for every layer i in order:
    keep(i)           -> Keep | None   the tokens entering layer i (decided after layer i-1; None: all stay)
    rows(i)           -> Rows | None   the query rows to score at layer i (score layers only)
    scores(i, mass)                    their key mass [B, S_i]; the plan decides what is dropped after layer i
Declared: score_layers (sorted), prune_layers (layers AFTER which tokens may be dropped), blocking_layers (the
static layers: their key mass is read at once, so an executor may hand it over early, on the host).

Every decision is made and stated on the host, in numpy, from [B, 512] arrays (a torch op on so small a CPU tensor
costs more in dispatch than in work): Keep / Rows hold current indices AND original positions, so an executor
applies them in its own layout (padded or packed) with no device read. Records: plan.kept[i] (the Keep entering
layer i), plan.keep_visual[l] (bool [B, n_vis] visual slots kept after layer l), rules, dropped_after,
global_next, changed, importance, visual_scores (torch views of numpy arrays, host). Per forward the device sees
one copy of the key mass per score layer back to the host (the plan's only device -> host reads, all through
`_read`; counted in `plan.host_reads`). A score layer that only feeds the importance (not a static layer) is read
without blocking on CUDA (pinned buffer + event) and folded in when the importance is next needed (the next dynamic
cut, score layer or summary): the host waits there, after it has queued the layers in between (SpecPrune 7B:
layer 12, needed after 15).
The plan relies on the layout every executor keeps: per sample
[BOS] [the visual tokens still present, ascending] [proprio, prompt, placeholders, stop] [padding].
Non-visual tokens (BOS, proprio, prompt, placeholders, stop) are never dropped; kept tokens keep their
original positions (RoPE index) and their order, so `OpenVLAOFT.action_window` still finds the actions.

Score rows: one query-row group per layer (the protocol's limit). Static layers score with the prompt
tokens (after `query_skip` template tokens); dynamic score layers with every non-visual token. At a layer
that is both, the importance update reuses the prompt-row scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._device import to_host_async  # pinned staging, non-blocking copy
from ..protocols import Keep, Rows
from . import dynamic as dyn
from .config import DynamicConfig, LayerSchedule, StaticConfig
from .flops import backbone_flops
from .scores import query_window, window_rows
from .static import CHANGED, GLOBAL, LOCAL, changed_with_cap, ranks_per_camera, rule_codes, static_keep, topk_per_camera


@dataclass
class Dims:
    """What the plan needs to know about the model."""

    num_layers: int
    hidden: int
    intermediate: int
    num_images: int = 2
    patches_per_image: int = 256
    num_tail: int = 57  # action placeholders + stop token

    @property
    def n_vis(self) -> int:
        return self.num_images * self.patches_per_image


class PrunePlan:

    def __init__(self, dims: Dims, schedule: LayerSchedule, *, static: StaticConfig | None,
                 dynamic: DynamicConfig | None, prompt_lens, k_local=None, similarity=None, max_static=None,
                 global_prev=None):
        """prompt_lens [B] (incl. BOS and 29871); k_local [B, C] top-K per camera (mode-dependent);
        similarity [B, n_vis] patch similarity to the earlier frame (None: changed rule off); max_static [B, C]
        cap on static drops per camera (mode-dependent); global_prev [B, n_vis] bool (history).
        static / dynamic None = that part is off."""
        self.dims, self.static, self.dynamic = dims, static, dynamic
        n_vis, C = dims.n_vis, dims.num_images
        lens = torch.as_tensor(prompt_lens, dtype=torch.long).cpu().numpy()
        B = self.B = len(lens)
        self.static_layers = tuple(schedule.static_layers) if static is not None else ()
        self.dynamic_layers = tuple(schedule.dynamic_layers) if dynamic is not None else ()
        self.importance_layers = tuple(schedule.score_layers) if dynamic is not None else ()
        self.score_layers = sorted(set(self.static_layers) | set(self.importance_layers))
        self.prune_layers = sorted(set(self.static_layers) | set(self.dynamic_layers))
        self.blocking_layers = list(self.static_layers)  # scores() reads their key mass at once

        def host(x, dtype, shape):
            return torch.zeros(shape, dtype=dtype) if x is None else torch.as_tensor(x).cpu().to(dtype).reshape(shape)

        self.k_local = host(k_local, torch.long, (B, C))
        self.similarity = None if similarity is None else host(similarity, torch.float64, (B, n_vis))
        self.max_static = host(max_static, torch.long, (B, C))
        self.changed = torch.zeros(B, n_vis, dtype=torch.bool)  # the changed rule's set at the latest stage
        self.global_prev = host(global_prev, torch.bool, (B, n_vis))
        self.global_k = np.broadcast_to(static.global_topk if static is not None else (0,) * C, (B, C))
        # Sequence layout of sample b, always: [BOS] [present visual tokens, ascending] [nv_count[b] non-visual]
        self.nv_count = lens + dims.num_tail  # proprio + prompt[1:] + placeholders + stop
        # score query rows as original positions; index in the current sequence = position - visual dropped
        q_lo, q_hi = query_window(lens, n_vis, static.query_skip if static is not None else 0)
        self.q_lo, self.q_count = q_lo, q_hi - q_lo + 1
        self.r_prompt = int(self.q_count.max()) if B else 0
        self.r_nonvis = int(self.nv_count.max()) if B else 0
        self._nv_valid = np.arange(self.r_nonvis) < self.nv_count[:, None]  # [B, r_nonvis]: token j of b exists
        # original position of every visual slot, then of every non-visual token (BOS: 0)
        self._orig = np.concatenate([np.arange(1, n_vis + 1), n_vis + 1 + np.arange(self.r_nonvis)])

        # per-forward state (numpy) and records (torch views of numpy arrays), all on the host
        L = dims.num_layers
        self.present_vis = np.ones((B, n_vis), dtype=bool)  # visual slots still in the sequence
        self.n_present = np.full(B, n_vis)  # = present_vis.sum(1), kept on the host
        self._importance = np.zeros((B, n_vis), dtype=np.float32)
        self.local_union = np.zeros((B, n_vis), dtype=bool)
        self.rules = torch.zeros(B, n_vis, dtype=torch.uint8)
        self.dropped_after = torch.full((B, n_vis), -1, dtype=torch.long)
        self.global_next = torch.zeros(B, n_vis, dtype=torch.bool)
        self.keep_visual: dict[int, torch.Tensor] = {}
        self.kept: dict[int, Keep] = {}  # layer i -> the tokens entering it (only where some were dropped)
        self._visual_scores: dict[int, torch.Tensor] = {}  # layer -> [B, n_vis] fp32 (-inf = absent)
        self._present_at: list[np.ndarray | None] = [None] * L  # present_vis entering layer i (summary)
        self._rows: list[np.ndarray | None] = [None] * L  # [B] score rows used at layer i
        self._pending = None  # an importance-only score layer read but not folded in yet
        self.host_reads = 0  # device -> host reads (syncs on CUDA) this forward

    # ------------------------------------------------------------------ host reads (the plan's only syncs)
    def _read(self, x: torch.Tensor, wait: bool = True):
        """The plan's one device -> host path. wait: -> a host copy of x. Else on CUDA -> (pinned copy, event)
        whose copy is complete once the event is; elsewhere the same as wait."""
        self.host_reads += 1
        if wait:
            return x.cpu()
        if x.device.type != "cuda":  # a copy: the executor may reuse x's memory before the plan reads it
            return x.cpu().clone(), None
        return to_host_async(x)

    def _flush(self):
        """Folds a pending importance-only score layer into the importance (waits for its copy)."""
        if self._pending is None:
            return
        i, mass, ev, pres, n_present = self._pending
        self._pending = None
        if ev is not None:
            ev.synchronize()
        scores = self._scores(i, mass, pres, n_present)
        self._update_importance(i, scores, pres, ranks_per_camera(scores, self.dims.num_images))

    @property
    def importance(self) -> torch.Tensor:
        """[B, n_vis] fp32 (host)."""
        self._flush()
        return torch.from_numpy(self._importance)

    @property
    def visual_scores(self) -> dict[int, torch.Tensor]:
        self._flush()
        return self._visual_scores

    # ------------------------------------------------------------------ PruneDecisions
    def keep(self, i: int) -> Keep | None:
        prev, out = i - 1, None
        if prev in self.dynamic_layers:
            self._flush()
            keep = dyn.dynamic_keep(self._importance, self.present_vis, self.dynamic.keep_ratio,
                                    self.dynamic.min_visual, self.n_present)
            self.keep_visual[prev] = torch.from_numpy(keep)
        if prev in self.prune_layers:
            out = self._drop(prev)
            if out is not None:
                self.kept[i] = out
        self._present_at[i] = self.present_vis  # never modified in place: _drop replaces it
        return out

    def rows(self, i: int) -> Rows | None:
        if i in self.static_layers:
            start, count, R = self.q_lo, self.q_count, self.r_prompt
        elif i in self.importance_layers:
            start, count, R = np.full(self.B, self.dims.n_vis + 1), self.nv_count, self.r_nonvis
        else:
            return None
        start = start - (self.dims.n_vis - self.n_present)  # minus the visual tokens dropped so far
        self._rows[i] = count
        return Rows(*window_rows(start, count, R))

    def scores(self, i: int, key_mass: torch.Tensor) -> None:
        self._flush()  # an earlier importance layer first: the EMA runs in layer order
        pres, n_present = self.present_vis, self.n_present
        if i not in self.static_layers:  # importance only: nothing needs it before the next dynamic cut
            self._pending = (i, *self._read(key_mass, wait=False), pres, n_present)
            return
        scores = self._scores(i, self._read(key_mass), pres, n_present)
        ranks = ranks_per_camera(scores, self.dims.num_images)  # one sort for every rule at this layer
        if i in self.importance_layers:
            self._update_importance(i, scores, pres, ranks)
        self._static_stage(i, scores, pres, ranks)

    # ------------------------------------------------------------------ decisions
    def _scores(self, i, mass, pres, n_present):
        """key mass [B, S] (host tensor) -> visual scores [B, n_vis] fp32 by slot (-inf = absent), recorded in
        visual_scores. The visual tokens sit at 1 .. n_present, ascending slots."""
        mass = mass.float().numpy()
        R = int(n_present.max())
        valid = np.arange(R)[None] < n_present[:, None]
        scores = np.full((self.B, self.dims.n_vis), -np.inf, dtype=np.float32)
        scores[pres] = mass[:, 1:1 + R][valid]
        self._visual_scores[i] = torch.from_numpy(scores)
        return scores

    def _update_importance(self, i, scores, pres, ranks):
        """ranks: per camera, of scores (which are -inf where absent, i.e. of where(pres, scores, -inf))."""
        d = self.dynamic
        w = dyn.layer_weight(i, self.dims.num_layers, d.depth_sharpness)
        self._importance = dyn.update_importance(self._importance, scores, pres, self.dims.num_images,
                                                 alpha=d.ema_alpha, weight=w, w_max=d.rank_weight_max,
                                                 w_min=d.rank_weight_min, ranks=ranks)

    def _static_stage(self, i, scores, pres, ranks):
        C = self.dims.num_images
        last = i == self.static_layers[-1]
        k_local = self.k_local.numpy()
        top_k = topk_per_camera(scores, k_local, C, ranks)
        if last:
            self.local_union |= top_k
            local = self.local_union
        else:  # speculative stage: a wider candidate set now, refined at the next scoring layer
            local = topk_per_camera(scores, k_local * self.static.first_factor, C, ranks) | self.local_union
            self.local_union |= top_k
        if self.similarity is not None:
            self.changed = torch.from_numpy(changed_with_cap(self.similarity.numpy(), scores,
                                                             self.static.changed.sim_threshold,
                                                             self.max_static.numpy(), C, ranks))
        changed, global_prev = self.changed.numpy(), self.global_prev.numpy()
        keep = static_keep(pres, changed, global_prev, local)
        self.keep_visual[i] = torch.from_numpy(keep)
        if last:
            self.rules = torch.from_numpy(np.where(keep, rule_codes(changed, global_prev, local), np.uint8(0)))
            self.global_next = torch.from_numpy(topk_per_camera(scores, self.global_k, C, ranks))

    def _drop(self, layer) -> Keep | None:
        """Drops the visual tokens not in keep_visual[layer] (host); records their fate. -> the Keep entering layer + 1
        (None when nothing was dropped)."""
        before = self.present_vis
        keep_vis = self.keep_visual[layer].numpy() & before
        n_before, n_kept = self.n_present, keep_vis.sum(1)
        if np.array_equal(n_kept, n_before):  # (keep_vis is a subset of before)
            return None
        self.dropped_after.numpy()[before & ~keep_vis] = layer  # (in place: a view of the record)
        self.present_vis, self.n_present = keep_vis, n_kept
        counts = 1 + n_kept + self.nv_count
        B, S_new = self.B, int(counts.max())
        # current index of every visual slot present and every non-visual token (BOS: 0); which of them stay
        cur = np.concatenate([before.cumsum(1), n_before[:, None] + 1 + np.arange(self.r_nonvis)], 1)
        stay = np.concatenate([keep_vis, self._nv_valid], 1)
        # [B, S']: the current index and original position of every kept token, in order: BOS, the kept visual
        # tokens, the non-visual tokens, then padding (index 0, position 0)
        valid = np.arange(S_new) < counts[:, None]
        index = np.zeros((B, S_new), dtype=np.int64)
        positions = np.zeros((B, S_new), dtype=np.int64)
        index[:, 1:][valid[:, 1:]] = cur[stay]
        positions[:, 1:][valid[:, 1:]] = np.broadcast_to(self._orig, stay.shape)[stay]
        return Keep(index, positions, counts)

    # ------------------------------------------------------------------ results
    def summary(self) -> list[dict[str, Any]]:
        """Per sample: token counts per layer and camera, rules, fates, FLOPs (python / numpy values)."""
        L, D, C = self.dims.num_layers, self.dims.hidden, self.dims.num_images
        if any(p is None for p in self._present_at):
            raise RuntimeError("summary() before the forward pass went through every layer")
        self._flush()
        visual = np.stack(self._present_at, 1).reshape(self.B, L, C, -1).sum(3)  # [B, L, C]
        tokens = 1 + visual.sum(2) + self.nv_count[:, None]  # [B, L]
        zero = np.zeros(self.B, dtype=np.int64)
        rows = np.stack([r if r is not None else zero for r in self._rows], 1)  # [B, L]
        rules, dropped, global_next = self.rules.numpy(), self.dropped_after.numpy(), self.global_next.numpy()
        static_out = self.static_layers[-1] + 1 if self.static_layers else None
        out = []
        for b in range(self.B):
            full = backbone_flops([tokens[b, 0]] * L, D, self.dims.intermediate)
            pruned = backbone_flops(tokens[b], D, self.dims.intermediate, rows[b])
            kept_static = rules[b] != 0
            out.append({
                "tokens_kept": int(tokens[b, -1]),
                "tokens_full": int(tokens[b, 0]),
                "kept_per_layer": tokens[b].tolist(),
                "visual_per_layer": visual[b].sum(1).tolist(),
                "kept_per_camera": visual[b, -1].tolist(),
                "kept_static_per_camera": visual[b, static_out].tolist() if static_out is not None else None,
                "kept_by_rule": ({name: int(((rules[b] & bit) != 0).sum()) for bit, name in
                                  ((CHANGED, "changed"), (GLOBAL, "global"), (LOCAL, "local"))}
                                 if static_out is not None else None),
                "flops": pruned, "flops_full": full, "flops_ratio": pruned / full,
                "rules": rules[b], "dropped_after": dropped[b], "global_next": global_next[b],
                "kept_static": kept_static,
            })
        return out


def plan_for_batch(prune_cfg, schedule: LayerSchedule, dims: Dims, prompt_lens, *, k_local=None, similarity=None,
                   max_static=None, global_prev=None) -> PrunePlan:
    """A PrunePlan from a SpecPruneConfig (disabled parts left out)."""
    return PrunePlan(dims, schedule, static=prune_cfg.static if prune_cfg.static.enabled else None,
                     dynamic=prune_cfg.dynamic if prune_cfg.dynamic.enabled else None, prompt_lens=prompt_lens,
                     k_local=k_local, similarity=similarity, max_static=max_static, global_prev=global_prev)

