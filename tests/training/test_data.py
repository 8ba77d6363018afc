import os

import numpy as np
import pytest
import torch

from encoder.preprocess import PreprocessConfig, decode_image
from training.data import EpochBatches, PairDataset, augment, steps_per_epoch
from training.towers import lr_factor


def _batches(**kwargs) -> list[list[tuple[int, int | None]]]:
    return list(EpochBatches(50, 8, seed=3, epoch=1, **kwargs))


def test_global_batches_do_not_depend_on_the_process_count():
    single = _batches()
    shares = [_batches(rank=r, world=4) for r in range(4)]
    assert len(single) == steps_per_epoch(50, 8) == 6
    for step, batch in enumerate(single):
        assert [key for share in shares for key in share[step]] == batch


def test_resuming_mid_epoch_continues_with_the_same_batches():
    assert _batches(start_step=4) == _batches()[4:]
    assert len(EpochBatches(50, 8, seed=3, epoch=1, start_step=4)) == 2


def test_epochs_shuffle_differently_and_each_batch_has_distinct_items():
    first, second = (list(EpochBatches(50, 8, seed=3, epoch=e)) for e in (0, 1))
    assert first != second
    for batch in first:
        assert len({index for index, _ in batch}) == 8
    assert all(seed is None for batch in EpochBatches(50, 8, seed=3, epoch=0, augment=False) for _, seed in batch)


def test_batch_must_split_evenly_over_processes():
    with pytest.raises(ValueError, match="multiple of the process count 3"):
        EpochBatches(50, 8, seed=0, epoch=0, world=3)


def test_augmentation_is_a_function_of_its_seed(demo_catalog):
    data = next(p for p in sorted((demo_catalog.root / "images").glob("*.jpg"))).read_bytes()
    cfg = PreprocessConfig(height=64, width=64)
    a, b = (augment(data, cfg, np.random.default_rng(s)) for s in (1, 1))
    c = augment(data, cfg, np.random.default_rng(2))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    plain = decode_image(data, cfg)
    assert np.abs(a.astype(int) - plain).mean() < 60  # the same product, a little cropped or flipped


def test_dataset_replaces_an_image_that_became_unreadable(tmp_path, demo_catalog):
    good = next(p for p in sorted((demo_catalog.root / "images").glob("*.jpg")))
    gone = tmp_path / "deleted.jpg"
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    dataset = PairDataset([str(gone), str(good)], ids, PreprocessConfig(height=32, width=32))
    pixels, tokens, replaced = dataset[(0, 5)]
    assert replaced and tokens.tolist() == [3, 4, 5]  # the next pair, image and title together
    assert tuple(pixels.shape) == (32, 32, 3)
    assert dataset[1][2] is False


def test_a_batch_read_at_once_equals_its_items_read_one_at_a_time(tmp_path, demo_catalog, monkeypatch):
    """A loader process reads a batch's images on threads (`__getitems__`): the same pixels, tokens and replacements
    as item by item, a read that fails there tried again alone (and replaced); a huge object is never read whole."""
    from encoder import storage
    from training import data as training_data

    photos = [str(p) for p in sorted((demo_catalog.root / "images").glob("*.jpg"))[:6]]
    cap = max(os.path.getsize(p) for p in photos)
    huge = tmp_path / "huge.jpg"
    huge.write_bytes(b"\xff\xd8" + b"0" * cap)
    uris = [photos[0], str(tmp_path / "gone.jpg"), *photos[1:4], str(huge), photos[4]]
    ids = np.arange(len(uris) * 2, dtype=np.int64).reshape(len(uris), 2)
    dataset = PairDataset(uris, ids, PreprocessConfig(height=32, width=32), limits=training_data.DecodeLimits(
        max_bytes=cap))  # fmt: skip
    keys = [(i, 100 + i) for i in range(len(uris))] + [3]
    reads = []
    read = storage.read_bytes
    monkeypatch.setattr(
        storage, "read_bytes", lambda uri, max_bytes=None: (reads.append(max_bytes), read(uri, max_bytes))[1]
    )
    together = dataset.__getitems__(keys)
    alone = [dataset[key] for key in keys]
    assert set(reads) == {cap}
    for (a_pixels, a_ids, a_replaced), (b_pixels, b_ids, b_replaced) in zip(together, alone, strict=True):
        assert np.array_equal(a_pixels.numpy(), b_pixels.numpy()) and np.array_equal(a_ids.numpy(), b_ids.numpy())
        assert a_replaced == b_replaced
    assert [item[2] for item in together] == [False, True, False, False, False, True, False, False]
    assert together[1][1].tolist() == ids[2].tolist()  # the next pair's image and title together
    batches = torch.utils.data.DataLoader(dataset, batch_sampler=[keys[:4], keys[4:]], num_workers=1)
    assert [b[2].tolist() for b in batches] == [[False, True, False, False], [False, True, False, False]]


def test_learning_rate_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, warmup=4, total=20) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))
    assert lr_factor(20, warmup=4, total=20) == pytest.approx(0.0)
