"""Hostile image bytes: mutated JPEG, PNG, WebP, GIF, TIFF and BMP files either decode to model-sized RGB
or fail with ImageDecodeError, never another exception, and never take long.

Deterministic (hypothesis derandomised), so CI sees the same inputs every run.
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from encoder import DecodeLimits, ImageDecodeError, PreprocessConfig, decode_image
from encoder.jpeg import cpu_reason, read_jpeg_header

CFG = PreprocessConfig(height=16, width=16)
LIMITS = DecodeLimits(max_bytes=1 << 20, max_pixels=4_000_000)
SLOW_S = 2.0


def _seed_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 255, (24, 24, 4), dtype=np.uint8))
    files = {}

    def save(name: str, image: Image.Image, fmt: str, **kwargs) -> None:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **kwargs)
        files[name] = buffer.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6
    save("jpeg-baseline", rgb, "JPEG", quality=90)  # what the GPU decoder takes: most catalog photos
    save("jpeg-exif", rgb, "JPEG", quality=90, exif=exif.tobytes())
    save("jpeg-progressive", rgb, "JPEG", quality=75, progressive=True)
    save("jpeg-cmyk", rgb.convert("CMYK"), "JPEG")
    save("png-rgba", rgba, "PNG")
    save("png-palette", rgb.convert("P"), "PNG", transparency=0)
    save("png-16bit", Image.fromarray((rng.integers(0, 65535, (20, 20))).astype(np.uint16)), "PNG")
    save("webp", rgba, "WEBP", quality=80)
    save("gif", rgb.convert("P"), "GIF")
    save("tiff", rgb, "TIFF", compression="tiff_lzw")
    save("bmp", rgb, "BMP")
    return files


SEEDS = _seed_files()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "duplicate", "zero-run"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 512))]
        else:
            data[at : at + draw(st.integers(1, 64))] = b"\0" * 8
    return bytes(data)


def _frame_header_at(data: bytes) -> int:
    """Where a seed JPEG's frame header (SOFn) starts: its segments walked from the start."""
    pos = 2
    while data[pos + 1] not in (0xC0, 0xC2):
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return pos


@st.composite
def frame_header_rewritten(draw) -> bytes:
    """A seed JPEG with a field of its frame header rewritten (the route's edge cases: short or overlong segments,
    zero or huge sizes, odd precisions, components and markers), then maybe cut inside its header."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(n for n in SEEDS if n.startswith("jpeg"))))])
    at = _frame_header_at(bytes(data))
    offset, size = draw(st.sampled_from([(1, 1), (2, 2), (4, 1), (5, 2), (7, 2), (9, 1)]))  # marker .. components
    value = draw(st.one_of(st.just(0), st.integers(1, 16), st.integers(0, 256**size - 1)))  # zero sizes, lengths
    data[at + offset : at + offset + size] = value.to_bytes(size, "big")
    if draw(st.booleans()):
        del data[draw(st.integers(0, at + 12)) :]
    return bytes(data)


def _decode_or_reason(data: bytes) -> np.ndarray | ImageDecodeError:
    start = time.perf_counter()
    try:
        result = decode_image(data, CFG, LIMITS)
    except ImageDecodeError as err:
        result = err
    assert time.perf_counter() - start < SLOW_S, f"decoding {len(data)} bytes took over {SLOW_S} s"
    return result


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_file_decodes(name):
    pixels = decode_image(SEEDS[name], CFG, LIMITS)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8


@settings(max_examples=600, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_images_decode_or_fail_with_a_reason(data):
    result = _decode_or_reason(data)
    if isinstance(result, ImageDecodeError):
        assert str(result)
    else:
        assert result.shape == (16, 16, 3) and result.dtype == np.uint8


@settings(max_examples=600, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated(), frame_header_rewritten()))
def test_the_gpu_route_reads_any_bytes_without_raising(data):
    """The GPU worker's route (`encoder.jpeg`) reads every file's header, in the reader processes over views of
    their ring: any bytes give a header or None and a reason or None, never an exception, the same from bytes as
    from a view; what it sends to the GPU decoder is an 8-bit Huffman JPEG within the limits, whole."""
    view = np.frombuffer(data, np.uint8)
    header = read_jpeg_header(data)
    assert read_jpeg_header(view) == header
    for progressive in (True, False):
        reason = cpu_reason(data, LIMITS.max_bytes, LIMITS.max_pixels, progressive)
        assert cpu_reason(view, LIMITS.max_bytes, LIMITS.max_pixels, progressive) == reason
        if reason is not None:
            assert isinstance(reason, str) and reason
            continue
        assert header.sof in ((0xC0, 0xC1, 0xC2) if progressive else (0xC0, 0xC1)) and header.precision == 8
        assert header.components in (1, 3) and header.orientation == 1
        assert 0 < header.width * header.height <= LIMITS.max_pixels
        assert data.startswith(b"\xff\xd8") and data.rstrip(b"\0").endswith(b"\xff\xd9")


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_decode_or_fail_with_a_reason(data):
    result = _decode_or_reason(data)
    assert isinstance(result, ImageDecodeError) or result.shape == (16, 16, 3)


def test_a_decompression_bomb_header_is_refused_before_decoding():
    buffer = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buffer, "PNG")  # 16 M pixels, a few KB compressed
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(buffer.getvalue(), CFG, LIMITS)
    assert time.perf_counter() - start < 0.5
