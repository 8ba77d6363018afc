"""A snapshot's item ids, row ↔ id, without a Python object per item.

The ids stay one Arrow string array, and an id's row is found through its 64-bit FNV-1a hash among the sorted
hashes of all of them: 39 bytes an item of 18 characters, where a list and a dict of Python strings took 192
(BENCHMARKS.md "A snapshot's item ids"). At tens of millions of items that is gigabytes per snapshot, and a
refresh holds two. Hashes are confirmed against the ids themselves, so a collision costs a comparison, never a
wrong row.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = ["ItemIds", "fnv1a64", "sorted_positions"]

_OFFSET = 0xCBF29CE484222325
_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1
_FEW = 16  # below this many ids, hashing them one by one in Python beats numpy's per-call costs
LOOKUP_COLUMNS = ("item_id", "hash", "row")  # `ItemIds.write_lookup`'s file: rows in order, hashes sorted


def _fnv1a64_one(item_id: str) -> int:
    h = _OFFSET
    for byte in item_id.encode("utf-8", "surrogatepass"):  # a lone surrogate matches no stored id, and fails nothing
        h = ((h ^ byte) * _PRIME) & _MASK
    return h


def fnv1a64(item_ids: pa.Array | pa.ChunkedArray | Sequence[str]) -> np.ndarray:
    """64-bit FNV-1a of each id's UTF-8 bytes, as uint64. Stable across processes and machines (unlike `hash`).

    Vectorised over the Arrow buffers: step j hashes the j-th byte of every id at least j+1 bytes long, the ids
    ordered longest first so that those are a prefix and each step works on contiguous arrays."""
    if not isinstance(item_ids, pa.Array | pa.ChunkedArray):
        if len(item_ids) < _FEW:
            return np.array([_fnv1a64_one(i) for i in item_ids], dtype=np.uint64)
        item_ids = pa.array([i.encode("utf-8", "surrogatepass") for i in item_ids], pa.large_binary())
    array = _one_array(item_ids)
    n = len(array)
    wide = array.type in (pa.large_string(), pa.large_binary())
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64 if wide else np.int32)[array.offset :][: n + 1]
    data = np.frombuffer(array.buffers()[2] or b"", dtype=np.uint8)
    lengths = np.diff(offsets)
    longest_first = np.argsort(-lengths, kind="stable")
    descending = lengths[longest_first]
    at = offsets[:-1][longest_first].astype(np.int64)  # where each id's next byte is
    hashes = np.full(n, _OFFSET, dtype=np.uint64)
    prime = np.uint64(_PRIME)
    for j in range(int(descending[0]) if n else 0):
        live = int(np.searchsorted(-descending, -j, side="left"))  # how many ids are longer than j bytes
        h = hashes[:live]
        h ^= data[at[:live]]
        h *= prime  # wraps modulo 2**64, as FNV wants
        at[:live] += 1
    out = np.empty(n, dtype=np.uint64)
    out[longest_first] = hashes
    return out


def sorted_positions(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Each key's index in `sorted_keys` (ascending; the first of equal ones), or -1 where it is absent: one
    vectorised search."""
    if not len(sorted_keys):
        return np.full(len(keys), -1, dtype=np.int64)
    # A key past the end lands on the last element, which it cannot equal (it would have sorted there).
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.where(sorted_keys[at] == keys, at, -1)


