"""Static (action-level) pruning: the visual tokens that enter the deep layers.

keep = changed ∪ global ∪ local, per camera, decided once per inference:
  changed  patches that moved since an earlier frame (similarity from `changed.py`); where a camera has
           more static patches than the cap on static drops, the surplus stays too: the least similar
           first, ties (identical patches) going to the most attended at this scoring layer,
  global   the previous inference's most attended tokens (history),
  local    top-K by prompt -> visual attention at the scoring layers of THIS inference (self-speculative:
           first_factor * K after the first scoring layer, refined to K after the last).
Every tensor here is [B, n_vis] over visual slots (camera c owns slots c*256 .. c*256+255).
"""

from __future__ import annotations

import torch

# Rule bits recorded per visual token (a token may be kept by several rules).
CHANGED, GLOBAL, LOCAL = 1, 2, 4
RULE_NAMES = {CHANGED: "changed", GLOBAL: "global", LOCAL: "local"}


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


def topk_per_camera(scores: torch.Tensor, k: torch.Tensor, n_cams: int, ranks: torch.Tensor | None = None) -> torch.Tensor:
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
