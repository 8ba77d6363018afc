"""What evaluation needs from the catalog: titles, categories and image URIs per item, and tables from files."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

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


@dataclass(frozen=True)
class CatalogInfo:
    titles: dict[str, str]
    categories: dict[str, str]
    image_uris: dict[str, str]


def read_catalog_info(uri: str, max_items: int | None = None, too_many: str = "") -> CatalogInfo:
    """Titles, categories and absolute image URIs by item id from a catalog manifest (its other columns unread).

    Raises:
        ValueError: no item_id column; more than `max_items` rows (`too_many` says why that matters), found before
            a Python object is made for any of them.
    """
    table = read_table(uri, string_columns=("item_id", "image_uri"),
                       columns=("item_id", "image_uri", "title", "category"))  # fmt: skip
    if "item_id" not in table.column_names:
        raise ValueError(f"catalog {uri} lacks an item_id column")
    if max_items is not None and table.num_rows > max_items:
        raise ValueError(f"catalog {uri} has {table.num_rows:,} items, more than {max_items:,}: {too_many}")
    ids = tables.text_column(table, "item_id", f"catalog {uri}").to_pylist()

    def column(name: str) -> list:
        text = tables.text_column(table, name, f"catalog {uri}")
        return [None] * len(ids) if text is None else text.to_pylist()

    uris = tables.text_column(table, "image_uri", f"catalog {uri}")
    resolved = [""] * len(ids) if uris is None else storage.resolve_all(storage.parent_dir(uri), uris).to_pylist()
    return CatalogInfo(
        titles={i: t for i, t in zip(ids, column("title"), strict=True) if t is not None},
        categories={i: c for i, c in zip(ids, column("category"), strict=True) if c is not None},
        image_uris={i: u for i, u in zip(ids, resolved, strict=True) if u},  # an empty URI: no image
    )
