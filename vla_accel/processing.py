"""Pre- and post-processing of the OpenVLA-OFT LIBERO evaluation, in numpy/PIL/torch.

Images (uint8 [H, W, 3], upright) ->
  1. JPEG encode/decode (quality 95, as TensorFlow's encode_jpeg default) and Lanczos-3 antialiased
     resize to 224, rounded and clipped to uint8 (PIL's LANCZOS; the reference uses TF's lanczos3:
     same filter, tiny rounding differences),
  2. center crop of 90% of the area (side * sqrt(0.9)) resized back to 224 with bilinear sampling,
     exactly TF's crop_and_resize box semantics, float->uint8 by TF's convert_image_dtype rule,
  3. /255 and per-tower normalization -> 3 channels for DINOv2 + 3 for SigLIP.
Proprio: bounds_q99 normalization. Actions: bounds_q99 un-normalization where the mask is true, then
the gripper: g in [0, 1] -> sign(2g - 1) -> * -1 (the environment uses -1 = open, +1 = close).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ImageNorm:
    """Per-tower mean/std (tower 0 = DINOv2, tower 1 = SigLIP)."""

    means: tuple[tuple[float, float, float], ...] = (IMAGENET_MEAN, SIGLIP_MEAN)
    stds: tuple[tuple[float, float, float], ...] = (IMAGENET_STD, SIGLIP_STD)

    @staticmethod
    def from_preprocessor_config(d: dict) -> "ImageNorm":
        """Reads Prismatic's `preprocessor_config.json` (`means` / `stds`: one triple per tower)."""
        if "means" not in d or "stds" not in d:
            raise ValueError("preprocessor_config.json has no 'means'/'stds' (expected PrismaticImageProcessor)")
        means = tuple(tuple(float(v) for v in m) for m in d["means"])
        stds = tuple(tuple(float(v) for v in s) for s in d["stds"])
        if len(means) != 2 or len(stds) != 2 or any(len(t) != 3 for t in means + stds):
            raise ValueError(f"preprocessor_config.json: expected 2 towers x 3 channels, got means={means} stds={stds}")
        return ImageNorm(means, stds)


def check_image(img, name: str) -> np.ndarray:
    if not isinstance(img, np.ndarray):
        raise TypeError(f"obs['{name}'] must be a numpy array (uint8 [H, W, 3]), got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise TypeError(f"obs['{name}'] must have dtype uint8 (values 0..255), got {img.dtype}")
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 2 or img.shape[1] < 2:
        raise ValueError(f"obs['{name}'] must have shape [H, W, 3], got {tuple(img.shape)}")
    return img


def resize_like_reference(img: np.ndarray, size: int = 224, jpeg: bool = True) -> np.ndarray:
    """JPEG round trip + Lanczos-3 antialiased resize to size x size, uint8 out."""
    pil = Image.fromarray(img)
    if jpeg:
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=95)
        buf.seek(0)
        pil = Image.open(buf).convert("RGB")
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.LANCZOS)
    return np.array(pil, dtype=np.uint8)  # a writable copy


def crop_and_resize(img: np.ndarray, crop_scale: float = 0.9) -> np.ndarray:
    """Center crop of `crop_scale` of the area, bilinearly resized back to the input size.

    Follows tf.image.crop_and_resize: box [y1, x1, y2, x2] in normalized coords; output pixel i samples
    input coordinate y1*(H-1) + i*(y2-y1)*(H-1)/(H_out-1). Result converted like convert_image_dtype:
    floor(clip(x, 0, 1) * 255.5).
    """
    H, W, _ = img.shape
    side = math.sqrt(crop_scale)
    lo = (1 - side) / 2
    hi = lo + side
    x = img.astype(np.float32) / 255.0

    def coords(n):
        c = lo * (n - 1) + np.arange(n, dtype=np.float64) * (hi - lo) * (n - 1) / (n - 1)
        c0 = np.floor(c).astype(np.int64)
        c1 = np.minimum(c0 + 1, n - 1)
        return c0, c1, (c - c0).astype(np.float32)

    y0, y1, wy = coords(H)
    x0, x1, wx = coords(W)
    top = x[y0][:, x0] * (1 - wx)[None, :, None] + x[y0][:, x1] * wx[None, :, None]
    bot = x[y1][:, x0] * (1 - wx)[None, :, None] + x[y1][:, x1] * wx[None, :, None]
    out = top * (1 - wy)[:, None, None] + bot * wy[:, None, None]
    return (np.clip(out, 0.0, 1.0) * 255.5).astype(np.uint8)


def prepare_image(img: np.ndarray, size: int = 224, center_crop: bool = True, jpeg: bool = True) -> np.ndarray:
    """The evaluation's image pipeline up to the model-input uint8 image [224, 224, 3]."""
    img = resize_like_reference(img, size, jpeg)
    return crop_and_resize(img) if center_crop else img


def to_pixel_values(images: list[np.ndarray], norm: ImageNorm) -> torch.Tensor:
    """uint8 [224, 224, 3] images (third-person first, then wrist) -> [6 * n, 224, 224] float32."""
    chans = []
    for img in images:
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0  # [3, H, W]
        for mean, std in zip(norm.means, norm.stds):
            chans.append((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
    return torch.cat(chans, dim=0)


# ------------------------------------------------------------------ proprio / actions
def check_state(state, dim: int = 8) -> np.ndarray:
    s = np.asarray(state, dtype=np.float64)
    if s.shape != (dim,):
        raise ValueError(f"obs['state'] must have shape ({dim},) = eef_pos(3) + axis_angle(3) + gripper_qpos(2), "
                         f"got {s.shape}")
    if not np.all(np.isfinite(s)):
        bad = [i for i in range(dim) if not np.isfinite(s[i])]
        raise ValueError(f"obs['state'] contains NaN/inf at indices {bad}: {s.tolist()}")
    return s


def normalize_proprio(state: np.ndarray, stats: dict) -> np.ndarray:
    """bounds_q99: clip(2 (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1) where the mask is true."""
    q01, q99 = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
    norm = np.where(mask, 2 * (state - q01) / (q99 - q01 + 1e-8) - 1, state)
    return np.clip(norm, -1, 1)


def unnormalize_actions(actions: np.ndarray, stats: dict) -> np.ndarray:
    """actions: [..., 7] in [-1, 1] -> 0.5 (a + 1) (q99 - q01 + 1e-8) + q01 where mask; no clipping."""
    q01, q99 = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
    a = np.asarray(actions, np.float64)
    return np.where(mask, 0.5 * (a + 1) * (q99 - q01 + 1e-8) + q01, a)


def gripper_to_env(actions: np.ndarray) -> np.ndarray:
    """Last dim's gripper g in [0, 1] (0 = close, 1 = open) -> sign(2g - 1) * -1 (env: -1 open, +1 close)."""
    out = np.array(actions, dtype=np.float64, copy=True)
    out[..., -1] = -np.sign(2 * out[..., -1] - 1)
    return out
