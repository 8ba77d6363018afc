"""What evaluation needs from the catalog: titles, categories and image URIs per item, and tables from files."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from encoder import storage, tables
from encoder.configs import DecodeLimits

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["CatalogInfo", "catalog_image", "read_catalog_info", "read_table"]


def read_table(uri: str, string_columns: tuple[str, ...] = (), columns: tuple[str, ...] | None = None) -> pa.Table:
    """A Parquet, CSV or JSON-lines file (local or gs://) as a table (`encoder.tables.table_from_bytes`): with
    `columns`, only those of them it has.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown format or an unreadable file.
    """
    suffix = os.path.splitext(uri)[1].lower()
    if suffix not in tables.TABLE_FORMATS:
        raise ValueError(f"{uri}: unknown format {suffix!r}; use .parquet, .csv or .jsonl")
    data = storage.read_bytes(uri)
    try:
        return tables.table_from_bytes(data, tables.TABLE_FORMATS[suffix], string_columns, columns)
    except Exception as err:  # noqa: BLE001 - reader errors vary; the caller names the file
        raise ValueError(f"cannot read {uri}: {type(err).__name__}: {err}") from err


def catalog_image(uri: str, draft: int) -> Image.Image:
    """A catalog image for the report's thumbnails and the pixel baseline, in RGB, decoded at reduced scale where
    its format allows (`draft`: the least side wanted), under the embed step's bounds: its bytes capped at the
    headers, its pixels counted before they are decoded (a huge PNG had each of the baseline's threads decode it
    whole).

    Raises:
        ValueError: past the bounds. Whatever reading or decoding raises.
    """
    from PIL import Image  # here: a command's settings are checked without PIL's import (benchmarks/config_check.py)

    limits = DecodeLimits()
    image = Image.open(io.BytesIO(storage.read_bytes(uri, limits.max_bytes)))
    if image.width * image.height > limits.max_pixels:
        raise ValueError(f"{image.width}x{image.height} is over {limits.max_pixels:,} pixels")
    image.draft("RGB", (draft, draft))
    return image.convert("RGB")


class CatalogInfo:
    """Titles, categories and absolute image URIs by item id, held as Arrow columns and the ids' hashes
    (`indexing.item_ids.ItemIds`): a marketplace's catalog costs its bytes, not a Python object a field (2M items:
    397 MiB held, where three dicts held 1.4 GiB). An id listed twice: its first row."""

    COLUMNS = ("item_id", "image_uri", "title", "category")

    def __init__(self, table: pa.Table) -> None:
        from indexing.item_ids import ItemIds

        self.table = table.select(list(self.COLUMNS)).combine_chunks()
        self._ids = ItemIds(self.table.column("item_id"))  # an id's lookup finds its first row

    @classmethod
    def from_dicts(cls, titles: dict[str, str], categories: dict[str, str], image_uris: dict[str, str]
                   ) -> CatalogInfo:  # fmt: skip
        """A catalog given by hand (tests): each item id's fields from the dicts that name it."""
        ids = sorted({*titles, *categories, *image_uris})
        return cls(pa.table({"item_id": pa.array(ids, pa.string()),
                             "image_uri": pa.array([image_uris.get(i) for i in ids], pa.string()),
                             "title": pa.array([titles.get(i) for i in ids], pa.string()),
                             "category": pa.array([categories.get(i) for i in ids], pa.string())}))  # fmt: skip

    @property
    def has_categories(self) -> bool:
        return self.table.column("category").null_count < self.table.num_rows

    def _field(self, name: str, item_ids: Sequence[str]) -> list[str | None]:
        rows = self._ids.rows(item_ids)
        return self.table.column(name).take(pa.array(rows, mask=rows < 0)).to_pylist()  # an unknown id: None

    def titles_of(self, item_ids: Sequence[str]) -> list[str | None]:
        return self._field("title", item_ids)

    def categories_of(self, item_ids: Sequence[str]) -> list[str | None]:
        return self._field("category", item_ids)

    def image_uris_of(self, item_ids: Sequence[str]) -> list[str | None]:
        return [uri or None for uri in self._field("image_uri", item_ids)]  # "": no image

    def images(self) -> list[tuple[str, str]]:
        """(item_id, image URI) of every item with an image (an id's first row), in order of their ids."""
        encoded = pc.dictionary_encode(self.table.column("item_id")).combine_chunks()
        first = np.unique(encoded.indices.to_numpy(zero_copy_only=False), return_index=True)[1]
        table = self.table.take(pa.array(first))
        table = table.filter(pc.fill_null(pc.not_equal(table.column("image_uri"), ""), False))
        table = table.take(pc.sort_indices(table.column("item_id")))
        return list(zip(table.column("item_id").to_pylist(), table.column("image_uri").to_pylist(), strict=True))


def read_catalog_info(uri: str, max_items: int | None = None, too_many: str = "") -> CatalogInfo:
    """Titles, categories and absolute image URIs by item id from a catalog manifest (its other columns unread).

    Raises:
        ValueError: no item_id column; more than `max_items` rows (`too_many` says why that matters), found before
            anything is built from them.
    """
    catalog = CatalogInfo(_catalog_table(uri, max_items, too_many))
    pa.default_memory_pool().release_unused()  # the file's bytes and the columns' first forms, now unused: 2M items
    return catalog  # held 650 MiB without this, 400 with it


def _catalog_table(uri: str, max_items: int | None, too_many: str) -> pa.Table:
    table = read_table(uri, string_columns=("item_id", "image_uri"),
                       columns=("item_id", "image_uri", "title", "category"))  # fmt: skip
    if "item_id" not in table.column_names:
        raise ValueError(f"catalog {uri} lacks an item_id column")
    if max_items is not None and table.num_rows > max_items:
        raise ValueError(f"catalog {uri} has {table.num_rows:,} items, more than {max_items:,}: {too_many}")
    what = f"catalog {uri}"
    ids = tables.text_column(table, "item_id", what)

    def column(name: str) -> pa.ChunkedArray | pa.Array:
        text = tables.text_column(table, name, what)
        return pa.nulls(table.num_rows, pa.string()) if text is None else text

    uris = tables.text_column(table, "image_uri", what)
    resolved = (
        pa.nulls(table.num_rows, pa.string()) if uris is None else storage.resolve_all(storage.parent_dir(uri), uris)
    )
    table = pa.table({"item_id": ids, "image_uri": resolved, "title": column("title"), "category": column("category")})
    return table.filter(pc.is_valid(ids)) if ids.null_count else table  # a row without an id names nothing
