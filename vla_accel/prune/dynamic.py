"""Dynamic (layer-level) pruning: importance of visual tokens, updated at a few layers, cuts at deeper ones.

At a score layer l, per camera, the present visual tokens are ranked by the attention the non-visual
tokens pay them; rank r of n gets weight w = max - (max - min) * r / (n - 1) (linear, like the reference's
linspace(10, 0.1, n)), times the layer weight sigmoid(sharpness * (L - l)); the importance follows an EMA:
    imp <- imp + alpha * (w * layer_weight - imp)
At a dynamic layer, floor(keep_ratio * n) of the n present visual tokens survive (both cameras ranked
together by importance), never fewer than `min_visual` (and never more than are present).
Host math in numpy, like static.py (array-likes in, numpy out; the importance is float32 throughout, as the
ranking depends on its rounding).
"""

from __future__ import annotations

import math

import numpy as np

from .static import descending_order, ranks_per_camera


def layer_weight(layer: int, num_layers: int, sharpness: float) -> float:
    return 1.0 / (1.0 + math.exp(-sharpness * (num_layers - layer)))


def rank_weights(scores, present, n_cams: int, w_max: float, w_min: float,
                 ranks: np.ndarray | None = None) -> np.ndarray:
    """scores float32, present [B, n_vis] -> float32 [B, n_vis] rank weights per camera (0 where absent). ranks:
    those of `where(present, scores, -inf)` per camera, if known (the plan's scores are -inf where absent already)."""
    scores, present = np.asarray(scores), np.asarray(present)
    B, n_vis = scores.shape
    if ranks is None:
        ranks = ranks_per_camera(np.where(present, scores, np.float32(-np.inf)), n_cams)
    ranks = ranks.reshape(B, n_cams, -1).astype(np.float32)
    n = present.reshape(B, n_cams, -1).sum(2, keepdims=True).astype(np.float32)  # [B, C, 1]
    w = w_max - (w_max - w_min) * ranks / np.maximum(n - 1, 1)  # float32 throughout (python scalars are weak)
    return np.where(present, w.reshape(B, n_vis), np.float32(0))


def update_importance(imp, scores, present, n_cams: int, *, alpha: float, weight: float, w_max: float,
                      w_min: float, ranks: np.ndarray | None = None) -> np.ndarray:
    """EMA step of the importance float32 [B, n_vis] for the present slots; absent slots keep their value."""
    imp, present = np.asarray(imp), np.asarray(present)
    target = rank_weights(scores, present, n_cams, w_max, w_min, ranks) * weight
    return np.where(present, imp + alpha * (target - imp), imp)


def keep_count(n, ratio: float, floor: int) -> np.ndarray:
    """n [B] present visual tokens -> [B] tokens kept: min(n, max(floor, floor(ratio * n)))."""
    n = np.asarray(n)
    k = np.floor(n.astype(np.float64) * ratio).astype(np.int64)
    return np.minimum(n, np.maximum(k, floor))


def dynamic_keep(imp, present, ratio: float, floor: int, n_present=None) -> np.ndarray:
    """-> bool [B, n_vis]: the keep_count most important present slots (ties: lower slot first).
    n_present [B]: present.sum(1) if known (the plan keeps these counts on the host)."""
    imp, present = np.asarray(imp), np.asarray(present)
    B, n_vis = present.shape
    order = descending_order(np.where(present, imp, np.float32(-np.inf)))
    k = keep_count(present.sum(1) if n_present is None else n_present, ratio, floor)
    keep = np.empty_like(present)
    keep[np.arange(B)[:, None], order] = np.arange(n_vis) < k[:, None]  # the first k of each row's order
    return present & keep
