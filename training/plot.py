"""The loss curve as a PNG, drawn with Pillow (no plotting library needed on a training box)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["draw_loss_curve"]

_SIZE = (900, 500)
_MARGIN = (70, 30, 30, 50)  # left, top, right, bottom
_TRAIN, _VAL, _GRID, _INK = (31, 119, 180), (214, 39, 40), (225, 225, 225), (40, 40, 40)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    span = (high - low) or 1.0
    raw = span / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if raw <= m * step)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def draw_loss_curve(train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]], path: str | Path,
                    title: str = "sigmoid loss") -> Path:  # fmt: skip
    """Training loss per logged step (line) and validation loss per epoch (dots), vs step.

    Non-finite values are left out. Returns the path written.
    """
    train = [(s, v) for s, v in train if math.isfinite(v)]
    val = [(s, v) for s, v in val if math.isfinite(v)]
    image = Image.new("RGB", _SIZE, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, top, right, bottom = _MARGIN
    width, height = _SIZE[0] - left - right, _SIZE[1] - top - bottom
    points = train + val
    if points:
        x_max = max(s for s, _ in points) or 1
        y_low, y_high = min(v for _, v in points), max(v for _, v in points)
        pad = (y_high - y_low) * 0.05 or 0.5
        y_low, y_high = y_low - pad, y_high + pad

        def xy(step: float, value: float) -> tuple[float, float]:
            return left + width * step / x_max, top + height * (1 - (value - y_low) / (y_high - y_low))

        for tick in _ticks(y_low, y_high):
            y = xy(0, tick)[1]
            draw.line([(left, y), (left + width, y)], fill=_GRID)
            draw.text((left - 8, y), f"{tick:.3g}", fill=_INK, font=font, anchor="rm")
        for tick in _ticks(0, x_max):
            x = xy(tick, y_low)[0]
            draw.line([(x, top), (x, top + height)], fill=_GRID)
            draw.text((x, top + height + 6), f"{tick:g}", fill=_INK, font=font, anchor="mt")
        if len(train) > 1:
            draw.line([xy(s, v) for s, v in train], fill=_TRAIN, width=2)
        for s, v in val:
            x, y = xy(s, v)
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=_VAL)
    draw.rectangle([left, top, left + width, top + height], outline=_INK)
    draw.text((left + width / 2, _SIZE[1] - 14), "step", fill=_INK, font=font, anchor="mm")
    draw.text((left + 6, top + 6), f"{title}: train (line), validation (dots)", fill=_INK, font=font)
    path = Path(path)
    image.save(path)
    return path
