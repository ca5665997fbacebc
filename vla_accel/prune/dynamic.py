"""Dynamic (layer-level) pruning: importance of visual tokens, updated at a few layers, cuts at deeper ones.

At a score layer l, per camera, the present visual tokens are ranked by the attention the non-visual
tokens pay them; rank r of n gets weight w = max - (max - min) * r / (n - 1) (linear, like the reference's
linspace(10, 0.1, n)), times the layer weight sigmoid(sharpness * (L - l)); the importance follows an EMA:
    imp <- imp + alpha * (w * layer_weight - imp)
At a dynamic layer, floor(keep_ratio * n) of the n present visual tokens survive (both cameras ranked
together by importance), never fewer than `min_visual` (and never more than are present).
"""

from __future__ import annotations

import math

import torch

from .static import ranks_per_camera


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
