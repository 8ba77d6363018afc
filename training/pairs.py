"""Catalog manifest → checked image–title pairs, split into train and held-out items.

Every image is read and decoded once before training so that a broken image or an
empty title is skipped and counted up front (never discovered mid-epoch, where it
would change a batch's size). The result is saved as `pairs.parquet` beside the run;
a resumed run reads it back instead of scanning again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from encoder import storage, tables
from encoder.preprocess import DecodeLimits, ImageDecodeError, PreprocessConfig, decode_image
from evaluation.catalog import read_table

__all__ = ["PairError", "Pairs", "collect_pairs", "read_pairs", "split_of", "write_pairs"]

log = logging.getLogger(__name__)

# Image reads a process has in flight (the pairs' check, a loader process's batch, the decode-once cache): from an
# object store each read waits tens of milliseconds, and one at a time kept a loader process far below its CPU.
READ_THREADS = 32

REQUIRED = ("item_id", "image_uri", "title")
_SCHEMA = pa.schema([("item_id", pa.string()), ("image_uri", pa.string()), ("title", pa.string()),
                     ("split", pa.string())])  # fmt: skip


class PairError(ValueError):
    """The manifest cannot give training pairs; the message says why."""


@dataclass
class Pairs:
    """Usable pairs (in manifest order) and what was skipped on the way, by reason."""

    table: pa.Table  # item_id, image_uri (absolute), title, split ("train" | "val")
    counts: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[dict] = field(default_factory=list)  # a few, for the report

    def split(self, name: str) -> pa.Table:
        return self.table.filter(pc.equal(self.table.column("split"), name))

    @property
    def digest(self) -> str:
        """Identity of the pair list; a checkpoint resumes only on the same pairs."""
        h = hashlib.sha256()
        for column in ("item_id", "image_uri", "title", "split"):
            for value in self.table.column(column).to_pylist():
                h.update(value.encode() + b"\0")
        return h.hexdigest()[:16]


def split_of(item_id: str, val_fraction: float) -> str:
    """`val` for a stable pseudo-random share of item ids, `train` otherwise."""
    bucket = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") / 2**64
    return "val" if bucket < val_fraction else "train"


def _read_manifest(uri: str) -> pa.Table:
    try:
        table = read_table(uri, string_columns=REQUIRED, columns=REQUIRED)  # a catalog's other columns never read
    except FileNotFoundError as err:
        raise PairError(f"catalog {uri} does not exist") from err
    except ValueError as err:
        raise PairError(f"catalog: {err}") from err
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise PairError(f"catalog {uri} lacks column(s) {missing} (training needs image–title pairs); "
                        f"found {tables.file_columns(table)}")  # fmt: skip
    try:
        ids, _, _ = (tables.text_column(table, c, f"catalog {uri}") for c in REQUIRED)
    except ValueError as err:
        raise PairError(str(err)) from err
    if ids.null_count:
        raise PairError(f"catalog {uri} has {ids.null_count} row(s) without an item_id")
    duplicates = tables.repeated(ids)
    if len(duplicates):
        raise PairError(f"catalog {uri} has {len(duplicates)} duplicate item_id(s), e.g. {duplicates[:5].to_pylist()}")
    return table


def _check_image(uri: str, preprocess: PreprocessConfig, limits: DecodeLimits) -> str | None:
    """None if the image decodes, else the reason it cannot be used."""
    try:
        decode_image(storage.read_bytes(uri, limits.max_bytes), preprocess, limits)
    except ImageDecodeError as err:
        return f"broken image: {err}"
    except FileNotFoundError:
        return "image not found"
    except Exception as err:  # noqa: BLE001 - any read failure skips the pair, with its reason
        return f"unreadable image: {type(err).__name__}: {err}"
    return None


def collect_pairs(catalog: str, preprocess: PreprocessConfig, *, val_fraction: float, max_val_items: int,
                  limits: DecodeLimits = DecodeLimits(), threads: int = READ_THREADS, progress=None) -> Pairs:  # fmt: skip
    """Read the manifest, drop pairs with an empty title or an unusable image, split by item id.

    Args:
        progress: optional callable(n) told how many images were checked since last call.

    Raises:
        PairError: unreadable manifest, missing columns, missing or duplicate item ids.
    """
    table = _read_manifest(catalog)
    base = storage.parent_dir(catalog)
    ids, uris, titles = (tables.text_column(table, c, "").to_pylist() for c in ("item_id", "image_uri", "title"))
    counts: Counter[str] = Counter(rows=len(ids))
    examples: list[dict] = []

    def skip(item_id: str, reason: str, kind: str) -> None:
        counts[kind] += 1
        if len(examples) < 20:
            examples.append({"item_id": item_id, "reason": reason})

    candidates = []
    for item_id, uri, title in zip(ids, uris, titles, strict=True):
        title = " ".join((title or "").split())
        if not uri:
            skip(item_id, "empty image_uri", "skipped_no_image")
        elif not title:
            skip(item_id, "empty title", "skipped_empty_title")
        else:
            candidates.append((item_id, storage.resolve(base, uri), title))

    def check(candidate):
        return _check_image(candidate[1], preprocess, limits)

    kept = []
    with ThreadPoolExecutor(threads) as pool:
        for candidate, reason in zip(candidates, pool.map(check, candidates), strict=True):
            if progress:
                progress(1)
            if reason:
                skip(candidate[0], reason, "skipped_broken_image")
            else:
                kept.append(candidate)

    splits = [split_of(item_id, val_fraction) for item_id, _, _ in kept]
    val_rows = [i for i, s in enumerate(splits) if s == "val"]
    for i in val_rows[max_val_items:]:  # capped: validation embeds every held-out item each epoch
        splits[i] = "train"
    columns = list(zip(*kept, strict=True)) if kept else [[], [], []]
    pairs = pa.table([pa.array(list(c), pa.string()) for c in columns] + [pa.array(splits, pa.string())],
                     schema=_SCHEMA)  # fmt: skip
    counts.update(pairs=pairs.num_rows, train=splits.count("train"), val=splits.count("val"))
    for kind in ("skipped_empty_title", "skipped_broken_image", "skipped_no_image"):
        counts.setdefault(kind, 0)
    log.info("pairs from %s: %s", catalog, dict(counts))
    return Pairs(pairs, dict(counts), examples)


def write_pairs(pairs: Pairs, path: str) -> None:
    metadata = {b"lookalike": json.dumps({"counts": pairs.counts, "skipped_examples": pairs.skipped_examples}).encode()}
    pq.write_table(pairs.table.replace_schema_metadata(metadata), path)


def read_pairs(path: str) -> Pairs:
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(b"lookalike", b"{}"))
    return Pairs(table.replace_schema_metadata(None), meta.get("counts", {}), meta.get("skipped_examples", []))
