"""A deterministic synthetic marketplace catalog: photos, noisy titles, interaction logs.

`make_demo_catalog(out, items=500, seed=0)` writes

    out/images/000000.jpg ...          product photos (JPEG, a fifth progressive; some PNG/WebP), a few broken
    out/manifest.parquet               item_id, image_uri (relative), title, category, updated_at
    out/interactions.parquet           query_item_id, clicked_item_id, weight, timestamp, session_id
    out/attributes.parquet             the latent truth (for tests and evaluation sanity checks)

The same seed gives byte-identical files on any machine and any number of processes.
"""

from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.demo_render import CATEGORIES, COLOURS, MATERIALS, PATTERNS, SHAPES, ItemAttributes, render_item

__all__ = ["BROKEN_KINDS", "CatalogChange", "DemoCatalog", "change_demo_catalog", "make_demo_catalog"]

log = logging.getLogger(__name__)

# Deliberately broken images, one of each kind once the catalog has >= 100 items.
BROKEN_KINDS = ("zero_bytes", "truncated", "not_an_image", "corrupt_header", "missing")
# Valid but less common encodings that must embed like any JPEG.
_ODD_FORMATS = ("png_alpha", "webp", "cmyk_jpeg")

_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
_NOUNS = {
    "mug": ["mug", "coffee mug", "cup", "tea mug"],
    "bottle": ["bottle", "water bottle", "flask"],
    "vase": ["vase", "flower vase", "jar"],
    "lamp": ["lamp", "table lamp", "desk lamp"],
    "backpack": ["backpack", "rucksack", "school bag"],
    "sneaker": ["sneaker", "trainer", "running shoe"],
    "chair": ["chair", "dining chair", "seat"],
    "clock": ["clock", "wall clock", "clock face"],
}
_SHAPE_WORDS = {
    "round": ["round", "rounded"],
    "square": ["square", "boxy"],
    "tall": ["tall", "slim"],
    "wide": ["wide", "low"],
}
_PATTERN_WORDS = {
    "solid": ["", "plain", "solid"],
    "striped": ["striped", "stripe", "with stripes"],
    "dotted": ["polka dot", "dotted", "spotted"],
    "checked": ["checked", "plaid", "checkered"],
    "zigzag": ["zigzag", "chevron"],
}
_MATERIAL_WORDS = {
    "matte": ["matte", "matt"],
    "glossy": ["glossy", "shiny", "lacquered"],
    "metallic": ["metallic", "chrome", "steel"],
    "fabric": ["fabric", "canvas", "woven"],
}
_BRANDS = ["Norda", "Kivo", "Lumea", "Brix", "Oakly & Co", "Tamsin", "Verro", "Hallo", "Quill", "Saffa"]
_EXTRAS = [
    "new",
    "free shipping",
    "gift idea",
    "set of 2",
    "2025 model",
    "sale",
    "100% authentic",
    "XL",
    "mini",
    "bestseller",
]
# How much each shared attribute makes a shopper click: category, shape, colour, pattern, material.
_CLICK_WEIGHTS = np.array([3.0, 1.5, 1.0, 1.5, 0.5])


@dataclass(frozen=True)
class DemoCatalog:
    """Where a generated catalog's files are."""

    root: Path
    manifest: Path
    interactions: Path
    attributes: Path
    items: int
    broken_item_ids: tuple[str, ...]


