"""The pruning plan of ONE batched forward: a hook object for `LlamaBackbone.forward(..., hook=plan)`.

Protocol (see `vla_accel/model/llama.py`), called by the executor for every layer i:
    before_layer(i, h, positions, key_mask) -> (h, positions, key_mask)   drops the tokens decided after layer i-1
    score_rows(i, positions, key_mask)      -> None | (row_idx [B, R], row_valid [B, R])
    on_scores(i, key_mass [B, S], positions, key_mask)                   decides what is dropped after layer i

Every decision is a plain tensor, per sample, so another executor can apply the same plan:
    plan.score_layers        layers whose attention scores the plan needs (sorted)
    plan.prune_layers        layers AFTER which tokens may be dropped (sorted)
    plan.keep_visual[l]      bool [B, n_vis] (host): visual slots kept after layer l (slot = original position - 1)
    plan.kept_positions[i]   long [B, S_i] (device): original positions of the tokens entering layer i (for i
                             after a prune; padding where plan.kept_mask[i] is False; kept_mask None = no padding)
The decisions are made on the host from [B, 512] tensors: per forward the device sees one copy of the key
mass per score layer back to the host (the plan's only syncs) and, per prune, one pinned, non-blocking index
copy and a gather. The plan relies on the layout every executor keeps: per sample
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

import torch

from . import dynamic as dyn
from .config import DynamicConfig, LayerSchedule, StaticConfig
from .flops import backbone_flops
from .scores import query_window, window_rows
from .static import CHANGED, GLOBAL, LOCAL, changed_with_cap, rule_codes, static_keep, topk_per_camera


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


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> executor device without stalling the host: pinned memory + non-blocking copy on CUDA (a pageable
    copy would wait for every kernel queued before it)."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


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
        lens = torch.as_tensor(prompt_lens, dtype=torch.long).cpu()
        B = self.B = len(lens)
        self.static_layers = tuple(schedule.static_layers) if static is not None else ()
        self.dynamic_layers = tuple(schedule.dynamic_layers) if dynamic is not None else ()
        self.importance_layers = tuple(schedule.score_layers) if dynamic is not None else ()
        self.score_layers = sorted(set(self.static_layers) | set(self.importance_layers))
        self.prune_layers = sorted(set(self.static_layers) | set(self.dynamic_layers))

        def host(x, dtype, shape):
            return torch.zeros(shape, dtype=dtype) if x is None else torch.as_tensor(x).cpu().to(dtype).reshape(shape)

        self.k_local = host(k_local, torch.long, (B, C))
        self.similarity = None if similarity is None else host(similarity, torch.float64, (B, n_vis))
        self.max_static = host(max_static, torch.long, (B, C))
        self.changed = torch.zeros(B, n_vis, dtype=torch.bool)  # the changed rule's set at the latest stage
        self.global_prev = host(global_prev, torch.bool, (B, n_vis))
        self.global_k = torch.tensor(static.global_topk if static is not None else (0,) * C).expand(B, C)
        # Sequence layout of sample b, always: [BOS] [present visual tokens, ascending] [nv_count[b] non-visual]
        self.nv_count = lens + dims.num_tail  # proprio + prompt[1:] + placeholders + stop
        # score query rows as original positions; index in the current sequence = position - visual dropped
        q_lo, q_hi = query_window(lens, n_vis, static.query_skip if static is not None else 0)
        self.q_lo, self.q_count = q_lo, q_hi - q_lo + 1
        self.r_prompt = int(self.q_count.max()) if B else 0
        self.r_nonvis = int(self.nv_count.max()) if B else 0

        # per-forward state and records (host)
        L = dims.num_layers
        self.present_vis = torch.ones(B, n_vis, dtype=torch.bool)  # visual slots still in the sequence
        self.importance = torch.zeros(B, n_vis)
        self.local_union = torch.zeros(B, n_vis, dtype=torch.bool)
        self.rules = torch.zeros(B, n_vis, dtype=torch.uint8)
        self.dropped_after = torch.full((B, n_vis), -1, dtype=torch.long)
        self.global_next = torch.zeros(B, n_vis, dtype=torch.bool)
        self.keep_visual: dict[int, torch.Tensor] = {}
        self.kept_positions: dict[int, torch.Tensor] = {}  # (on the executor's device)
        self.kept_mask: dict[int, torch.Tensor | None] = {}
        self.visual_scores: dict[int, torch.Tensor] = {}  # layer -> [B, n_vis] fp32 (-inf = absent)
        self._tokens: list[torch.Tensor | None] = [None] * L  # [B] tokens entering layer i
        self._visual: list[torch.Tensor | None] = [None] * L  # [B, C] visual tokens per camera entering layer i
        self._rows: list[torch.Tensor | None] = [None] * L  # [B] score rows used at layer i

    # ------------------------------------------------------------------ hook protocol
    def before_layer(self, i, h, positions, key_mask):
        prev = i - 1
        if prev in self.dynamic_layers:
            self.keep_visual[prev] = dyn.dynamic_keep(self.importance, self.present_vis, self.dynamic.keep_ratio,
                                                      self.dynamic.min_visual)
        if prev in self.prune_layers:
            h, positions, key_mask = self._apply(prev, h, positions, key_mask)
            self.kept_positions[i], self.kept_mask[i] = positions, key_mask
        if i == 0 or prev in self.prune_layers:
            self._visual[i] = self.present_vis.view(self.B, self.dims.num_images, -1).sum(2)
            self._tokens[i] = 1 + self.present_vis.sum(1) + self.nv_count
        else:
            self._visual[i], self._tokens[i] = self._visual[i - 1], self._tokens[i - 1]
        return h, positions, key_mask

    def score_rows(self, i, positions, key_mask):
        if i in self.static_layers:
            start, count, R = self.q_lo, self.q_count, self.r_prompt
        elif i in self.importance_layers:
            start, count, R = torch.full_like(self.q_lo, self.dims.n_vis + 1), self.nv_count, self.r_nonvis
        else:
            return None
        start = start - (self.dims.n_vis - self.present_vis.sum(1))  # minus the visual tokens dropped so far
        self._rows[i] = count
        idx, valid = window_rows(start, count, R)
        return to_device(idx, positions.device), to_device(valid, positions.device)

    def on_scores(self, i, key_mass, positions, key_mask):
        n_vis, C = self.dims.n_vis, self.dims.num_images
        mass = key_mass.float().cpu()  # [B, S]: the visual tokens sit at 1 .. n_present, ascending slots
        n_present = self.present_vis.sum(1)
        R = int(n_present.max())
        valid = torch.arange(R)[None] < n_present[:, None]
        scores = torch.full((self.B, n_vis), float("-inf"))
        scores[self.present_vis] = mass[:, 1:1 + R][valid]
        self.visual_scores[i] = scores
        if i in self.importance_layers:
            d = self.dynamic
            w = dyn.layer_weight(i, self.dims.num_layers, d.depth_sharpness)
            self.importance = dyn.update_importance(self.importance, scores, self.present_vis, C, alpha=d.ema_alpha,
                                                    weight=w, w_max=d.rank_weight_max, w_min=d.rank_weight_min)
        if i in self.static_layers:
            self._static_stage(i, scores, self.present_vis)

    # ------------------------------------------------------------------ decisions
    def _static_stage(self, i, scores, pres):
        C = self.dims.num_images
        last = i == self.static_layers[-1]
        top_k = topk_per_camera(scores, self.k_local, C)
        if last:
            self.local_union |= top_k
            local = self.local_union
        else:  # speculative stage: a wider candidate set now, refined at the next scoring layer
            local = topk_per_camera(scores, self.k_local * self.static.first_factor, C) | self.local_union
            self.local_union |= top_k
        if self.similarity is not None:
            self.changed = changed_with_cap(self.similarity, scores, self.static.changed.sim_threshold,
                                            self.max_static, C)
        keep = static_keep(pres, self.changed, self.global_prev, local)
        self.keep_visual[i] = keep
        if last:
            self.rules = torch.where(keep, rule_codes(self.changed, self.global_prev, local),
                                     torch.zeros_like(self.rules))
            self.global_next = topk_per_camera(scores, self.global_k, C)

    def _apply(self, layer, h, positions, key_mask):
        """Drops the visual tokens not in keep_visual[layer] (one gather on the device); records their fate."""
        before = self.present_vis
        keep_vis = self.keep_visual[layer] & before
        if torch.equal(keep_vis, before):
            return h, positions, key_mask
        self.dropped_after.masked_fill_(before & ~keep_vis, layer)
        self.present_vis = keep_vis
        cur = before.long().cumsum(1)  # current index of each present visual slot (BOS is index 0)
        n_before, counts = before.sum(1), 1 + keep_vis.sum(1) + self.nv_count
        B, S_new = self.B, int(counts.max())
        order = torch.zeros(B, S_new, dtype=torch.long)  # [B, S']: current index of every kept token, in order
        for b in range(B):
            nv = torch.arange(1 + int(n_before[b]), 1 + int(n_before[b]) + int(self.nv_count[b]))
            row = torch.cat([torch.zeros(1, dtype=torch.long), cur[b][keep_vis[b]], nv])
            order[b, :row.shape[0]] = row
        order = to_device(order, h.device)
        h = torch.gather(h, 1, order[..., None].expand(B, S_new, h.shape[2]))
        positions = torch.gather(positions, 1, order)
        key_mask = None if int(counts.min()) == S_new else \
            to_device(torch.arange(S_new)[None] < counts[:, None], h.device)
        return h, positions, key_mask

    # ------------------------------------------------------------------ results
    def summary(self) -> list[dict[str, Any]]:
        """Per sample: token counts per layer and camera, rules, fates, FLOPs (python / numpy values)."""
        L, D, C = self.dims.num_layers, self.dims.hidden, self.dims.num_images
        if any(t is None for t in self._tokens):
            raise RuntimeError("summary() before the forward pass went through every layer")
        tokens = torch.stack(self._tokens, 1).numpy()  # [B, L]
        visual = torch.stack(self._visual, 1).numpy()  # [B, L, C]
        zero = torch.zeros(self.B, dtype=torch.long)
        rows = torch.stack([r if r is not None else zero for r in self._rows], 1).numpy()  # [B, L]
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

