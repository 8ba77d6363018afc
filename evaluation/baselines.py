"""A non-learned baseline so a first model always has something to beat: tiny pixels + colour histogram.

Each catalog image becomes an 8×8 RGB thumbnail (192 values, centred) and a 4×4×4
colour histogram (64 values), each L2-normalised, concatenated and normalised again;
neighbours are exact inner-product search over those vectors. Images that cannot be
decoded are left out (their queries are counted as not in the snapshot).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from encoder import storage
from evaluation.catalog import CatalogInfo

__all__ = ["PixelBaseline", "pixel_features"]

log = logging.getLogger(__name__)
NAME = "builtin:pixels"


def pixel_features(data: bytes) -> np.ndarray:
    """(256,) float32 unit vector of an encoded image."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, we only need 32 px
    rgb = np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    thumb = rgb.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3)).reshape(-1)
    thumb -= thumb.mean()
    bins = np.minimum((rgb * 4).astype(int), 3)
    hist = np.bincount((bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]).reshape(-1), minlength=64).astype(
        np.float32
    )
    parts = [v / max(float(np.linalg.norm(v)), 1e-12) for v in (thumb, hist)]
    vector = np.concatenate(parts)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


class PixelBaseline:
    name = NAME

    def __init__(self, catalog: CatalogInfo, threads: int = 8) -> None:
        import faiss

        def featurize(item: tuple[str, str]):
            try:
                return item[0], pixel_features(storage.read_bytes(item[1]))
            except Exception as err:  # noqa: BLE001 - an unusable image just is not in the baseline
                log.debug("baseline skips %s: %s", item[0], err)
                return item[0], None

        with ThreadPoolExecutor(threads) as pool:
            features = [f for f in pool.map(featurize, sorted(catalog.image_uris.items())) if f[1] is not None]
        self.item_ids = [item_id for item_id, _ in features]
        self._rows = {item_id: row for row, item_id in enumerate(self.item_ids)}
        self._vectors = np.stack([v for _, v in features]) if features else np.zeros((0, 256), np.float32)
        self._index = faiss.IndexFlatIP(256)
        self._index.add(self._vectors)
        log.info("%s: %d of %d catalog images", NAME, len(self.item_ids), len(catalog.image_uris))

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._rows

    @property
    def catalog_size(self) -> int:
        return len(self.item_ids)

    def rank(self, item_ids: Sequence[str], k: int) -> list[list[str]]:
        rows = [self._rows[i] for i in item_ids]
        _, found = self._index.search(self._vectors[rows], min(k + 1, len(self.item_ids)))
        return [
            [self.item_ids[r] for r in row if r >= 0 and r != own][:k] for row, own in zip(found, rows, strict=True)
        ]
