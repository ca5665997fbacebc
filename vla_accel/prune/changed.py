"""Changed-patch detection: which 14x14 patches of the 224x224 model-input image moved since an earlier frame.

    sim = patch_similarity(cur, prev)                        # [256] cosine similarity of raw uint8 patches
    T = frame_gap(np.linalg.norm(summed_xyz), gap_min=1, gap_max=6)

Both images are the model inputs (after `vla_accel.processing.prepare_image`), one camera at a time;
patch p covers rows 14*(p // 16) .. +14 and columns 14*(p % 16) .. +14, the ViT's patch order.
A patch with similarity >= the threshold is static and MAY be dropped, at most a capped number per camera
(the cap and its tie-break by attention live in `static.changed_with_cap`, applied at the scoring layers).
"""

from __future__ import annotations

import numpy as np

# Adaptive frame gap of the public SpecPrune-VLA code: T = int(GAP_SLOPE * s + GAP_OFFSET) + 3, where s is
# the norm of the xyz actions executed since the last query (large motion -> compare with a closer frame).
GAP_SLOPE = -16.0 / 3.0 / 6.0
GAP_OFFSET = 22.0 / 3.0


def patchify(img: np.ndarray, patch: int = 14) -> np.ndarray:
    """uint8 [H, W, C] -> float64 [(H/patch) * (W/patch), patch * patch * C], row-major patch order."""
    H, W, C = img.shape
    if H % patch or W % patch:
        raise ValueError(f"image {H}x{W} is not a whole number of {patch}x{patch} patches")
    x = img.astype(np.float64).reshape(H // patch, patch, W // patch, patch, C)
    return x.transpose(0, 2, 1, 3, 4).reshape((H // patch) * (W // patch), patch * patch * C)


def patch_similarity(cur: np.ndarray, prev: np.ndarray, patch: int = 14) -> np.ndarray:
    """Cosine similarity per patch of two images of the same shape -> float64 [num_patches].

    Identical patches (two black ones included) give exactly 1.0; an all-zero patch against another gives 0.
    """
    if cur.shape != prev.shape:
        raise ValueError(f"frames differ in shape: {cur.shape} vs {prev.shape}")
    a, b = patchify(cur, patch), patchify(prev, patch)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(1)
    sim = np.clip(dot / np.maximum(na * nb, 1e-12), -1.0, 1.0)
    sim[(a == b).all(1)] = 1.0  # identical patches exactly 1 (rounding would make ties arbitrary), black ones too
    return sim


def frame_gap(moved: float, gap_min: int = 1, gap_max: int = 6) -> int:
    """Frame gap T from the distance moved since the last query (reference rule, clamped to [gap_min, gap_max]).

    The compared frame is the T-th most recent one counting the current frame as the 1st
    (the reference's `replay_images[-T]`): T = 1 is the frame itself, T = 6 the frame 5 steps earlier.
    """
    t = int(GAP_SLOPE * float(moved) + GAP_OFFSET) + 3
    return max(gap_min, min(gap_max, t))
