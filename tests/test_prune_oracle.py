"""The numpy plan makes exactly the decisions of the pre-port torch plan (the oracle at the end of this file).

Both plans are driven by the same minimal executor with the same key mass, given per ORIGINAL position (so the
mass a token receives does not depend on which plan dropped what), over many random cases: batch 1 / 3 / 8,
ragged prompts (some shorter than query_skip), tie-heavy key mass (a few levels, or all equal), similarity
with many exact 1.0s and values at the threshold, random K / caps / history, coarse and fine budgets per
sample, the 8-layer and the 32-layer schedules, and each part switched off. Everything the plan records must
be identical: keep sets, gather inputs (score rows, kept positions, masks, h), rules, fates, history,
importance and visual scores bit for bit, summary().
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from vla_accel._device import to_device_async as to_device
from vla_accel.model.llama import keep_tokens, score_rows_on
from vla_accel.prune.config import DynamicConfig, LayerSchedule, StaticConfig
from vla_accel.prune.flops import backbone_flops
from vla_accel.prune.plan import Dims, PrunePlan
from vla_accel.prune.static import CHANGED, GLOBAL, LOCAL, descending_order

from test_prune_model import specprune_cfg

SCHEDULES = {  # num_layers -> schedule (the configured ones: tiny 8-layer and 7B 32-layer)
    8: LayerSchedule(static_layers=(0, 1), score_layers=(0, 1, 3), dynamic_layers=(2, 3, 4, 5, 6)),
    32: LayerSchedule(static_layers=(0, 1), score_layers=(0, 1, 12), dynamic_layers=(5, 10, 15, 20, 25)),
}
VARIANTS = ["full", "static_only", "dynamic_only", "no_changed"]


def make_case(seed: int, B: int, layers: int, variant: str):
    g = torch.Generator().manual_seed(seed)
    cfg = specprune_cfg()
    static, dynamic = cfg.static, cfg.dynamic
    if variant == "static_only":
        dynamic = None
    if variant == "dynamic_only":
        static = None
    lens = torch.randint(3, 40, (B,), generator=g)  # query_skip 9: some prompts too short for it
    fine = torch.rand(B, generator=g) < 0.5  # per sample: coarse or fine budgets, or random ones
    rand_k = torch.rand(B, generator=g) < 0.3
    k_local = torch.where(fine[:, None], torch.tensor([cfg.static.topk_fine]), torch.tensor([cfg.static.topk]))
    k_local = torch.where(rand_k[:, None], torch.randint(0, 86, (B, 2), generator=g), k_local)
    max_static = torch.where(fine[:, None], torch.tensor([cfg.static.changed.max_static_fine]),
                             torch.tensor([cfg.static.changed.max_static]))
    max_static = torch.where(rand_k[:, None], torch.randint(0, 257, (B, 2), generator=g), max_static)
    # similarity: mostly identical patches (exactly 1.0), some at / around the threshold, some changed
    u = torch.rand(B, 512, generator=g)
    levels = torch.tensor([0.986, 0.9859, 0.99, 0.995, 0.2])
    sim = torch.where(u < 0.7, torch.tensor(1.0), levels[torch.randint(0, 5, (B, 512), generator=g)])
    sim = torch.where(u > 0.95, torch.rand(B, 512, generator=g), sim).double()
    similarity = None if variant == "no_changed" else sim
    global_prev = torch.rand(B, 512, generator=g) < 0.05 * (seed % 3)
    # key mass per (layer, sample, original position): a few levels -> many ties; levels 1: all equal
    n_levels = [1, 2, 3, 7, 1000][seed % 5]
    S_full = int(lens.max()) + 512 + 1 + 57
    table = torch.randint(0, n_levels, (layers, B, S_full), generator=g).float() / n_levels
    dims = Dims(num_layers=layers, hidden=16, intermediate=32)
    kw = dict(static=static, dynamic=dynamic, prompt_lens=lens, k_local=k_local, similarity=similarity,
              max_static=max_static, global_prev=global_prev)
    return dims, SCHEDULES[layers], kw, lens, table


def drive(plan, dims: Dims, lens, table) -> list[dict[str, Any]]:
    """A minimal executor on the padded layout (h carries each token's position) -> what it ran at every layer:
    the oracle through its hook protocol, the plan through PruneDecisions applied as the reference applies them."""
    B = len(lens)
    total = lens + dims.n_vis + 1 + dims.num_tail
    S = int(total.max())
    positions = torch.arange(S)[None].expand(B, S)
    key_mask = positions < total[:, None]
    h = positions[..., None].float().expand(B, S, 3).clone()
    seen = []
    for i in range(dims.num_layers):
        if isinstance(plan, OraclePlan):
            h, positions, key_mask = plan.before_layer(i, h, positions, key_mask)
            rows = plan.score_rows(i, positions, key_mask)
        else:
            keep = plan.keep(i)
            if keep is not None:
                h, positions, key_mask = keep_tokens(h, keep)
            rows = plan.rows(i)
            rows = None if rows is None else score_rows_on(rows, h.device)
        seen.append({"h": h, "positions": positions, "key_mask": key_mask, "rows": rows})
        if rows is not None:
            mass = table[i].gather(1, positions)
            mass = mass if key_mask is None else mass * key_mask
            if isinstance(plan, OraclePlan):
                plan.on_scores(i, mass, positions, key_mask)
            else:
                plan.scores(i, mass)
    return seen


def assert_same(a, b, what):
    """Equal values AND types: tensors (dtype, device, shape, bits), numpy arrays, python values, containers."""
    assert type(a) is type(b), (what, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.device == b.device and a.shape == b.shape, (what, a.dtype, b.dtype)
        assert torch.equal(a, b), what
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), what
    elif isinstance(a, dict):
        assert sorted(a) == sorted(b), (what, sorted(a), sorted(b))
        for k in a:
            assert_same(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}[{k}]")
    else:
        assert a == b, (what, a, b)


CASES = [(seed, B, layers, variant) for seed, (B, layers, variant) in enumerate(
    [(B, layers, v) for B in (1, 3, 8) for layers in (8, 32) for v in VARIANTS] * 3)]


@pytest.mark.parametrize("seed,B,layers,variant", CASES)
def test_plan_equals_the_pre_port_oracle(seed, B, layers, variant):
    dims, sched, kw, lens, table = make_case(seed, B, layers, variant)
    new, old = PrunePlan(dims, sched, **kw), OraclePlan(dims, sched, **kw)
    seen_new, seen_old = drive(new, dims, lens, table), drive(old, dims, lens, table)
    assert_same(seen_new, seen_old, "executor inputs")  # h, positions, key_mask, score rows at every layer
    for name in ("score_layers", "prune_layers", "keep_visual", "rules", "dropped_after", "global_next", "changed",
                 "k_local", "similarity", "max_static", "global_prev", "importance", "visual_scores", "host_reads"):
        assert_same(getattr(new, name), getattr(old, name), name)
    # the oracle records the tokens after every prune layer, the plan only where some were dropped (else the tokens
    # entering the layer are those of the latest Keep)
    assert set(new.kept) <= set(old.kept_positions)
    for i, pos in old.kept_positions.items():
        if not any(j <= i for j in new.kept):  # nothing dropped yet: the oracle kept every token
            assert old.kept_mask[i] is None and torch.equal(pos[0], torch.arange(pos.shape[1])), f"kept[{i}]"
            continue
        k = new.kept[max(j for j in new.kept if j <= i)]
        assert_same((torch.from_numpy(k.positions), None if k.uniform else torch.from_numpy(k.valid)),
                    (pos, old.kept_mask[i]), f"kept[{i}]")
    assert_same(new.summary(), old.summary(), "summary")
    assert any(s["tokens_kept"] < s["tokens_full"] for s in new.summary())  # it pruned (else it proves little)
@pytest.mark.parametrize("shape", [(1, 2, 256), (8, 2, 256), (3, 512), (2, 7)])
def test_descending_order_is_torchs_stable_sort(shape):
    """Ties (few levels), -0.0 next to 0.0, negatives, +-inf, denormals: the order of torch's stable sort."""
    g = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    pool = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, -1e-45, 3.4e38, float("inf"), float("-inf")])
    x = pool[torch.randint(0, len(pool), shape, generator=g)]
    want = torch.sort(x, dim=-1, descending=True, stable=True).indices
    assert np.array_equal(descending_order(x.numpy()), want.numpy())


