"""Training-time image pipeline in torch: random crop (+ optional color jitter) and per-tower normalization.

The OpenVLA-OFT recipe trains on random crops of 90% of the image area (square: scale 0.9, ratio
1, at a uniformly random offset, resized back to 224 with bilinear `crop_and_resize`) and evaluates
on the center crop of the same size (vla_accel.processing.crop_and_resize). Here the crop samples
exactly the coordinates TF's `crop_and_resize` samples and rounds like the evaluation
(floor(clip(x, 0, 1) * 255.5)), so a centered box reproduces the evaluation's image. The recipe
also jitters brightness (+-0.2), contrast and saturation (x0.8-1.2) and hue (+-0.05); that is
`color_jitter=True` here.

    pixels = model_pixels(frames, crop_scale=0.9, generator=g)   # uint8 [B, 2, 224, 224, 3] -> [B, 12, 224, 224]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vla_accel.processing import ImageNorm


def crop_boxes(n: int, scale: float, *, random: bool, generator: torch.Generator | None = None,
               device=None) -> torch.Tensor:
    """[n, 4] normalized boxes (y1, x1, y2, x2) of `scale` of the area: random offsets, or centered."""
    side = math.sqrt(scale)
    if random:
        offset = torch.rand(n, 2, generator=generator, device=device) * (1 - side)
    else:
        offset = torch.full((n, 2), (1 - side) / 2, device=device)
    return torch.cat([offset, offset + side], dim=1)


def crop_and_resize(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] + boxes [N, 4] -> float [N, 3, H, W] in [0, 1], quantized to 1/255 steps.

    Output pixel i samples input coordinate y1 * (H - 1) + i * (y2 - y1) * (H - 1) / (H - 1) (TF's
    crop_and_resize), bilinear; then floor(clip(x, 0, 1) * 255.5) / 255 as the evaluation rounds.
    """
    N, H, W, _ = images.shape
    x = images.permute(0, 3, 1, 2).float() / 255.0
    steps_y = torch.arange(H, device=x.device, dtype=torch.float64) / (H - 1)
    steps_x = torch.arange(W, device=x.device, dtype=torch.float64) / (W - 1)
    b = boxes.double()
    ys = b[:, 0:1] + steps_y[None] * (b[:, 2:3] - b[:, 0:1])  # [N, H] in [0, 1] of the input height
    xs = b[:, 1:2] + steps_x[None] * (b[:, 3:4] - b[:, 1:2])
    # align_corners=True: -1 / +1 are the centres of the first / last input pixel
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :] * 2 - 1, ys[:, :, None] * 2 - 1), dim=-1)
    out = F.grid_sample(x, grid.float(), mode="bilinear", padding_mode="border", align_corners=True)
    return torch.floor(out.clamp(0, 1) * 255.5) / 255.0


def _gray(x: torch.Tensor) -> torch.Tensor:  # [N, 3, H, W] -> [N, 1, H, W]
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def color_jitter(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The OFT recipe's brightness / contrast / saturation / hue jitter on [N, 3, H, W] in [0, 1]."""
    n, dev = x.shape[0], x.device

    def uniform(lo, hi):
        return (lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=generator, device=dev))

    x = (x + uniform(-0.2, 0.2)).clamp(0, 1)  # brightness: additive delta
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * uniform(0.8, 1.2) + mean).clamp(0, 1)  # contrast, per channel mean
    gray = _gray(x)
    x = ((x - gray) * uniform(0.8, 1.2) + gray).clamp(0, 1)  # saturation
    # hue: rotate the chroma plane of YIQ by 2*pi*delta
    angle = uniform(-0.05, 0.05) * 2 * math.pi
    y = _gray(x)
    i = 0.596 * x[:, 0:1] - 0.274 * x[:, 1:2] - 0.322 * x[:, 2:3]
    q = 0.211 * x[:, 0:1] - 0.523 * x[:, 1:2] + 0.312 * x[:, 2:3]
    i, q = i * angle.cos() - q * angle.sin(), i * angle.sin() + q * angle.cos()
    rgb = torch.cat([y + 0.956 * i + 0.621 * q, y - 0.272 * i - 0.647 * q, y - 1.106 * i + 1.703 * q], dim=1)
    return rgb.clamp(0, 1)


def normalize(x: torch.Tensor, norm: ImageNorm) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> [N, 6, H, W]: the DINOv2-normalized then the SigLIP-normalized copy."""
    out = []
    for mean, std in zip(norm.means, norm.stds):
        m = torch.tensor(mean, device=x.device, dtype=x.dtype)[None, :, None, None]
        s = torch.tensor(std, device=x.device, dtype=x.dtype)[None, :, None, None]
        out.append((x - m) / s)
    return torch.cat(out, dim=1)


def model_pixels(frames: torch.Tensor, norm: ImageNorm | None = None, *, crop_scale: float = 0.9,
                 random_crop: bool = True, jitter: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [B, n_img, H, W, 3] pre-crop model images -> pixel_values [B, 6 * n_img, H, W].

    One independent crop (and jitter) per image, as the recipe augments each camera separately.
    """
    B, n_img, H, W, _ = frames.shape
    flat = frames.reshape(B * n_img, H, W, 3)
    boxes = crop_boxes(B * n_img, crop_scale, random=random_crop, generator=generator, device=frames.device)
    x = crop_and_resize(flat, boxes)
    if jitter:
        x = color_jitter(x, generator)
    x = normalize(x, norm or ImageNorm())  # [B * n_img, 6, H, W]
    return x.reshape(B, n_img * 6, H, W)
