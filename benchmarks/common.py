"""Shared benchmark helpers: realistic JPEGs from scikit-image's bundled photos, machine facts, timing."""

from __future__ import annotations

import io
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field", "retina")


def realistic_jpegs(folder: Path, count: int, width: int = 640, quality: int = 90, seed: int = 0) -> list[Path]:
    """`count` JPEGs of ~`width` px made from real photos: random crops, flips and rescales."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in _PHOTOS]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop = crop.resize((width, int(width * ch / cw)), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        crop.save(buffer, "JPEG", quality=quality)
        path = folder / f"{i:06d}.jpg"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def rate(n: int, fn: Callable[[], object], repeats: int = 1) -> float:
    """Best-of-`repeats` items per second for `fn` processing `n` items."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def print_table(results: dict[str, float], baseline: str) -> None:
    """A Markdown table of images/s, each row also as a ratio to the first (the baseline)."""
    base = next(iter(results.values()))
    print(f"| path | images/s | × {baseline} |\n| --- | ---: | ---: |")
    for name, value in results.items():
        print(f"| {name} | {value:,.0f} | {value / base:.1f} |")