def _one_array(item_ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One string array (a chunked one's `take` costs the whole array's length on every call)."""
    if isinstance(item_ids, pa.ChunkedArray):
        if item_ids.num_chunks == 0:
            return pa.array([], pa.string())
        if item_ids.num_chunks > 1 and item_ids.nbytes >= 2**31 - 2**20:  # past 32-bit string offsets
            item_ids = item_ids.cast(pa.large_string())
        item_ids = item_ids.combine_chunks()
    if item_ids.type not in (pa.string(), pa.large_string(), pa.large_binary()):
        raise ValueError(f"item ids must be strings, got {item_ids.type}")
    if item_ids.null_count:
        raise ValueError(f"{item_ids.null_count} item id(s) are null")
    return item_ids


class ItemIds:
    """Row → item id and item id → row for a snapshot's ids (unique, as the index build ensures).

    `write_lookup` saves the ids with their sorted hashes and rows as an Arrow file (a snapshot's
    `ids.lookup.arrow`), and `open_lookup` maps it: nothing hashed or sorted at load, and nothing of it in the
    process's own memory (the page cache's pages, shared by every process serving the snapshot)."""

    def __init__(self, item_ids: pa.Array | pa.ChunkedArray | Sequence[str],
                 _lookup: tuple[np.ndarray, np.ndarray, object] | None = None) -> None:  # fmt: skip
        if not isinstance(item_ids, pa.Array | pa.ChunkedArray):
            item_ids = pa.array(list(item_ids), pa.large_string())
        self._ids = _one_array(item_ids)
        wide = self._ids.type in (pa.large_string(), pa.large_binary())
        offsets = np.frombuffer(self._ids.buffers()[1], dtype=np.int64 if wide else np.int32)
        self._offsets = offsets[self._ids.offset :][: len(self._ids) + 1]  # views of the array's buffers, for
        self._data = memoryview(self._ids.buffers()[2] or b"")  # reading a few ids at ~0.3 µs, not as_py's 0.7
        if _lookup is not None:  # sorted hashes and their rows as saved, and the map they lie in
            self._sorted, self._by_hash, self._map = _lookup
            return
        hashes = fnv1a64(self._ids)
        order = np.argsort(hashes, kind="stable")
        self._sorted = hashes[order]
        self._by_hash = order.astype(np.int32 if len(order) < 2**31 else np.int64)  # rows: 4 bytes an item
        self._map = None

    @classmethod
    def read(cls, path: str | Path) -> ItemIds:
        """The `item_id` column of a Parquet file (a snapshot's `ids.parquet`), hashed and sorted here."""
        held = cls(pq.read_table(path, columns=["item_id"]).column("item_id"))
        pa.default_memory_pool().release_unused()  # the file's chunks, joined into one array: their memory back
        return held

    def write_lookup(self, path: str | Path) -> None:
        """The ids, their sorted hashes and each hash's row, as one record batch of an Arrow file (`open_lookup`)."""
        table = pa.table({LOOKUP_COLUMNS[0]: self._ids, LOOKUP_COLUMNS[1]: self._sorted,
                          LOOKUP_COLUMNS[2]: self._by_hash})  # fmt: skip
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_batch(table.combine_chunks().to_batches()[0] if len(table) else
                               pa.RecordBatch.from_pylist([], schema=table.schema))  # fmt: skip

    @classmethod
    def open_lookup(cls, path: str | Path) -> ItemIds:
        """`write_lookup`'s file, mapped: its arrays read where they lie in the file, not copied.

        Raises:
            ValueError: not such a file (other columns, other kinds, more than one batch).
        """
        mapped = pa.memory_map(str(path))
        reader = pa.ipc.open_file(mapped)
        if reader.schema.names != list(LOOKUP_COLUMNS) or reader.num_record_batches != 1:
            raise ValueError(f"{path} is not an id lookup: columns {reader.schema.names}, "
                             f"{reader.num_record_batches} batches")  # fmt: skip
        batch = reader.get_batch(0)
        ids, hashes, rows = batch.columns
        if hashes.type != pa.uint64() or rows.type not in (pa.int32(), pa.int64()) or hashes.null_count:
            raise ValueError(f"{path} is not an id lookup: {batch.schema}")
        return cls(ids, (hashes.to_numpy(zero_copy_only=True), rows.to_numpy(zero_copy_only=True), mapped))

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and self.row(item_id) is not None

    def row(self, item_id: str) -> int | None:
        """The id's row, or None when the snapshot does not hold it."""
        found = self._row(item_id)
        return None if found < 0 else found

    def rows(self, item_ids: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Each id's row (int64), -1 where the snapshot does not hold it (as for anything not a string, or null)."""
        if isinstance(item_ids, pa.Array | pa.ChunkedArray):
            return self._rows_of_array(item_ids)
        asked = list(item_ids)
        if len(asked) < _FEW or not len(self._sorted):
            return np.array([self._row(i) for i in asked], dtype=np.int64)
        at = sorted_positions(self._sorted, fnv1a64([i if isinstance(i, str) else "" for i in asked]))
        out = np.where(at >= 0, self._by_hash[at], -1)  # the first row of each hash held
        hit = np.flatnonzero(out >= 0)
        for i, held in zip(hit.tolist(), self.ids(out[hit]), strict=True):
            if held != asked[i]:  # another id with the same hash (or a non-string's stand-in): look again, alone
                out[i] = self._row(asked[i])
        return out

    def _rows_of_array(self, item_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """`rows` of an Arrow array of ids, its hits confirmed against the held ids in Arrow rather than one by
        one (a million ids: no Python string made)."""
        asked = _one_array(pc.fill_null(item_ids.cast(pa.large_string()), ""))  # a null: no row (below)
        if not len(self._sorted):
            return np.full(len(asked), -1, dtype=np.int64)
        at = sorted_positions(self._sorted, fnv1a64(asked))
        out = np.where(at >= 0, self._by_hash[at], -1).astype(np.int64)
        hit = np.flatnonzero(out >= 0)
        held = self._ids.take(pa.array(out[hit])).cast(pa.large_string())
        same = pc.equal(held, asked.take(pa.array(hit))).to_numpy(zero_copy_only=False)
        for i in hit[~same].tolist():  # another id with the same hash: look again, alone
            out[i] = self._row(asked[i].as_py())
        if item_ids.null_count:
            out[np.asarray(pc.is_null(item_ids).to_numpy(zero_copy_only=False), dtype=bool)] = -1
        return out

    def _row(self, item_id: object) -> int:
        if not isinstance(item_id, str):
            return -1
        h = np.uint64(_fnv1a64_one(item_id))
        at = int(self._sorted.searchsorted(h))
        while at < len(self._sorted) and self._sorted[at] == h:  # more than one row only where hashes collide
            row = int(self._by_hash[at])
            if self._id(row) == item_id:
                return row
            at += 1
        return -1

    def ids(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """The ids at these rows."""
        if len(rows) < _FEW:
            return [self._id(r) for r in rows]
        return self._ids.take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()

    def _id(self, row: int) -> str:
        return str(self._data[self._offsets[row] : self._offsets[row + 1]], "utf-8")

    @property
    def nbytes(self) -> int:
        """Memory held: the ids' Arrow buffers, the sorted hashes and their rows."""
        return self._ids.nbytes + self._sorted.nbytes + self._by_hash.nbytes
