"""Just enough of a JPEG header to decide where an image is decoded: GPU or CPU.

nvJPEG takes 8-bit Huffman-coded baseline and progressive JPEGs with 1 or 3 colour
components (progressive ones only where the decoder batches them: torchvision's decodes
them one at a time, see `encoder.gpu_images`). Everything else (PNG, WebP, CMYK/YCCK, 12-bit, arithmetic coding, EXIF
rotations that the CPU path applies, oversized images that the CPU path dead-letters
with its reason, files cut off before their end marker, which nvJPEG would fill with
grey) goes to the CPU decoder, one image at a time. Pure Python on the first kilobytes
of the file and its last bytes, so it is cheap and testable without a GPU.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not imported: reader processes start without numpy
    import numpy as np

__all__ = ["PROGRESSIVE_ON_CPU", "JpegHeader", "cpu_reason", "decoded_within", "read_jpeg_header"]

_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_HUFFMAN_8BIT = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RSTn: no length field


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    components: int
    precision: int
    sof: int  # the frame marker: 0xC0 baseline, 0xC2 progressive, ...
    orientation: int = 1  # EXIF 0x0112, 1 when absent


def read_jpeg_header(data: bytes | np.ndarray) -> JpegHeader | None:
    """The frame header and EXIF orientation, or None for anything that is not a readable JPEG. `data`: bytes,
    or a 1-D uint8 array of them (read in place, not copied)."""
    data = data if isinstance(data, bytes) else memoryview(data)
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos, orientation = 2, 1
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 or pos + 2 + length > len(data):
            return None
        body = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and body[:6] == b"Exif\0\0":
            orientation = _exif_orientation(bytes(body[6:])) or orientation
        elif marker in _SOF_MARKERS:
            if len(body) < 6:
                return None
            precision, height, width, components = struct.unpack_from(">BHHB", body)
            return JpegHeader(width, height, components, precision, marker, orientation)
        pos += 2 + length
    return None


def _exif_orientation(tiff: bytes) -> int | None:
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    order = "<" if tiff[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for i in range(count):
            tag, kind, _, value = struct.unpack_from(order + "HHIH", tiff, ifd + 2 + 12 * i)
            if tag == 0x0112 and kind == 3:
                return value
    except struct.error:
        return None
    return None


PROGRESSIVE_ON_CPU = "progressive JPEG: this GPU decoder takes them one at a time"


def cpu_reason(data: bytes | np.ndarray, max_bytes: int, max_pixels: int, progressive: bool = True) -> str | None:
    """Why these bytes (or a 1-D uint8 array of them) must be decoded on the CPU, or None when the GPU decoder can
    take them. `progressive`: whether the GPU decoder takes progressive JPEGs in its batches."""
    header = read_jpeg_header(data)  # bytes, or an array over a file reader's ring when no reader routed it
    if header is None:
        return "not a JPEG"
    if header.sof not in _HUFFMAN_8BIT or header.precision != 8:
        return f"JPEG frame 0x{header.sof:02X} at {header.precision} bits"
    if header.sof == 0xC2 and not progressive:
        return PROGRESSIVE_ON_CPU
    if header.components not in (1, 3):
        return f"{header.components} colour components (CMYK/YCCK)"
    if header.orientation != 1:
        return f"EXIF orientation {header.orientation}"
    if len(data) > max_bytes or header.width * header.height > max_pixels or not header.width or not header.height:
        return "over a limit or empty: the CPU path dead-letters it with the reason"
    if not _ends_with_eoi(data):
        # nvJPEG fills a cut-off scan with grey and reports success; the CPU decoder refuses it (or decodes
        # a file with a trailer after its end marker), so both paths agree on what is dead-lettered.
        return "no end-of-image marker (cut off, or data after it)"
    return None


_PIECE = 1 << 16


def _ends_with_eoi(data: bytes | np.ndarray) -> bool:
    """Whether the image ends with its end-of-image marker, zero padding after it allowed; read in place."""
    view = data if isinstance(data, bytes) else memoryview(data)
    end = len(view)
    while end and view[end - 1] == 0:  # zero padding (rare): skipped a piece at a time, not copied whole
        piece = bytes(view[max(0, end - _PIECE) : end])
        end -= len(piece) - len(piece.rstrip(b"\0"))
    return end >= 2 and view[end - 2] == 0xFF and view[end - 1] == 0xD9


def decoded_within(sizes: Sequence[int | None], max_bytes: int | None) -> list[bool]:
    """Which images of a batch one GPU decode call takes: the smallest first (ties in input order), each whose
    decoded `sizes` (bytes; None for one it cannot read, which costs nothing) still fits in `max_bytes` with those
    taken before it (None: no limit). The rest, the largest, are decoded on the CPU threads in draft mode, which
    spares them most (a 12-MP photo read at 1/8 scale): a batch of very large photos does not need all its
    decoded pixels on the GPU at once (256 phone photos of 12 MP: 9.3 GB)."""
    taken = [True] * len(sizes)
    if max_bytes is None:
        return taken
    total = 0
    for i in sorted(range(len(sizes)), key=lambda i: sizes[i] or 0):
        size = sizes[i] or 0
        taken[i] = total + size <= max_bytes
        total += size if taken[i] else 0
    return taken
