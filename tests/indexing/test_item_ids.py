"""A snapshot's item ids held as Arrow strings and sorted 64-bit hashes (`indexing.item_ids`)."""

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from indexing import item_ids as item_ids_module
from indexing.item_ids import ItemIds, fnv1a64


def _random_ids(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcXYZ019-_/é漢😀"
    ids = {"".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 3, 8, 20, 21, 64, 300]))) for _ in range(n)}
    return sorted(ids)


def test_the_hash_is_fnv1a_64_as_published():
    # The published test vectors of 64-bit FNV-1a.
    assert fnv1a64(["", "a", "foobar"]).tolist() == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8]


def test_the_vectorised_hash_equals_the_one_by_one_hash():
    ids = _random_ids(3000)
    one_by_one = np.concatenate([fnv1a64(ids[i : i + 5]) for i in range(0, len(ids), 5)])  # below the numpy cut
    vectorised = fnv1a64(pa.array(ids))  # string, not large_string: cast
    assert vectorised.dtype == np.uint64 and np.array_equal(vectorised, one_by_one)
    sliced = pa.chunked_array([pa.array(ids[:1000]), pa.array(["pad"] + ids[1000:])[1:]])  # offsets past zero
    assert np.array_equal(fnv1a64(sliced), one_by_one)


def test_each_id_finds_its_row_and_each_row_its_id(tmp_path):
    ids = _random_ids(5000, seed=1)
    pq.write_table(pa.table({"item_id": ids}), tmp_path / "ids.parquet")
    held = ItemIds.read(tmp_path / "ids.parquet")
    assert len(held) == len(ids)
    shuffled = random.Random(2).sample(range(len(ids)), len(ids))
    assert held.rows([ids[r] for r in shuffled]).tolist() == shuffled
    asked = pa.chunked_array([pa.array([ids[r] for r in shuffled[:2000]]), pa.array([ids[r] for r in shuffled[2000:]])])
    assert held.rows(asked).tolist() == shuffled  # an Arrow array's ids confirmed in Arrow
    assert held.ids(shuffled) == [ids[r] for r in shuffled]
    assert held.ids(shuffled[:3]) == [ids[r] for r in shuffled[:3]]
    assert all(held.row(ids[r]) == r for r in shuffled[:50])


def test_ids_not_held_and_things_not_ids_have_no_row():
    held = ItemIds(["sku-1", "sku-2", ""])
    asked = ["sku-3", "sku-2", None, 7, "sku-1 ", "\udcff", ""]
    assert held.rows(asked).tolist() == [-1, 1, -1, -1, -1, -1, 2]
    assert held.row("sku-9") is None and "sku-1" in held and "sku-9" not in held and 1 not in held
    assert held.rows([]).tolist() == []
    assert held.rows(asked * 3).tolist() == [-1, 1, -1, -1, -1, -1, 2] * 3  # hashed by numpy, not one by one
    in_arrow = pa.array(["sku-3", "sku-2", None, "sku-1 ", ""] * 4, pa.large_string())
    assert held.rows(in_arrow).tolist() == [-1, 1, -1, -1, 2] * 4  # a null is no id, though "" is one
    assert ItemIds(pa.array([], pa.string())).rows(in_arrow).tolist() == [-1] * 20


def test_ids_that_share_a_hash_are_told_apart_by_the_ids_themselves(monkeypatch):
    monkeypatch.setattr(item_ids_module, "fnv1a64", lambda ids: np.full(len(ids), 42, dtype=np.uint64))
    monkeypatch.setattr(item_ids_module, "_fnv1a64_one", lambda item_id: 42)
    ids = [f"sku-{i}" for i in range(40)]
    held = ItemIds(ids)
    assert held.rows(ids[::-1] + ["sku-40"]).tolist() == list(range(39, -1, -1)) + [-1]  # numpy's way
    assert held.rows(pa.array(ids[::-1] + ["sku-40"])).tolist() == list(range(39, -1, -1)) + [-1]  # Arrow's
    assert held.rows(["sku-7", "sku-40", "sku-0"]).tolist() == [7, -1, 0]  # one by one
    assert held.row("sku-39") == 39


def test_null_ids_are_refused():
    with pytest.raises(ValueError, match="1 item id"):
        ItemIds(pa.array(["a", None]))


def test_an_empty_set_of_ids():
    held = ItemIds(pa.chunked_array([], pa.string()))
    assert len(held) == 0 and held.rows(["a"]).tolist() == [-1] and held.ids([]) == []


def test_the_ids_take_a_fraction_of_the_memory_of_python_strings():
    ids = [f"sku-{i:012d}-m" for i in range(50_000)]  # 18 characters, as many catalogs' are
    held = ItemIds(ids)
    # Arrow's 18 bytes and 8-byte offset, the 8-byte hash and its 4-byte row: 38 bytes an item.
    assert held.nbytes <= 40 * len(ids)


def _mapped(path) -> bool:
    target = str(path.resolve())
    return any(line.rstrip().endswith(target) for line in open("/proc/self/maps"))


def test_a_saved_lookup_is_mapped_and_finds_what_the_ids_hashed_here_find(tmp_path, monkeypatch):
    """A serving process maps the lookup its snapshot's build saved: nothing hashed or sorted at load (2.5 s for
    5M ids here, ~15 s at 30M), nothing copied into its own memory."""
    ids = _random_ids(5000, seed=3)  # ~3,700 distinct, of 0 to 300 characters
    ItemIds(pa.chunked_array([ids[:2000], ids[2000:]])).write_lookup(tmp_path / "ids.lookup.arrow")
    monkeypatch.setattr(item_ids_module, "fnv1a64", lambda ids: pytest.fail("hashed every id at load"))
    held = ItemIds.open_lookup(tmp_path / "ids.lookup.arrow")
    assert _mapped(tmp_path / "ids.lookup.arrow") and len(held) == len(ids)
    monkeypatch.undo()
    asked = random.Random(4).sample(ids, 300) + ["not-held", ""]
    assert held.rows(asked).tolist() == ItemIds(ids).rows(asked).tolist()
    assert held.ids([0, len(ids) - 1, 17]) == [ids[0], ids[-1], ids[17]] and held.row(ids[123]) == 123

    ItemIds([]).write_lookup(tmp_path / "empty.arrow")
    assert len(ItemIds.open_lookup(tmp_path / "empty.arrow")) == 0
    pa.ipc.new_file(tmp_path / "other.arrow", pa.schema([("item_id", pa.string())])).close()
    with pytest.raises(ValueError, match="is not an id lookup: columns"):
        ItemIds.open_lookup(tmp_path / "other.arrow")
