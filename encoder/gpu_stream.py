"""Overlap decode and encode on one GPU: batches of encoded images in, vectors out.

A producer thread decodes and resizes batch i+1 on a side CUDA stream (`GpuImages`)
while the model encodes batch i on the default stream; at most `prefetch` decoded
batches wait in between, so memory stays bounded. An event orders each batch's decode
before its encode, and `record_stream` keeps the allocator from reusing a batch's
memory while the model still reads it. On the CPU the same code runs without streams
(tests/encoder/test_gpu_stream.py).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from encoder.gpu_images import GpuImages
from encoder.model import ImageEncoder

__all__ = ["StreamBatch", "embed_stream"]

_DONE = object()


@dataclass
class StreamBatch:
    """One input batch's outcome: vectors for `keys` (input order), failures with reasons."""

    keys: list[Hashable]
    vectors: np.ndarray  # (len(keys), dim) float32, L2-normalised
    failed: list[tuple[Hashable, str]]
    on_gpu: int  # images decoded by the GPU decoder (the rest by the CPU fallback)


def embed_stream(encoder: ImageEncoder, images: GpuImages, batches: Iterable[tuple[Sequence[Hashable], Sequence[bytes]]],
                 prefetch: int = 2) -> Iterator[StreamBatch]:  # fmt: skip
    """Embed (keys, encoded images) batches in order, decoding ahead of the model."""
    ready: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    cuda = images.device.type == "cuda"
    side = torch.cuda.Stream(images.device) if cuda else None

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for keys, datas in batches:
                with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                    prepared = images.prepare(datas)
                    event = torch.cuda.Event() if side is not None else None
                    if event is not None:
                        event.record(side)
                if not put((list(keys), prepared, event)):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            put(err)
            return
        put(_DONE)

    producer = threading.Thread(target=produce, name="gpu-decode", daemon=True)
    producer.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            keys, prepared, event = item
            if event is not None:
                main = torch.cuda.current_stream(images.device)
                main.wait_event(event)
                prepared.pixels.record_stream(main)
            vectors = encoder.embed_prepared(prepared.pixels)
            yield StreamBatch([keys[i] for i in prepared.kept], vectors,
                              [(keys[i], reason) for i, reason in prepared.failed], prepared.on_gpu)  # fmt: skip
    finally:
        stop.set()
        producer.join(timeout=5)
