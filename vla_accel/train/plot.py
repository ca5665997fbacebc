"""The loss curve as a PNG, drawn with PIL (no plotting dependency): log-scale y, train and validation."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = (900, 520)
MARGIN = (70, 30, 20, 50)  # left, top, right, bottom
COLORS = {"train": (31, 119, 180), "val": (214, 39, 40)}


def plot_losses(series: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "L1 loss") -> Path:
    """series: name -> [(step, loss), ...] (losses > 0). Writes the PNG and returns its path."""
    img = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(img)
    points = [(s, v) for pts in series.values() for s, v in pts if v > 0]
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 8), title, fill="black")
    if points:
        s_max = max(max(s for s, _ in points), 1)
        lo, hi = math.log10(min(v for _, v in points)), math.log10(max(v for _, v in points))
        lo, hi = math.floor(lo * 2) / 2, math.ceil(hi * 2) / 2 + (0.5 if hi == lo else 0)

        def xy(step, value):
            return (left + (right - left) * step / s_max,
                    bottom - (bottom - top) * (math.log10(value) - lo) / (hi - lo))

        for k in range(int(round((hi - lo) * 2)) + 1):  # y grid every half decade
            y = lo + k / 2
            _, py = xy(0, 10 ** y)
            draw.line([left, py, right, py], fill=(225, 225, 225))
            draw.text((6, py - 6), f"{10 ** y:.3g}", fill="black")
        for k in range(6):  # x ticks
            step = round(s_max * k / 5)
            px, _ = xy(step, 10 ** lo)
            draw.text((px - 10, bottom + 6), str(step), fill="black")
        for i, (name, pts) in enumerate(series.items()):
            pts = [xy(s, v) for s, v in pts if v > 0]
            color = COLORS.get(name, (44, 160, 44))
            if len(pts) > 1:
                draw.line(pts, fill=color, width=2)
            for px, py in pts if len(pts) < 60 else []:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
            draw.text((right - 120, top + 8 + 14 * i), name, fill=color)
    draw.text(((left + right) // 2 - 15, SIZE[1] - 20), "step", fill="black")
    path = Path(path)
    img.save(path)
    return path
