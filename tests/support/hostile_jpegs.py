"""Damaged JPEGs that the GPU route still takes: the inputs that reach a GPU decoder when a catalog holds broken files."""

from __future__ import annotations

import contextlib
import hashlib

import numpy as np
from hypothesis import strategies as st

from encoder.jpeg import cpu_reason

__all__ = ["GPU_DECODER_KINDS", "JpegBatch", "each_kind", "routed_batches"]

# nvImageCodec's decoders on a GPU, by kind (`encoder.nvimgcodec.BACKENDS`): which one takes an image depends on its
# batch (the hardware engines fail a batch whole when one image fails; the framework hands it to the CUDA decoder).
GPU_DECODER_KINDS = {"hardware engines": ("hardware",), "CUDA decoder": ("hybrid", "gpu")}


class JpegBatch(list):
    """A drawn batch whose repr names each input by kind, size and digest: a falsifying example prints in a few
    lines, not as half a megabyte of bytes."""

    def __repr__(self) -> str:
        def one(data: bytes | np.ndarray) -> str:
            raw = bytes(data)
            return f"{type(data).__name__}[{len(raw):,} B sha256 {hashlib.sha256(raw).hexdigest()[:12]}]"

        return f"JpegBatch([{', '.join(one(data) for data in self)}])"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis' printer asks for this before __repr__
        printer.text(repr(self))


def each_kind(make) -> dict:
    """`make(backends)` for each kind in `GPU_DECODER_KINDS` this GPU has (no JPEG engines: no "hardware engines")."""
    from encoder.nvimgcodec import NvImageCodecError

    made = {}
    for name, backends in GPU_DECODER_KINDS.items():
        with contextlib.suppress(NvImageCodecError):
            made[name] = make(backends)
    return made


@st.composite
def routed_batches(draw, seeds: list[bytes], most: int = 6) -> JpegBatch:
    """Batches of 0 to `most` JPEGs made from `seeds` by byte flips (anywhere, or in the tables and frame and scan
    headers of the first few hundred bytes), insertions, zeroed runs and cuts that keep the end marker, keeping only
    those the route still sends to the GPU decoder (`cpu_reason` None); each as bytes or as a view of a ring, as the
    file readers hand them over."""
    batch = []
    for _ in range(draw(st.integers(1, most))):
        data = bytearray(seeds[draw(st.integers(0, len(seeds) - 1))])
        for _ in range(draw(st.integers(0, 4))):
            kind = draw(st.sampled_from(["flip", "flip-header", "insert", "cut", "zero-run"]))
            at = draw(st.integers(0, len(data) - 1))
            if kind == "flip":
                data[at] ^= draw(st.integers(1, 255))
            elif kind == "flip-header":
                data[at % 700] ^= draw(st.integers(1, 255))
            elif kind == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=32))
            elif kind == "cut":  # the route's end check passes it
                data[at:] = b"\xff\xd9"
            else:
                data[at : at + draw(st.integers(1, 64))] = b"\0" * 8
        if cpu_reason(bytes(data), max_bytes=1 << 24, max_pixels=1 << 26) is None:
            batch.append(np.frombuffer(bytes(data), np.uint8) if draw(st.booleans()) else bytes(data))
    return JpegBatch(batch)
