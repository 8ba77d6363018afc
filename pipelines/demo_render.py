"""Procedural product photos for the demo catalog.

Each item is drawn from latent attributes (category × shape × colour × pattern ×
material) onto a random background with clutter, pose, scale and lighting, so
similar items are similar in their shapes and textures while the image's mean
colour is dominated by the background and says little.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["CATEGORIES", "COLOURS", "MATERIALS", "PATTERNS", "SHAPES", "ItemAttributes", "render_item"]

CATEGORIES = ("mug", "bottle", "vase", "lamp", "backpack", "sneaker", "chair", "clock")
SHAPES = ("round", "square", "tall", "wide")
COLOURS = {
    "red": (200, 30, 35),
    "orange": (240, 130, 20),
    "yellow": (240, 210, 40),
    "green": (40, 150, 60),
    "teal": (20, 150, 150),
    "blue": (35, 70, 200),
    "purple": (120, 50, 170),
    "pink": (240, 120, 170),
    "black": (30, 30, 30),
    "white": (235, 235, 235),
}
PATTERNS = ("solid", "striped", "dotted", "checked", "zigzag")
MATERIALS = ("matte", "glossy", "metallic", "fabric")

# Body height / width and corner rounding (fraction of the shorter side) per shape.
_SHAPE_GEOMETRY = {"round": (1.0, 0.35), "square": (1.0, 0.03), "tall": (1.6, 0.12), "wide": (0.62, 0.12)}


@dataclass(frozen=True)
class ItemAttributes:
    """The latent truth behind an item's photo, title and interactions."""

    category: str
    shape: str
    colour: str
    pattern: str
    material: str

    def as_indices(self) -> tuple[int, int, int, int, int]:
        return (
            CATEGORIES.index(self.category),
            SHAPES.index(self.shape),
            list(COLOURS).index(self.colour),
            PATTERNS.index(self.pattern),
            MATERIALS.index(self.material),
        )


def render_item(attrs: ItemAttributes, rng: np.random.Generator) -> Image.Image:
    """Draw one product photo, 320–800 px per side, RGB."""
    width = int(rng.integers(320, 801))
    height = int(np.clip(width * rng.uniform(0.7, 1.4), 320, 800))
    canvas = _background(width, height, rng)
    _clutter(canvas, rng)
    size = int(min(width, height) * rng.uniform(0.45, 0.8))
    product = _product(attrs, size, rng)
    if rng.random() < 0.5:
        product = product.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    product = product.rotate(float(rng.uniform(-25, 25)), resample=Image.Resampling.BILINEAR, expand=True)
    x = int(rng.integers(0, max(1, width - product.width + 1)))
    y = int(rng.integers(0, max(1, height - product.height + 1)))
    _shadow(canvas, x, y, product.width, product.height)
    canvas.paste(product, (x, y), product)
    return _lighting(canvas, rng)


