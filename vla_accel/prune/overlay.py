"""Pictures of a pruning decision: the model-input images with every patch's fate.

    img = overlay_pair(images [2, 224, 224, 3], rules [512], dropped_after [512], static_layers)
    save_png(path, img)

Per 14x14 patch:
  kept to the last layer     tinted by the rule that kept it: local = green, global = orange, changed = blue
                             (a patch kept by several rules shows the first of local, global, changed), outlined
  dropped at a deeper layer  (dynamic pruning) tinted grey, half dimmed
  dropped after the static   dimmed to a third
  layers
With static pruning off, kept patches are outlined white.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .static import CHANGED, GLOBAL, LOCAL

COLORS = {LOCAL: (46, 204, 113), GLOBAL: (243, 156, 18), CHANGED: (52, 152, 219)}
DYNAMIC_GREY = (150, 150, 150)
LEGEND = "green local | orange global | blue changed | grey dropped deeper | dark dropped early"


def overlay_image(img: np.ndarray, rules: np.ndarray, dropped_after: np.ndarray, static_layers: Sequence[int],
                  patch: int = 14, alpha: float = 0.45) -> np.ndarray:
    """img uint8 [H, W, 3]; rules uint8 [N] (rule bits, static.py); dropped_after int [N] (-1 = kept to the end,
    l = dropped after layer l); N = (H/patch) * (W/patch) -> uint8 [H, W, 3]."""
    H, W, _ = img.shape
    gw = W // patch
    if rules.shape[0] != (H // patch) * gw:
        raise ValueError(f"{rules.shape[0]} patch entries for a {H}x{W} image of {patch}px patches")
    out = img.astype(np.float32).copy()
    edges = []
    for p in range(rules.shape[0]):
        r, c = divmod(p, gw)
        ys, xs = slice(r * patch, (r + 1) * patch), slice(c * patch, (c + 1) * patch)
        fate = int(dropped_after[p])
        if fate == -1:
            code = int(rules[p])
            color = next((COLORS[bit] for bit in (LOCAL, GLOBAL, CHANGED) if code & bit), None)
            if color is not None:
                out[ys, xs] = (1 - alpha) * out[ys, xs] + alpha * np.array(color, np.float32)
            edges.append((c * patch, r * patch, color or (255, 255, 255)))
        elif fate in static_layers:
            out[ys, xs] *= 0.33
        else:
            out[ys, xs] = 0.5 * ((1 - alpha) * out[ys, xs] + alpha * np.array(DYNAMIC_GREY, np.float32))
    pil = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for x, y, color in edges:
        draw.rectangle([x, y, x + patch - 1, y + patch - 1], outline=color)
    return np.asarray(pil)


def overlay_pair(images: np.ndarray, rules: np.ndarray, dropped_after: np.ndarray, static_layers: Sequence[int],
                 patch: int = 14, caption: str = "", gap: int = 4, scale: int = 2) -> np.ndarray:
    """Both cameras side by side (third-person | wrist), each `scale` times enlarged (nearest), with a caption
    strip of kept counts and the legend."""
    n = images.shape[0]
    per = rules.shape[0] // n
    panels = [overlay_image(images[c], rules[c * per:(c + 1) * per], dropped_after[c * per:(c + 1) * per],
                            static_layers, patch).repeat(scale, 0).repeat(scale, 1) for c in range(n)]
    H, W, _ = panels[0].shape
    strip = 30
    canvas = np.full((H + strip, n * W + (n - 1) * gap, 3), 255, dtype=np.uint8)
    for c, panel in enumerate(panels):
        canvas[:H, c * (W + gap):c * (W + gap) + W] = panel
    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    kept = [int((dropped_after[c * per:(c + 1) * per] == -1).sum()) for c in range(n)]
    text = f"kept {' / '.join(f'{k}/{per}' for k in kept)}  {caption}".strip()
    draw.text((4, H + 2), text, fill=(0, 0, 0))
    draw.text((4, H + 15), LEGEND, fill=(80, 80, 80))
    return np.asarray(pil)


def save_png(path: str | Path, img: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path