# ==================================================================================== the oracle
# The pre-port implementation (torch ops on host tensors), frozen here as a regression oracle: the decision
# functions of vla_accel/prune/static.py, dynamic.py, scores.py and the PrunePlan class as they were before the
# host path moved to numpy (git HEAD 2f12101). Do not "fix" it: it defines the decisions the plan must keep.


def order_and_ranks(scores: torch.Tensor, n_cams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [B, n_vis] -> (order [B, n_cams, per]: slots of each camera by descending score, ties lower slot
    first (stable sort); rank [B, n_vis] long of each slot within its camera, 0 = highest). One sort: the plan
    computes these once per scoring layer and hands them to every rule that ranks the same scores."""
    B, n_vis = scores.shape
    s = scores.view(B, n_cams, n_vis // n_cams)
    order = torch.sort(s, dim=2, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(2, order, torch.arange(s.shape[2], device=s.device).expand_as(order))
    return order, ranks.view(B, n_vis)


def ranks_per_camera(scores: torch.Tensor, n_cams: int) -> torch.Tensor:
    """scores [B, n_vis] -> rank [B, n_vis] long of each slot within its camera (0 = highest score).

    Ties go to the lower slot (stable sort). Absent tokens should carry -inf so they rank last.
    """
    return order_and_ranks(scores, n_cams)[1]


def topk_per_camera(scores: torch.Tensor, k: torch.Tensor, n_cams: int,
                    ranks: torch.Tensor | None = None) -> torch.Tensor:
    """scores [B, n_vis] (-inf = absent), k [B, n_cams] long -> bool [B, n_vis]: the top k[b, c] present
    slots of camera c (fewer when fewer are present). ranks: `ranks_per_camera(scores, n_cams)` if known."""
    B, n_vis = scores.shape
    per = n_vis // n_cams
    ranks = (ranks_per_camera(scores, n_cams) if ranks is None else ranks).view(B, n_cams, per)
    sel = (ranks < k[:, :, None]) & (scores.view(B, n_cams, per) > float("-inf"))
    return sel.view(B, n_vis)


def changed_with_cap(similarity: torch.Tensor, scores: torch.Tensor, threshold: float, cap: torch.Tensor,
                     n_cams: int, by_score: torch.Tensor | None = None) -> torch.Tensor:
    """-> bool [B, n_vis]: slots kept by the changed rule.

    similarity [B, n_vis] (patch cosine similarity to the earlier frame), scores [B, n_vis] (attention, -inf =
    absent), cap [B, n_cams]: at most cap[b, c] static patches (similarity >= threshold) of camera c may be
    dropped; the n_static - cap others are exempt, chosen by similarity (lowest first), then score (highest).
    by_score: `order_and_ranks(scores, n_cams)[0]` if known.
    """
    B, n_vis = similarity.shape
    sim = similarity.view(B, n_cams, -1)
    static = sim >= threshold
    n_exempt = (static.sum(2) - cap).clamp(min=0)  # [B, C]
    key = torch.where(static, sim, torch.full_like(sim, float("inf")))  # non-static last
    if by_score is None:
        by_score = torch.sort(scores.view(B, n_cams, -1), dim=2, descending=True, stable=True).indices
    by_sim = torch.sort(key.gather(2, by_score), dim=2, stable=True).indices  # stable: score order within ties
    order = by_score.gather(2, by_sim)
    ranks = torch.empty_like(order)
    ranks.scatter_(2, order, torch.arange(order.shape[2]).expand_as(order))
    exempt = static & (ranks < n_exempt[..., None])
    return (~static | exempt).view(B, n_vis)


def rule_codes(changed: torch.Tensor, global_: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """-> uint8 [B, n_vis]: CHANGED | GLOBAL | LOCAL bits of each slot."""
    return (changed.to(torch.uint8) * CHANGED) | (global_.to(torch.uint8) * GLOBAL) | (local.to(torch.uint8) * LOCAL)


def static_keep(present: torch.Tensor, changed: torch.Tensor, global_: torch.Tensor,
                local: torch.Tensor) -> torch.Tensor:
    """-> bool [B, n_vis]: present slots kept by at least one rule."""
    return present & (changed | global_ | local)


def layer_weight(layer: int, num_layers: int, sharpness: float) -> float:
    return 1.0 / (1.0 + math.exp(-sharpness * (num_layers - layer)))


def rank_weights(scores: torch.Tensor, present: torch.Tensor, n_cams: int, w_max: float, w_min: float,
                 ranks: torch.Tensor | None = None) -> torch.Tensor:
    """scores, present [B, n_vis] -> fp32 [B, n_vis] rank weights per camera (0 where absent). ranks: those of
    `where(present, scores, -inf)` per camera, if known (the plan's scores are -inf where absent already)."""
    B, n_vis = scores.shape
    if ranks is None:
        s = torch.where(present, scores, torch.full_like(scores, float("-inf")))
        ranks = ranks_per_camera(s, n_cams)
    ranks = ranks.view(B, n_cams, -1).float()
    n = present.view(B, n_cams, -1).sum(2, keepdim=True).float()  # [B, C, 1]
    w = w_max - (w_max - w_min) * ranks / (n - 1).clamp(min=1)
    return torch.where(present, w.view(B, n_vis), torch.zeros_like(w.view(B, n_vis)))


def update_importance(imp: torch.Tensor, scores: torch.Tensor, present: torch.Tensor, n_cams: int, *,
                      alpha: float, weight: float, w_max: float, w_min: float,
                      ranks: torch.Tensor | None = None) -> torch.Tensor:
    """EMA step of the importance [B, n_vis] for the present slots; absent slots keep their value."""
    target = rank_weights(scores, present, n_cams, w_max, w_min, ranks) * weight
    return torch.where(present, imp + alpha * (target - imp), imp)


def keep_count(n: torch.Tensor, ratio: float, floor: int) -> torch.Tensor:
    """n [B] present visual tokens -> [B] tokens kept: min(n, max(floor, floor(ratio * n)))."""
    k = torch.floor(n.double() * ratio).long()
    return torch.minimum(n, torch.clamp(k, min=floor))


def dynamic_keep(imp: torch.Tensor, present: torch.Tensor, ratio: float, floor: int,
                 n_present: torch.Tensor | None = None) -> torch.Tensor:
    """-> bool [B, n_vis]: the keep_count most important present slots (ties: lower slot first).
    n_present [B]: present.sum(1) if known (the plan keeps these counts on the host)."""
    s = torch.where(present, imp, torch.full_like(imp, float("-inf")))
    ranks = ranks_per_camera(s, 1)
    k = keep_count(present.sum(1) if n_present is None else n_present, ratio, floor)
    return present & (ranks < k[:, None])


def query_window(prompt_lens: torch.Tensor, n_vis: int, skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Original positions [lo, hi] (inclusive, per sample) of the prompt tokens used as score queries:
    prompt tokens `1 + skip .. P - 1` (the trailing 29871 included). A prompt too short for `skip`
    uses all its tokens after BOS."""
    n_after_bos = prompt_lens - 1  # prompt tokens after BOS
    s = torch.where(n_after_bos > skip, torch.full_like(prompt_lens, skip), torch.zeros_like(prompt_lens))
    lo = n_vis + 2 + s
    hi = n_vis + prompt_lens
    return lo, hi


def window_rows(start: torch.Tensor, count: torch.Tensor, R: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows start_b .. start_b + count_b - 1 of each sample -> (row_idx [B, R] long, row_valid [B, R] bool).

    R >= max(count) is given by the caller (known from the prompt lengths: no device sync); surplus entries
    point at row 0 and are invalid.
    """
    r = torch.arange(R, device=start.device)[None]
    valid = r < count[:, None]
    return torch.where(valid, start[:, None] + r, torch.zeros_like(r)), valid


class OraclePlan:

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
        self.n_present = torch.full((B,), n_vis, dtype=torch.long)  # = present_vis.sum(1), kept on the host
        self._importance = torch.zeros(B, n_vis)
        self.local_union = torch.zeros(B, n_vis, dtype=torch.bool)
        self.rules = torch.zeros(B, n_vis, dtype=torch.uint8)
        self.dropped_after = torch.full((B, n_vis), -1, dtype=torch.long)
        self.global_next = torch.zeros(B, n_vis, dtype=torch.bool)
        self.keep_visual: dict[int, torch.Tensor] = {}
        self.kept_positions: dict[int, torch.Tensor] = {}  # (on the executor's device)
        self.kept_mask: dict[int, torch.Tensor | None] = {}
        self._visual_scores: dict[int, torch.Tensor] = {}  # layer -> [B, n_vis] fp32 (-inf = absent)
        self._present_at: list[torch.Tensor | None] = [None] * L  # present_vis entering layer i (summary)
        self._rows: list[torch.Tensor | None] = [None] * L  # [B] score rows used at layer i
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
        buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        buf.copy_(x, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(x.device))
        return buf, ev

    def _flush(self):
        """Folds a pending importance-only score layer into the importance (waits for its copy)."""
        if self._pending is None:
            return
        i, mass, ev, pres, n_present = self._pending
        self._pending = None
        if ev is not None:
            ev.synchronize()
        scores = self._scores(mass, pres, n_present)
        self._visual_scores[i] = scores
        self._update_importance(i, scores, pres, order_and_ranks(scores, self.dims.num_images)[1])

    @property
    def importance(self) -> torch.Tensor:
        self._flush()
        return self._importance

    @property
    def visual_scores(self) -> dict[int, torch.Tensor]:
        self._flush()
        return self._visual_scores

    # ------------------------------------------------------------------ hook protocol
    def before_layer(self, i, h, positions, key_mask):
        prev = i - 1
        if prev in self.dynamic_layers:
            self.keep_visual[prev] = dynamic_keep(self.importance, self.present_vis, self.dynamic.keep_ratio,
                                                      self.dynamic.min_visual, self.n_present)
        if prev in self.prune_layers:
            h, positions, key_mask = self._apply(prev, h, positions, key_mask)
            self.kept_positions[i], self.kept_mask[i] = positions, key_mask
        self._present_at[i] = self.present_vis  # never modified in place: _apply replaces it
        return h, positions, key_mask

    def score_rows(self, i, positions, key_mask):
        if i in self.static_layers:
            start, count, R = self.q_lo, self.q_count, self.r_prompt
        elif i in self.importance_layers:
            start, count, R = torch.full_like(self.q_lo, self.dims.n_vis + 1), self.nv_count, self.r_nonvis
        else:
            return None
        start = start - (self.dims.n_vis - self.n_present)  # minus the visual tokens dropped so far
        self._rows[i] = count
        idx, valid = window_rows(start, count, R)
        return to_device(idx, positions.device), to_device(valid, positions.device)

    def on_scores(self, i, key_mass, positions, key_mask):
        self._flush()  # an earlier importance layer first: the EMA runs in layer order
        pres, n_present = self.present_vis, self.n_present
        if i not in self.static_layers:  # importance only: nothing needs it before the next dynamic cut
            self._pending = (i, *self._read(key_mass, wait=False), pres, n_present)
            return
        scores = self._scores(self._read(key_mass), pres, n_present)
        self._visual_scores[i] = scores
        order, ranks = order_and_ranks(scores, self.dims.num_images)  # one sort for every rule at this layer
        if i in self.importance_layers:
            self._update_importance(i, scores, pres, ranks)
        self._static_stage(i, scores, pres, order, ranks)

    # ------------------------------------------------------------------ decisions
    def _scores(self, mass, pres, n_present):
        """key mass [B, S] (host) -> visual scores [B, n_vis] fp32 by slot (-inf = absent). The visual tokens sit
        at 1 .. n_present, ascending slots."""
        mass = mass.float()
        R = int(n_present.max())
        valid = torch.arange(R)[None] < n_present[:, None]
        scores = torch.full((self.B, self.dims.n_vis), float("-inf"))
        scores[pres] = mass[:, 1:1 + R][valid]
        return scores

    def _update_importance(self, i, scores, pres, ranks):
        """ranks: per camera, of scores (which are -inf where absent, i.e. of where(pres, scores, -inf))."""
        d = self.dynamic
        w = layer_weight(i, self.dims.num_layers, d.depth_sharpness)
        self._importance = update_importance(self._importance, scores, pres, self.dims.num_images,
                                                 alpha=d.ema_alpha, weight=w, w_max=d.rank_weight_max,
                                                 w_min=d.rank_weight_min, ranks=ranks)

    def _static_stage(self, i, scores, pres, order, ranks):
        C = self.dims.num_images
        last = i == self.static_layers[-1]
        top_k = topk_per_camera(scores, self.k_local, C, ranks)
        if last:
            self.local_union |= top_k
            local = self.local_union
        else:  # speculative stage: a wider candidate set now, refined at the next scoring layer
            local = topk_per_camera(scores, self.k_local * self.static.first_factor, C, ranks) | self.local_union
            self.local_union |= top_k
        if self.similarity is not None:
            self.changed = changed_with_cap(self.similarity, scores, self.static.changed.sim_threshold,
                                            self.max_static, C, order)
        keep = static_keep(pres, self.changed, self.global_prev, local)
        self.keep_visual[i] = keep
        if last:
            self.rules = torch.where(keep, rule_codes(self.changed, self.global_prev, local),
                                     torch.zeros_like(self.rules))
            self.global_next = topk_per_camera(scores, self.global_k, C, ranks)

    def _apply(self, layer, h, positions, key_mask):
        """Drops the visual tokens not in keep_visual[layer] (one gather on the device); records their fate."""
        before = self.present_vis
        keep_vis = self.keep_visual[layer] & before
        if torch.equal(keep_vis, before):
            return h, positions, key_mask
        self.dropped_after.masked_fill_(before & ~keep_vis, layer)
        n_before, n_kept = self.n_present, keep_vis.sum(1)
        self.present_vis, self.n_present = keep_vis, n_kept
        counts = 1 + n_kept + self.nv_count
        B, S_new = self.B, int(counts.max())
        # [B, S']: current index of every kept token, in order: BOS (0), the kept visual tokens, the non-visual
        # tokens (they follow the n_before visual tokens present now), then padding (0)
        j = torch.arange(S_new)[None]
        k = n_kept[:, None]
        tail = (j > k) & (j <= k + self.nv_count[:, None])
        order = torch.where(tail, j - k + n_before[:, None], torch.zeros((), dtype=torch.long))
        cur = before.long().cumsum(1)  # current index of each present visual slot (BOS is index 0)
        rows = torch.arange(B)[:, None].expand_as(keep_vis)[keep_vis]
        order[rows, keep_vis.long().cumsum(1)[keep_vis]] = cur[keep_vis]  # the i-th kept slot goes to index i
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
        if any(p is None for p in self._present_at):
            raise RuntimeError("summary() before the forward pass went through every layer")
        self._flush()
        visual_t = torch.stack(self._present_at, 1).view(self.B, L, C, -1).sum(3)  # [B, L, C]
        tokens = (1 + visual_t.sum(2) + self.nv_count[:, None]).numpy()  # [B, L]
        visual = visual_t.numpy()
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
