"""A non-learned baseline so a first model always has something to beat: tiny pixels + colour histogram.

Each catalog image becomes an 8×8 RGB thumbnail (192 values, centred) and a 4×4×4
colour histogram (64 values), each L2-normalised, concatenated and normalised again;
neighbours are exact inner-product search over those vectors. Images that cannot be
decoded are left out (their queries are counted as not in the snapshot).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from evaluation import PIXELS
from evaluation.catalog import CatalogInfo, catalog_image
from evaluation.evaluate import VectorRanker

__all__ = ["PIXELS_MAX_ITEMS", "TOO_MANY_FOR_PIXELS", "PixelBaseline", "pixel_features"]

log = logging.getLogger(__name__)

# The baseline reads and decodes every catalog image on the evaluating machine, 8 at a time, and searches them
# exactly: 1,157 images/s here on the demo's small local photos, so a million is a quarter of an hour at best (more
# from gs://, 8 reads in flight) and 1 GiB of vectors. Past it, a first night at a marketplace's scale would spend
# hours there after its embed, or run out of memory.
PIXELS_MAX_ITEMS = 1_000_000
TOO_MANY_FOR_PIXELS = (
    f"{PIXELS} reads and decodes every catalog image on this machine; compare against another snapshot instead, or, "
    "for a nightly's first night, publish it without a gate (evaluate.first_baseline: null; a rerun goes on from its "
    "evaluate step)"
)


def pixel_features(image: Image.Image) -> np.ndarray:
    """(256,) float32 unit vector of an RGB image (`catalog_image`: decoded at reduced scale, only 32 px are needed)."""
    rgb = np.asarray(image.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    thumb = rgb.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3)).reshape(-1)
    thumb -= thumb.mean()
    bins = np.minimum((rgb * 4).astype(int), 3)
    hist = np.bincount((bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]).reshape(-1), minlength=64).astype(
        np.float32
    )
    parts = [v / max(float(np.linalg.norm(v)), 1e-12) for v in (thumb, hist)]
    vector = np.concatenate(parts)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


class PixelBaseline(VectorRanker):
    """Exact neighbours over `pixel_features` of every decodable catalog image."""

    def __init__(self, catalog: CatalogInfo, threads: int = 8) -> None:
        images = catalog.images()
        if len(images) > PIXELS_MAX_ITEMS:
            raise ValueError(f"the catalog has {len(images):,} images, more than {PIXELS_MAX_ITEMS:,}: "
                             f"{TOO_MANY_FOR_PIXELS}")  # fmt: skip

        def featurize(item: tuple[str, str]):
            try:
                return item[0], pixel_features(catalog_image(item[1], 64))
            except Exception as err:  # noqa: BLE001 - an unusable image just is not in the baseline
                log.debug("baseline skips %s: %s", item[0], err)
                return item[0], None

        with ThreadPoolExecutor(threads) as pool:
            features = [f for f in pool.map(featurize, images) if f[1] is not None]
        vectors = np.stack([v for _, v in features]) if features else np.zeros((0, 256), np.float32)
        super().__init__(PIXELS, [item_id for item_id, _ in features], vectors)
        log.info("%s: %d of %d catalog images", PIXELS, len(self.item_ids), len(images))
