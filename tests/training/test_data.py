import numpy as np
import pytest

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


def test_learning_rate_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, warmup=4, total=20) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))
    assert lr_factor(20, warmup=4, total=20) == pytest.approx(0.0)
