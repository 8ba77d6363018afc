"""Batches of (image, title tokens) for training: deterministic order, augmentation and sharding.

Which items form global batch b of epoch e, and how each image is augmented, depend
only on (seed, e, b): not on the number of processes, data-loader workers or where a
run was interrupted. That is what makes `--resume` exact and a 2-process run take the
same steps as a 1-process run on the same global batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from encoder import storage
from encoder.preprocess import DecodeLimits, PreprocessConfig, decode_image
from training.pairs import READ_THREADS

__all__ = ["EpochBatches", "PairDataset", "augment", "augment_seed", "augment_size", "decode_all", "steps_per_epoch"]

log = logging.getLogger(__name__)

_CROP_MARGIN = 1.15  # decode this much larger, then crop back: random resized crop at 85–100% of the side
_MIN_CROP_SIDE = 0.85


def steps_per_epoch(pairs: int, batch_size: int) -> int:
    """Full global batches per epoch; the remainder of a shuffled epoch is left out."""
    return pairs // batch_size


def augment_seed(seed: int, epoch: int, position: int) -> int:
    """Seed of the augmentation of the `position`-th sample of `epoch`."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1, np.uint64)[0])


class EpochBatches:
    """This process's share of each global batch of one epoch, from a given step on.

    Yields lists of (pair index, augmentation seed); a `DataLoader` batch_sampler.
    """

    def __init__(self, pairs: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1,
                 start_step: int = 0, augment: bool = True) -> None:  # fmt: skip
        if batch_size % world:
            raise ValueError(f"global batch_size {batch_size} must be a multiple of the process count {world}")
        self.pairs, self.batch_size, self.seed, self.epoch = pairs, batch_size, seed, epoch
        self.rank, self.world, self.start_step, self.augment = rank, world, start_step, augment

    def __len__(self) -> int:
        return max(0, steps_per_epoch(self.pairs, self.batch_size) - self.start_step)

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.pairs)
        share = self.batch_size // self.world
        for step in range(self.start_step, steps_per_epoch(self.pairs, self.batch_size)):
            first = step * self.batch_size + self.rank * share
            yield [
                (int(order[p]), augment_seed(self.seed, self.epoch, p) if self.augment else None)
                for p in range(first, first + share)
            ]


class PairDataset(torch.utils.data.Dataset):
    """Pair index (+ augmentation seed) → (uint8 image (h, w, 3), token ids (L,), unreadable flag).

    An image that was fine when the pairs were checked but cannot be read now (deleted,
    rewritten) is replaced by the next pair in the list, so the batch keeps its size;
    the flag lets the training loop count how often that happened.
    """

    def __init__(self, image_uris: Sequence[str] | pa.Array | pa.ChunkedArray, input_ids: np.ndarray,
                 preprocess: PreprocessConfig, limits: DecodeLimits = DecodeLimits(),
                 decoded: np.ndarray | None = None) -> None:  # fmt: skip
        """`decoded`: optional (n, h', w', 3) uint8 from `decode_all`, used instead of reading the files."""
        if len(image_uris) != len(input_ids) or (decoded is not None and len(decoded) != len(image_uris)):
            raise ValueError(f"{len(image_uris)} images, {len(input_ids)} token rows, "
                             f"{len(decoded) if decoded is not None else '-'} decoded images")  # fmt: skip
        # One Arrow array, not a Python string per pair: a loader process reading a list's strings writes their
        # reference counts, so each process came to hold its own copy of the list's pages (benchmarks/loader_memory.py).
        if isinstance(image_uris, pa.ChunkedArray):
            image_uris = image_uris.combine_chunks()
        self._image_uris = image_uris if isinstance(image_uris, pa.Array) else pa.array(list(image_uris), pa.string())
        self.input_ids, self.preprocess, self.limits, self.decoded = input_ids, preprocess, limits, decoded

    def __len__(self) -> int:
        return len(self._image_uris)

    def image_uri(self, row: int) -> str:
        return self._image_uris[row].as_py()

    def __getitem__(self, key: int | tuple[int, int | None]):
        return self._item(*_index_and_seed(key))

    def __getitems__(self, keys: list) -> list:
        """A batch's items (the DataLoader's batched fetch), their images read at once on `READ_THREADS` threads,
        then decoded in order. A read that fails is tried again alone, which says why and takes the next pair."""
        if self.decoded is not None or len(keys) < 2:
            return [self[key] for key in keys]
        wanted = [_index_and_seed(key) for key in keys]
        read = list(_readers().map(self._read_or_none, [index for index, _ in wanted]))
        return [self._item(index, seed, data) for (index, seed), data in zip(wanted, read, strict=True)]

    def _item(self, index: int, seed: int | None, data: bytes | None = None):
        for attempt in range(len(self)):
            row = (index + attempt) % len(self)
            try:
                image = self._load(row, seed, data if attempt == 0 else None)
            except Exception as err:  # noqa: BLE001 - counted by the loop; the pair is replaced, not lost silently
                log.warning("image %s unreadable during training (%s); using the next pair", self.image_uri(row), err)
                continue
            return torch.from_numpy(image), torch.from_numpy(self.input_ids[row]), attempt > 0
        raise RuntimeError("no image in the training set can be read any more")

    def _read(self, row: int) -> bytes:
        return storage.read_bytes(self.image_uri(row), self.limits.max_bytes)

    def _read_or_none(self, row: int) -> bytes | None:
        try:
            return self._read(row)
        except Exception:  # noqa: BLE001 - read again alone by `_item`, which reports it
            return None

    def _load(self, row: int, seed: int | None, data: bytes | None = None) -> np.ndarray:
        if self.decoded is not None:
            pixels = self.decoded[row]
            return _resize(pixels, self.preprocess) if seed is None else _crop_and_flip(
                pixels, self.preprocess, np.random.default_rng(seed))  # fmt: skip
        if data is None:
            data = self._read(row)
        if seed is None:
            return decode_image(data, self.preprocess, self.limits)
        return augment(data, self.preprocess, np.random.default_rng(seed), self.limits)


