"""Static (action-level) pruning: the visual tokens that enter the deep layers.

keep = changed ∪ global ∪ local, per camera, decided once per inference:
  changed  patches that moved since an earlier frame (similarity from `changed.py`); where a camera has
           more static patches than the cap on static drops, the surplus stays too: the least similar
           first, ties (identical patches) going to the most attended at this scoring layer,
  global   the previous inference's most attended tokens (history),
  local    top-K by prompt -> visual attention at the scoring layers of THIS inference (self-speculative:
           first_factor * K after the first scoring layer, refined to K after the last).
Every array here is [B, n_vis] over visual slots (camera c owns slots c*256 .. c*256+255). Host math in numpy:
the plan decides from [B, 512] arrays, where a torch CPU op costs more in dispatch than in work. Inputs may be
numpy arrays or CPU tensors (`np.asarray` views them without a copy); results are numpy.
"""

from __future__ import annotations

import numpy as np

# Rule bits recorded per visual token (a token may be kept by several rules).
CHANGED, GLOBAL, LOCAL = 1, 2, 4


def descending_order(x: np.ndarray) -> np.ndarray:
    """x float32 [..., n] -> int64 [..., n]: indices by descending value, ties lower index first (a stable
    descending sort, like torch.sort(descending=True, stable=True); NaN not supported).

    One sort of unique int64 keys (value order in the high 32 bits, index in the low ones) instead of a stable
    argsort: numpy's plain sort of integers is several times faster than its stable argsort of floats."""
    if x.dtype != np.float32:
        raise TypeError(f"descending_order sorts float32, got {x.dtype}")
    bits = (x + np.float32(0)).view(np.int32)  # + 0: -0.0 becomes 0.0 (they tie, as in torch)
    up = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))  # as signed ints: the order of the floats
    key = (~up).astype(np.int64) << 32 | np.arange(x.shape[-1])  # ~: descending
    return np.sort(key, axis=-1) & 0xFFFFFFFF


def ranks_from_order(order: np.ndarray) -> np.ndarray:
    """order [..., n] (a permutation along the last axis) -> its inverse: rank [..., n] of each index."""
    n = order.shape[-1]
    rows = order.reshape(-1, n)
    ranks = np.empty_like(rows)
    ranks[np.arange(len(rows))[:, None], rows] = np.arange(n)
    return ranks.reshape(order.shape)


def ranks_per_camera(scores, n_cams: int) -> np.ndarray:
    """scores float32 [B, n_vis] -> rank [B, n_vis] int64 of each slot within its camera (0 = highest score).

    Ties go to the lower slot. Absent tokens should carry -inf so they rank last. One sort: the plan computes
    these once per scoring layer and hands them to every rule that ranks the same scores.
    """
    scores = np.asarray(scores)
    B, n_vis = scores.shape
    return ranks_from_order(descending_order(scores.reshape(B, n_cams, n_vis // n_cams))).reshape(B, n_vis)


def topk_per_camera(scores, k, n_cams: int, ranks: np.ndarray | None = None) -> np.ndarray:
    """scores [B, n_vis] (-inf = absent), k [B, n_cams] int -> bool [B, n_vis]: the top k[b, c] present
    slots of camera c (fewer when fewer are present). ranks: `ranks_per_camera(scores, n_cams)` if known."""
    scores, k = np.asarray(scores), np.asarray(k)
    B, n_vis = scores.shape
    per = n_vis // n_cams
    ranks = (ranks_per_camera(scores, n_cams) if ranks is None else ranks).reshape(B, n_cams, per)
    sel = (ranks < k[:, :, None]) & (scores.reshape(B, n_cams, per) > -np.inf)
    return sel.reshape(B, n_vis)


def changed_with_cap(similarity, scores, threshold: float, cap, n_cams: int,
                     ranks: np.ndarray | None = None) -> np.ndarray:
    """-> bool [B, n_vis]: slots kept by the changed rule.

    similarity [B, n_vis] (patch cosine similarity to the earlier frame), scores float32 [B, n_vis] (attention,
    -inf = absent), cap [B, n_cams]: at most cap[b, c] static patches (similarity >= threshold) of camera c may
    be dropped; the n_exempt = n_static - cap others are exempt, chosen by similarity (lowest first), then score
    (highest; equal scores: lower slot). ranks: `ranks_per_camera(scores, n_cams)` if known.
    """
    similarity, cap = np.asarray(similarity), np.asarray(cap)
    B, n_vis = similarity.shape
    sim = similarity.reshape(B, n_cams, -1)
    static = sim >= threshold
    n_exempt = np.maximum(static.sum(2) - cap, 0)  # [B, C]
    if not n_exempt.any():  # every static patch may go: no ranking needed
        return ~static.reshape(B, n_vis)
    ranks = (ranks_per_camera(scores, n_cams) if ranks is None else ranks).reshape(sim.shape)
    # v: the n_exempt-th lowest similarity among the static patches; every static patch below v is exempt, and
    # of those AT v the `need` most attended (lowest score ranks; ranks are unique)
    lowest = np.sort(np.where(static, sim, np.inf), axis=2)
    v = np.where(n_exempt > 0, _at(lowest, n_exempt - 1), -np.inf)[..., None]  # [B, C, 1]
    below = static & (sim < v)
    need = n_exempt - below.sum(2)  # [B, C]
    tied_ranks = np.where(static & (sim == v), ranks, sim.shape[2])  # score ranks of the static patches at v
    worst = np.where(need > 0, _at(np.sort(tied_ranks, axis=2), need - 1), -1)[..., None]  # the need-th best
    return (~static | below | (tied_ranks <= worst)).reshape(B, n_vis)


def _at(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """x [B, C, n], k [B, C] int in [-1, n) -> x[b, c, k[b, c]] [B, C] (k = -1: the last; callers mask it)."""
    B, C, n = x.shape
    return x.reshape(B * C, n)[np.arange(B * C), k.ravel()].reshape(B, C)


def rule_codes(changed, global_, local) -> np.ndarray:
    """-> uint8 [B, n_vis]: CHANGED | GLOBAL | LOCAL bits of each slot."""
    u8 = np.uint8
    return (np.asarray(changed).astype(u8) * u8(CHANGED)) | (np.asarray(global_).astype(u8) * u8(GLOBAL)) \
        | (np.asarray(local).astype(u8) * u8(LOCAL))


def static_keep(present, changed, global_, local) -> np.ndarray:
    """-> bool [B, n_vis]: present slots kept by at least one rule."""
    return np.asarray(present) & (np.asarray(changed) | np.asarray(global_) | np.asarray(local))