def _background(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    top, bottom = rng.integers(40, 256, size=(2, 3))
    kind = rng.integers(0, 4)
    ys = np.linspace(0.0, 1.0, height)[:, None, None]
    if kind == 0:  # plain
        pixels = np.broadcast_to(top, (height, width, 3)).astype(np.float32)
    elif kind == 1:  # vertical gradient
        pixels = np.broadcast_to(top * (1 - ys) + bottom * ys, (height, width, 3)).astype(np.float32)
    elif kind == 2:  # wall and table
        split = rng.uniform(0.55, 0.8)
        pixels = np.broadcast_to(np.where(ys < split, top, bottom), (height, width, 3)).astype(np.float32)
    else:  # soft texture
        coarse = rng.normal(0, 25, size=(6, 6, 3))
        noise = np.asarray(
            Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize(
                (width, height), Image.Resampling.BICUBIC
            ),
            dtype=np.float32,
        )
        pixels = top + (noise - 128)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _clutter(canvas: Image.Image, rng: np.random.Generator) -> None:
    draw = ImageDraw.Draw(canvas)
    side = min(canvas.size)
    for _ in range(int(rng.integers(0, 4))):
        w, h = (side * rng.uniform(0.05, 0.2, size=2)).astype(int)
        x, y = int(rng.integers(0, canvas.width)), int(rng.integers(0, canvas.height))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((x, y, x + w, y + h), fill=colour)
        else:
            draw.rectangle((x, y, x + w, y + h), fill=colour)


def _product(attrs: ItemAttributes, size: int, rng: np.random.Generator) -> Image.Image:
    """The product on a transparent square canvas of `size` px."""
    base = np.array(COLOURS[attrs.colour], dtype=np.float32) + rng.normal(0, 8, size=3)
    body, details = Image.new("L", (size, size)), Image.new("L", (size, size))
    _DRAWERS[attrs.category](ImageDraw.Draw(body), ImageDraw.Draw(details), _body_box(attrs.shape, size), attrs.shape)
    surface = _pattern(attrs.pattern, base, size, rng) * _material(attrs.material, size, rng)[..., None]
    if attrs.material == "glossy":
        surface = surface + _highlight(size)[..., None] * (255 - surface)
    product = np.zeros((size, size, 4), dtype=np.uint8)
    product[..., :3] = np.clip(surface, 0, 255).astype(np.uint8)
    product[..., 3] = np.asarray(body)
    detail = np.asarray(details) > 0
    product[detail, :3] = np.clip(base * 0.55 if base.mean() > 60 else base + 90, 0, 255).astype(np.uint8)
    product[detail, 3] = 255
    return Image.fromarray(product, mode="RGBA")


def _body_box(shape: str, size: int) -> tuple[float, float, float, float]:
    aspect, _ = _SHAPE_GEOMETRY[shape]
    bh, bw = (0.8 * size, 0.8 * size / aspect) if aspect >= 1 else (0.8 * size * aspect, 0.8 * size)
    x0, y0 = (size - bw) / 2, (size - bh) / 2
    return x0, y0, x0 + bw, y0 + bh


def _radius(shape: str, w: float, h: float) -> int:
    return int(_SHAPE_GEOMETRY[shape][1] * min(w, h))


def _draw_mug(body, details, box, shape):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cup = (x0, y0, x0 + 0.75 * w, y1)
    body.rounded_rectangle(cup, radius=_radius(shape, 0.75 * w, h), fill=255)
    details.ellipse((x0 + 0.6 * w, y0 + 0.2 * h, x1, y0 + 0.7 * h), outline=255, width=max(2, int(0.07 * w)))


def _draw_bottle(body, details, box, shape):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    body.rounded_rectangle((x0, y0 + 0.3 * h, x1, y1), radius=_radius(shape, w, 0.7 * h), fill=255)
    body.rectangle((x0 + 0.32 * w, y0 + 0.08 * h, x1 - 0.32 * w, y0 + 0.32 * h), fill=255)
    details.rectangle((x0 + 0.3 * w, y0, x1 - 0.3 * w, y0 + 0.1 * h), fill=255)


def _draw_vase(body, details, box, shape):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    belly = (x0, y0 + 0.3 * h, x1, y1)
    if shape == "square":
        body.rounded_rectangle(belly, radius=_radius(shape, w, 0.7 * h), fill=255)
    else:
        body.ellipse(belly, fill=255)
    body.polygon(
        [(x0 + 0.35 * w, y0 + 0.4 * h), (x0 + 0.2 * w, y0), (x1 - 0.2 * w, y0), (x1 - 0.35 * w, y0 + 0.4 * h)], fill=255
    )
    details.line([(x0 + 0.2 * w, y0), (x1 - 0.2 * w, y0)], fill=255, width=max(2, int(0.04 * h)))


def _draw_lamp(body, details, box, shape):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "round":
        body.pieslice((x0, y0, x1, y0 + 0.9 * h), 180, 360, fill=255)
    else:
        body.polygon([(x0 + 0.25 * w, y0), (x1 - 0.25 * w, y0), (x1, y0 + 0.45 * h), (x0, y0 + 0.45 * h)], fill=255)
    details.rectangle((x0 + 0.46 * w, y0 + 0.45 * h, x1 - 0.46 * w, y1 - 0.08 * h), fill=255)
    details.ellipse((x0 + 0.2 * w, y1 - 0.12 * h, x1 - 0.2 * w, y1), fill=255)


def _draw_backpack(body, details, box, shape):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    body.rounded_rectangle((x0, y0 + 0.12 * h, x1, y1), radius=_radius(shape, w, h), fill=255)
    details.arc((x0 + 0.3 * w, y0, x1 - 0.3 * w, y0 + 0.3 * h), 180, 360, fill=255, width=max(2, int(0.05 * w)))
    details.rounded_rectangle(
        (x0 + 0.2 * w, y0 + 0.55 * h, x1 - 0.2 * w, y1 - 0.08 * h),
        radius=int(0.08 * w),
        outline=255,
        width=max(2, int(0.03 * w)),
    )


def _draw_sneaker(body, details, box, shape):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    top = y0 + (0.0 if shape == "tall" else 0.3 * h)
    outline = [(x0, y1 - 0.15 * h), (x0 + 0.05 * w, y1 - 0.45 * h), (x0 + 0.45 * w, y1 - 0.55 * h), (x0 + 0.55 * w, top),
               (x0 + 0.85 * w, top), (x1, y1 - 0.3 * h), (x1, y1 - 0.15 * h)]  # fmt: skip
    body.polygon(outline, fill=255)
    details.rectangle((x0, y1 - 0.15 * h, x1, y1), fill=255)
    for i in range(3):
        lx = x0 + (0.45 + 0.1 * i) * w
        details.line(
            [(lx, y1 - 0.5 * h + 0.05 * i * h), (lx + 0.08 * w, y1 - 0.55 * h)], fill=255, width=max(2, int(0.02 * w))
        )


def _draw_chair(body, details, box, shape):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    radius = _radius(shape, w, 0.2 * h)
    body.rounded_rectangle((x0 + 0.1 * w, y0, x1 - 0.1 * w, y0 + 0.45 * h), radius=radius, fill=255)
    body.rounded_rectangle((x0, y0 + 0.45 * h, x1, y0 + 0.62 * h), radius=radius // 2, fill=255)
    leg = max(2, int(0.06 * w))
    for lx in (x0 + 0.05 * w, x1 - 0.05 * w - leg):
        details.rectangle((lx, y0 + 0.62 * h, lx + leg, y1), fill=255)


def _draw_clock(body, details, box, shape):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "square":
        body.rounded_rectangle(box, radius=_radius(shape, w, h), fill=255)
    else:
        body.ellipse(box, fill=255)
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, min(w, h) / 2
    stroke = max(2, int(0.04 * r))
    for k in range(12):
        angle = k * np.pi / 6
        details.line([(cx + 0.8 * r * np.cos(angle), cy + 0.8 * r * np.sin(angle)),
                      (cx + 0.92 * r * np.cos(angle), cy + 0.92 * r * np.sin(angle))], fill=255, width=stroke)  # fmt: skip
    details.line([(cx, cy), (cx, cy - 0.6 * r)], fill=255, width=2 * stroke)
    details.line([(cx, cy), (cx + 0.45 * r, cy + 0.1 * r)], fill=255, width=2 * stroke)


_DRAWERS = {
    "mug": _draw_mug,
    "bottle": _draw_bottle,
    "vase": _draw_vase,
    "lamp": _draw_lamp,
    "backpack": _draw_backpack,
    "sneaker": _draw_sneaker,
    "chair": _draw_chair,
    "clock": _draw_clock,
}


def _pattern(pattern: str, base: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float32 surface colour: base with the pattern in a contrasting tone."""
    second = base * 0.4 if base @ (0.299, 0.587, 0.114) > 140 else base + 0.6 * (255 - base)
    if pattern == "solid":
        return np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    period = size / rng.uniform(5, 9)
    theta = np.deg2rad(rng.uniform(-30, 30))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    u = xs * np.cos(theta) + ys * np.sin(theta)
    v = -xs * np.sin(theta) + ys * np.cos(theta)
    if pattern == "striped":
        mask = (u % period) < period / 2
    elif pattern == "dotted":
        mask = ((u % period) - period / 2) ** 2 + ((v % period) - period / 2) ** 2 < (period / 3.2) ** 2
    elif pattern == "checked":
        mask = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    else:  # zigzag
        tri = np.abs((u / period) % 2 - 1) * period / 2
        mask = ((v + tri) % period) < period / 3
    return np.where(mask[..., None], second, base).astype(np.float32)


def _material(material: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) float32 shading multiplier for the surface."""
    xs = np.linspace(0.0, 1.0, size, dtype=np.float32)[None, :]
    shade = np.broadcast_to(1.05 - 0.2 * xs, (size, size))
    if material == "metallic":
        bands = 0.55 + 0.6 * np.abs(np.cos(np.pi * xs * 1.5))
        streaks = rng.normal(0, 0.05, size=(1, size)).astype(np.float32)
        return (np.broadcast_to(bands + streaks, (size, size))).astype(np.float32)
    if material == "fabric":
        weave = 0.9 + 0.12 * ((np.add.outer(np.arange(size), np.arange(size)) % 6) < 3)
        return (shade * weave * rng.normal(1.0, 0.08, size=(size, size))).astype(np.float32)
    return (shade * rng.normal(1.0, 0.02, size=(size, size))).astype(np.float32)


def _highlight(size: int) -> np.ndarray:
    """A soft specular spot, upper left: 0 (none) to ~0.7 (near white)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return 0.7 * np.exp(-(((xs - 0.32) / 0.1) ** 2 + ((ys - 0.3) / 0.16) ** 2))


def _shadow(canvas: Image.Image, x: int, y: int, w: int, h: int) -> None:
    """Darken a blurred ellipse under the product's foot."""
    pad = max(4, w // 10)
    box = (x + w // 6, y + int(0.82 * h), x + 5 * w // 6, y + h + pad // 2)
    region = (box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad)
    region = (max(0, region[0]), max(0, region[1]), min(canvas.width, region[2]), min(canvas.height, region[3]))
    if region[2] <= region[0] or region[3] <= region[1]:
        return
    mask = Image.new("L", (region[2] - region[0], region[3] - region[1]))
    ImageDraw.Draw(mask).ellipse(
        [box[0] - region[0], box[1] - region[1], box[2] - region[0], box[3] - region[1]], fill=110
    )
    mask = mask.filter(ImageFilter.GaussianBlur(pad / 2))
    canvas.paste((0, 0, 0), region, mask)


def _lighting(canvas: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A brightness ramp in a random direction and a slight colour temperature."""
    pixels = np.asarray(canvas, dtype=np.float32)
    h, w, _ = pixels.shape
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (xs / w - 0.5) * np.cos(angle) + (ys / h - 0.5) * np.sin(angle)
    gain = rng.uniform(0.85, 1.05) + rng.uniform(0.1, 0.35) * ramp
    warmth = rng.uniform(-0.08, 0.08)
    pixels = pixels * gain[..., None] * np.array([1 + warmth, 1.0, 1 - warmth], dtype=np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