def make_demo_catalog(out: str | Path, items: int = 500, seed: int = 0, workers: int | None = None) -> DemoCatalog:
    """Generate the catalog; see the module docstring for the files.

    Raises:
        ValueError: fewer than 10 items.
    """
    if items < 10:
        raise ValueError(f"items must be >= 10, got {items}")
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    attrs = _sample_attributes(items, rng)
    item_ids = [f"sku-{seed:x}-{i:06d}-{h:04x}" for i, h in enumerate(rng.integers(0, 1 << 16, size=items))]
    titles = [_title(a, rng) for a in attrs]
    updated_at = [_EPOCH + timedelta(seconds=int(s)) for s in rng.integers(0, 300 * 86400, size=items)]
    special = rng.permutation(items)
    broken = {
        int(i): kind for i, kind in zip(special, BROKEN_KINDS[: min(len(BROKEN_KINDS), items // 20)], strict=False)
    }
    odd = {
        int(i): kind
        for i, kind in zip(special[len(broken) :], _ODD_FORMATS[: min(len(_ODD_FORMATS), items // 30)], strict=False)
    }

    jobs = [(i, seed, attrs[i], broken.get(i), odd.get(i), str(root / "images")) for i in range(items)]
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            names = list(pool.map(_write_image, jobs, chunksize=16))
    else:
        names = [_write_image(job) for job in jobs]

    manifest = pa.table(
        {
            "item_id": item_ids,
            "image_uri": [f"images/{name}" for name in names],
            "title": titles,
            "category": [a.category for a in attrs],
            "updated_at": pa.array(updated_at, pa.timestamp("us", tz="UTC")),
        }
    )
    pq.write_table(manifest, root / "manifest.parquet")
    pq.write_table(_attribute_table(item_ids, attrs), root / "attributes.parquet")
    pq.write_table(_interactions(item_ids, attrs, rng), root / "interactions.parquet")
    log.info("demo catalog: %d items, %d broken images, in %s", items, len(broken), root)
    return DemoCatalog(
        root=root,
        manifest=root / "manifest.parquet",
        interactions=root / "interactions.parquet",
        attributes=root / "attributes.parquet",
        items=items,
        broken_item_ids=tuple(item_ids[i] for i in sorted(broken)),
    )


@dataclass(frozen=True)
class CatalogChange:
    """What `change_demo_catalog` did, by item id."""

    new_photos: tuple[str, ...]
    removed: tuple[str, ...]


def change_demo_catalog(out: str | Path, fraction: float = 0.01, seed: int = 1) -> CatalogChange:
    """A day in a marketplace: a `fraction` of listings get a new photo (same product, new shot), and a
    quarter as many are delisted (dropped from the manifest). Edits the catalog under `out` in place.

    Raises:
        ValueError: a fraction outside (0, 0.5], or no catalog under `out`.
    """
    if not 0 < fraction <= 0.5:
        raise ValueError(f"fraction must be in (0, 0.5], got {fraction}")
    root = Path(out)
    if not (root / "manifest.parquet").is_file():
        raise ValueError(f"no demo catalog under {root} (run demo-catalog first)")
    manifest = pq.read_table(root / "manifest.parquet")
    truth = pq.read_table(root / "attributes.parquet").to_pydict()
    attrs = {i: ItemAttributes(*(truth[f][row] for f in ("category", "shape", "colour", "pattern", "material")))
             for row, i in enumerate(truth["item_id"])}  # fmt: skip
    ids, uris = manifest.column("item_id").to_pylist(), manifest.column("image_uri").to_pylist()
    rng = np.random.default_rng(seed)
    usable = [row for row, uri in enumerate(uris) if (root / uri).is_file() and (root / uri).stat().st_size > 1024]
    count = max(1, round(len(ids) * fraction))
    chosen = rng.choice(usable, size=min(len(usable), count + max(1, count // 4)), replace=False)
    reshot, delisted = [int(r) for r in chosen[:count]], [int(r) for r in chosen[count:]]
    now = datetime.now(UTC)
    for row in reshot:
        image = render_item(attrs[ids[row]], np.random.default_rng([seed, row, 7]))
        (root / uris[row]).write_bytes(_encode(image.convert("RGB"), "JPEG", quality=90))
    updated = manifest.column("updated_at").to_pylist()
    for row in reshot:
        updated[row] = now
    manifest = manifest.set_column(manifest.schema.get_field_index("updated_at"), "updated_at",
                                   pa.array(updated, pa.timestamp("us", tz="UTC")))  # fmt: skip
    keep = np.ones(len(ids), dtype=bool)
    keep[delisted] = False
    pq.write_table(manifest.filter(pa.array(keep)), root / "manifest.parquet")
    log.info("changed demo catalog %s: %d new photos, %d delisted", root, len(reshot), len(delisted))
    return CatalogChange(tuple(ids[r] for r in reshot), tuple(ids[r] for r in delisted))


def _sample_attributes(n: int, rng: np.random.Generator) -> list[ItemAttributes]:
    picks = [rng.integers(0, len(axis), size=n) for axis in (CATEGORIES, SHAPES, list(COLOURS), PATTERNS, MATERIALS)]
    colours = list(COLOURS)
    return [
        ItemAttributes(CATEGORIES[c], SHAPES[s], colours[k], PATTERNS[p], MATERIALS[m])
        for c, s, k, p, m in zip(*picks, strict=True)
    ]


def _title(a: ItemAttributes, rng: np.random.Generator) -> str:
    """A listing-like title: synonyms, shuffled and dropped words, brands, extras, typos."""

    def pick(words: list[str]) -> str:
        return words[int(rng.integers(0, len(words)))]

    colour = a.colour if rng.random() > 0.03 else pick(list(COLOURS))  # sellers mislabel sometimes
    adjectives = [
        colour,
        pick(_PATTERN_WORDS[a.pattern]),
        pick(_MATERIAL_WORDS[a.material]),
        pick(_SHAPE_WORDS[a.shape]),
    ]
    adjectives = [w for w in adjectives if w and rng.random() > 0.15]
    rng.shuffle(adjectives)
    words = adjectives + [pick(_NOUNS[a.category])]
    if rng.random() < 0.5:
        words.insert(0, pick(_BRANDS))
    if rng.random() < 0.4:
        words.append(f"- {pick(_EXTRAS)}")
    title = " ".join(words)
    if rng.random() < 0.1 and len(title) > 4:  # a typo: two neighbouring letters swapped
        i = int(rng.integers(0, len(title) - 1))
        title = title[:i] + title[i + 1] + title[i] + title[i + 2 :]
    return title.upper() if rng.random() < 0.05 else title


def _write_image(job: tuple) -> str:
    """Render (or break) one image; returns its file name under images/."""
    index, seed, attrs, broken, odd, folder = job
    rng = np.random.default_rng([seed, index])
    image = render_item(attrs, rng)
    name, data = f"{index:06d}.jpg", None
    if odd == "png_alpha":
        rgba = image.convert("RGBA")
        rgba.putalpha(230)
        name, data = f"{index:06d}.png", _encode(rgba, "PNG")
    elif odd == "webp":
        name, data = f"{index:06d}.webp", _encode(image, "WEBP", quality=85)
    elif odd == "cmyk_jpeg":
        data = _encode(image.convert("CMYK"), "JPEG", quality=90)
    else:
        # A fifth progressive, as mozjpeg and many image services write them.
        data = _encode(image, "JPEG", quality=int(rng.integers(80, 96)), progressive=bool(rng.random() < 0.2))
    if broken == "zero_bytes":
        data = b""
    elif broken == "truncated":
        data = data[: len(data) * 2 // 5]
    elif broken == "not_an_image":
        data = b"<html><body>404 image not found</body></html>\n"
    elif broken == "corrupt_header":
        data = data[:2] + bytes(rng.integers(0, 256, size=64, dtype=np.uint8)) + data[66:]
    if broken != "missing":
        Path(folder, name).write_bytes(data)
    return name


def _encode(image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _attribute_table(item_ids: list[str], attrs: list[ItemAttributes]) -> pa.Table:
    columns = {"item_id": item_ids}
    for field in ("category", "shape", "colour", "pattern", "material"):
        columns[field] = [getattr(a, field) for a in attrs]
    return pa.table(columns)


def _interactions(item_ids: list[str], attrs: list[ItemAttributes], rng: np.random.Generator) -> pa.Table:
    """Clicks from a view of one item to others, likelier the more latent attributes they share."""
    codes = np.array([a.as_indices() for a in attrs])
    n = len(item_ids)
    pool_size = min(n - 1, 300)
    rows: dict[str, list] = {k: [] for k in ("query_item_id", "clicked_item_id", "weight", "timestamp", "session_id")}
    for session in range(n):
        query = int(rng.integers(0, n))
        pool = rng.choice(n - 1, size=pool_size, replace=False)
        pool = pool + (pool >= query)  # never the query itself
        affinity = (codes[pool] == codes[query]) @ _CLICK_WEIGHTS + rng.normal(0, 1.0, size=pool_size)
        p = np.exp((affinity - affinity.max()) / 0.7)
        clicks = rng.choice(pool, size=int(rng.integers(1, 5)), replace=False, p=p / p.sum())
        when = _EPOCH + timedelta(seconds=int(rng.integers(0, 300 * 86400)))
        for clicked in clicks:
            rows["query_item_id"].append(item_ids[query])
            rows["clicked_item_id"].append(item_ids[int(clicked)])
            rows["weight"].append(float(rng.choice([1.0, 2.0, 3.0], p=[0.8, 0.15, 0.05])))  # click, cart, purchase
            rows["timestamp"].append(when)
            rows["session_id"].append(f"s{session:07d}")
    return pa.table(
        {
            "query_item_id": pa.array(rows["query_item_id"], pa.string()),
            "clicked_item_id": pa.array(rows["clicked_item_id"], pa.string()),
            "weight": pa.array(rows["weight"], pa.float32()),
            "timestamp": pa.array(rows["timestamp"], pa.timestamp("us", tz="UTC")),
            "session_id": pa.array(rows["session_id"], pa.string()),
        }
    )
