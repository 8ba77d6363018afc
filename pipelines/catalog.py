"""Catalog manifests: Parquet, CSV, JSON lines, a glob of those, or a glob of images.

Every problem with the manifest itself (unreadable, missing columns, empty,
duplicate or empty item ids) is a `CatalogError` raised before any image is
read. Per-item problems (an empty image_uri) are left to the pipeline, which
dead-letters them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from encoder import storage as object_store
from encoder import tables
from pipelines import storage
from pipelines.dates import parse_when

__all__ = [
    "CatalogError",
    "CatalogItem",
    "ItemChunk",
    "catalog_files",
    "item_chunks",
    "iter_items",
    "parse_when",
    "read_catalog",
    "read_manifest_file",
]

REQUIRED_COLUMNS = ("item_id", "image_uri")
_MANIFEST_FORMATS = tables.TABLE_FORMATS
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class CatalogError(ValueError):
    """The manifest cannot be used; the message names the problem and the file."""


class CatalogItem(NamedTuple):
    """One item to embed: its id and where its image is (absolute URI or path)."""

    item_id: str
    image_uri: str


def _suffix(uri: str) -> str:
    return os.path.splitext(uri)[1].lower()


def catalog_files(uri: str) -> tuple[str, list[str]]:
    """Resolve a catalog argument to its kind (`manifest` or `images`) and files.

    Raises:
        CatalogError: nothing matches, an unknown format, a mix of formats, or a place no filesystem here lists.
    """
    try:
        return _catalog_files(uri)
    except CatalogError:
        raise
    except Exception as err:  # noqa: BLE001 - Beam's own words, in one line (`s3://` without boto3: its traceback)
        scheme = uri.split("://", 1)[0] if "://" in uri else "local"
        raise CatalogError(
            f"catalog {uri}: cannot be listed here ({object_store.describe_error(err)}); {scheme} "
            "catalogs need a filesystem Beam has installed (local paths and gs:// always)"
        ) from None


def _catalog_files(uri: str) -> tuple[str, list[str]]:
    if not set(uri) & set(object_store.GLOB_CHARS):
        if _suffix(uri) not in _MANIFEST_FORMATS:
            raise CatalogError(
                f"catalog {uri}: unknown manifest format {_suffix(uri)!r}; "
                f"use one of {sorted(_MANIFEST_FORMATS)} or a glob of images"
            )
        if not object_store.is_web(uri) and not storage.exists(uri):  # (a web manifest: its read says)
            raise CatalogError(f"catalog {uri} does not exist")
        return "manifest", [uri]
    # A local glob is matched as an absolute path: its files are read from wherever the workers run, and an image
    # glob's paths go in a listing file elsewhere (a relative path would be read relative to it); `*.jpg` has no
    # folder of its own to list.
    files = storage.match(uri if "://" in uri else os.path.abspath(uri))
    if not files:
        raise CatalogError(f"catalog glob {uri} matches no files")
    if all(_suffix(f) in IMAGE_SUFFIXES for f in files):
        return "images", files
    formats = {_MANIFEST_FORMATS.get(_suffix(f)) for f in files}
    if len(formats) != 1 or None in formats:
        raise CatalogError(f"catalog glob {uri} matches mixed or unknown files: {sorted({_suffix(f) for f in files})}")
    return "manifest", files


def read_manifest_file(uri: str, columns: tuple[str, ...] | None = None) -> pa.Table:
    """One manifest file as a table with string `item_id` and absolute `image_uri`; with `columns`, of those and
    no others (a catalog's descriptions, prices and the like are then never decoded).

    Raises:
        CatalogError: unreadable, or without the required columns.
    """
    fmt = _MANIFEST_FORMATS.get(_suffix(uri))
    wanted = None if columns is None else tuple(dict.fromkeys((*REQUIRED_COLUMNS, *columns)))
    try:
        table = tables.table_from_bytes(storage.read_bytes(uri), fmt, REQUIRED_COLUMNS, wanted)
        names = table.column_names  # a non-UTF-8 CSV header fails only here
    except Exception as err:  # noqa: BLE001 - any reader failure means an unusable manifest
        raise CatalogError(f"cannot read manifest {uri}: {type(err).__name__}: {err}") from err
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise CatalogError(f"manifest {uri} lacks column(s) {missing}; found {tables.file_columns(table)}")
    try:
        item_ids, uris = (tables.text_column(table, c, f"manifest {uri}") for c in ("item_id", "image_uri"))
    except ValueError as err:
        raise CatalogError(str(err)) from err
    resolved = object_store.resolve_all(object_store.parent_dir(uri), uris)
    table = table.set_column(table.schema.get_field_index("image_uri"), "image_uri", resolved)
    return table.set_column(table.schema.get_field_index("item_id"), "item_id", item_ids)


@dataclass(frozen=True, slots=True)
class ItemChunk:
    """A run of catalog items as two columns: how items travel between pipeline steps.

    One element of two lists of strings costs Beam's shuffle ~0.6 µs per item to encode and
    decode; a list of `CatalogItem`s cost 4-10 µs (each tuple coded on its own).
    """

    item_ids: list[str]
    image_uris: list[str]

    def __len__(self) -> int:
        return len(self.item_ids)

    def items(self) -> list[CatalogItem]:
        return [CatalogItem(i, u) for i, u in zip(self.item_ids, self.image_uris, strict=True)]


def item_chunks(table: pa.Table, size: int) -> Iterator[ItemChunk]:
    """The catalog's items in manifest order, `size` at a time."""
    for start in range(0, table.num_rows, size):
        part = table.slice(start, size)
        yield ItemChunk(part.column("item_id").to_pylist(), part.column("image_uri").to_pylist())


def _stem(path: str) -> str:
    return os.path.splitext(path.rsplit("/", 1)[-1])[0]


def _images_table(files: list[str]) -> pa.Table:
    return pa.table({"item_id": pa.array([_stem(f) for f in files], pa.string()),
                     "image_uri": pa.array(files, pa.string())})  # fmt: skip


def read_catalog(uri: str, listed: tuple[str, list[str]] | None = None,
                 columns: tuple[str, ...] | None = None) -> pa.Table:  # fmt: skip
    """The whole catalog, validated: unique non-empty string item ids, absolute image URIs. `listed`:
    `catalog_files(uri)` when the caller has it already (a glob of 20,000 photos takes ~0.3 s to list). `columns`:
    these (those the manifest has) beside `item_id` and `image_uri`, and no others; None: all.

    Raises:
        CatalogError: see the module docstring.
    """
    kind, files = listed or catalog_files(uri)
    if kind == "images":
        table = _images_table(files)
    else:
        parts = [read_manifest_file(f, columns) for f in files]
        try:
            table = tables.with_file_columns(pa.concat_tables(parts, promote_options="permissive"), parts)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:  # a column of one kind in a file, of another in the next
            raise CatalogError(f"manifest files of {uri} have incompatible schemas: {err}") from err
    _validate(table, uri)
    return table


def _validate(table: pa.Table, uri: str) -> None:
    if table.num_rows == 0:
        raise CatalogError(f"catalog {uri} has no rows")
    ids = table.column("item_id")
    blank = pc.or_(pc.is_null(ids), pc.equal(pc.utf8_trim_whitespace(ids.fill_null("")), ""))
    blank_rows = pc.indices_nonzero(blank).to_pylist()
    if blank_rows:
        raise CatalogError(
            f"catalog {uri} has {len(blank_rows)} row(s) with an empty item_id, e.g. rows {blank_rows[:5]}"
        )
    dupes = tables.repeated(ids)
    if len(dupes):
        raise CatalogError(
            f"catalog {uri} has {len(dupes)} duplicate item_id(s), e.g. {dupes[:5].to_pylist()}; item ids must be "
            "unique"
        )


def iter_items(table: pa.Table) -> Iterator[CatalogItem]:
    """The catalog's items, in manifest order."""
    for item_id, image_uri in zip(
        table.column("item_id").to_pylist(), table.column("image_uri").to_pylist(), strict=True
    ):
        yield CatalogItem(item_id, image_uri)