def _index_and_seed(key: int | tuple[int, int | None]) -> tuple[int, int | None]:
    return key if isinstance(key, tuple) else (key, None)


_READERS: tuple[int, ThreadPoolExecutor] | None = None  # (the process it belongs to, its threads)


def _readers() -> ThreadPoolExecutor:
    """This process's read threads: a data-loading process forked from one that had them makes its own."""
    global _READERS
    if _READERS is None or _READERS[0] != os.getpid():
        _READERS = (os.getpid(), ThreadPoolExecutor(READ_THREADS, thread_name_prefix="pair-read"))
    return _READERS[1]


def augment_size(preprocess: PreprocessConfig) -> PreprocessConfig:
    """The slightly larger decode that random resized crops are cut from."""
    return replace(preprocess, height=round(preprocess.height * _CROP_MARGIN),
                   width=round(preprocess.width * _CROP_MARGIN))  # fmt: skip


def decode_all(image_uris: Sequence[str], preprocess: PreprocessConfig, limits: DecodeLimits = DecodeLimits(),
               threads: int = READ_THREADS) -> np.ndarray:  # fmt: skip
    """Every image decoded once at `augment_size`: (n, h', w', 3) uint8, for catalogs that fit in memory.

    Raises:
        ImageDecodeError, OSError: an image that was checked before cannot be read now.
    """
    size = augment_size(preprocess)
    out = np.empty((len(image_uris), size.height, size.width, 3), dtype=np.uint8)

    def fill(row: int) -> None:
        out[row] = decode_image(storage.read_bytes(image_uris[row], limits.max_bytes), size, limits)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fill, range(len(image_uris))))
    return out


def _resize(pixels: np.ndarray, preprocess: PreprocessConfig) -> np.ndarray:
    image = Image.fromarray(pixels).resize((preprocess.width, preprocess.height), resample=preprocess.resample)
    return np.array(image, dtype=np.uint8)


def augment(data: bytes, preprocess: PreprocessConfig, rng: np.random.Generator,
            limits: DecodeLimits = DecodeLimits()) -> np.ndarray:  # fmt: skip
    """Light augmentation that keeps what makes two listings alike (colour, pattern, shape).

    Random resized crop (85–100% of each side of a slightly larger decode) and a
    horizontal flip half the time; no colour changes, since colour is a product attribute.

    Returns:
        (height, width, 3) uint8, like `decode_image`.
    """
    return _crop_and_flip(decode_image(data, augment_size(preprocess), limits), preprocess, rng)


def _crop_and_flip(pixels: np.ndarray, preprocess: PreprocessConfig, rng: np.random.Generator) -> np.ndarray:
    """Random resized crop of an `augment_size` image back to the model's size, flipped half the time."""
    height, width = pixels.shape[:2]
    side = rng.uniform(_MIN_CROP_SIDE, 1.0)
    ch, cw = max(1, round(height * side)), max(1, round(width * side))
    y, x = int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1))
    crop = Image.fromarray(pixels[y : y + ch, x : x + cw]).resize(
        (preprocess.width, preprocess.height), resample=preprocess.resample
    )
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(crop, dtype=np.uint8)
