"""Routing by JPEG header: what the GPU decoder takes, and why everything else goes to the CPU."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from encoder.jpeg import PROGRESSIVE_ON_CPU, cpu_reason, decoded_within, read_jpeg_header
from encoder.preprocess import DecodeLimits, ImageDecodeError, PreprocessConfig, decode_image

_LIMITS = dict(max_bytes=10 << 20, max_pixels=10_000_000)


def _encode(mode: str = "RGB", size=(64, 48), fmt: str = "JPEG", **save) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def _with_orientation(data: bytes, orientation: int) -> bytes:
    image = Image.open(io.BytesIO(data))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "sof", "components"),
    [
        (_encode(), 0xC0, 3),
        (_encode(progressive=True), 0xC2, 3),
        (_encode("L"), 0xC0, 1),
        (_encode("CMYK"), 0xC0, 4),
    ],
)
def test_the_frame_header_is_read(data, sof, components):
    header = read_jpeg_header(data)
    assert (header.width, header.height, header.sof, header.components, header.precision) == (
        64,
        48,
        sof,
        components,
        8,
    )


def test_gpu_takes_baseline_progressive_and_grey_jpegs():
    for data in (_encode(), _encode(progressive=True), _encode("L"), _with_orientation(_encode(), 1)):
        assert cpu_reason(data, **_LIMITS) is None


def test_progressive_jpegs_go_to_the_cpu_for_a_gpu_decoder_that_takes_them_one_at_a_time():
    for data in (_encode(progressive=True), _encode("L", progressive=True)):
        assert cpu_reason(data, **_LIMITS, progressive=False) == PROGRESSIVE_ON_CPU
    assert cpu_reason(_encode(), **_LIMITS, progressive=False) is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_encode(fmt="PNG"), "not a JPEG"),
        (_encode(fmt="WEBP"), "not a JPEG"),
        (b"", "not a JPEG"),
        (b"\xff\xd8\xff", "not a JPEG"),
        (_encode()[:20], "not a JPEG"),  # cut before the frame header
        (_encode("CMYK"), "4 colour components"),
        (_with_orientation(_encode(), 6), "EXIF orientation 6"),
    ],
)
def test_everything_else_goes_to_the_cpu_with_a_reason(data, reason):
    assert reason in cpu_reason(data, **_LIMITS)


def test_cut_off_jpegs_go_to_the_cpu_path_that_dead_letters_them():
    data = _encode(size=(400, 300))
    cut = data[: len(data) * 2 // 5]  # frame header intact, scan cut: nvJPEG would decode it, grey-filled
    assert "no end-of-image marker" in cpu_reason(cut, **_LIMITS)
    with pytest.raises(ImageDecodeError):
        decode_image(cut, PreprocessConfig(), DecodeLimits())
    assert cpu_reason(data + b"\0" * 64, **_LIMITS) is None  # zero padding after the end marker is fine


def test_an_array_of_the_bytes_is_routed_as_the_bytes_are():
    """Arrays over a file reader's ring reach the router unrouted when a batch mixes them with fetched bytes."""
    full = _encode(size=(400, 300))
    for data in (full, full[: len(full) // 2], full + b"\0" * 64, _encode(fmt="PNG"), _encode("CMYK"),
                 _with_orientation(_encode(), 6), _encode(progressive=True)):  # fmt: skip
        assert cpu_reason(np.frombuffer(data, dtype=np.uint8), **_LIMITS) == cpu_reason(data, **_LIMITS)
    # Zero padding longer than the pieces the end is read in, the marker split across two of them or not; and cut off
    for padding in (65_535, 65_536, 200_001):
        for data, routed in ((full + b"\0" * padding, True), (full[:-1] + b"\0" * padding, False)):
            reason = cpu_reason(np.frombuffer(data, dtype=np.uint8), **_LIMITS)
            assert reason == cpu_reason(data, **_LIMITS) and (reason is None) == routed


def test_the_header_of_an_array_of_the_bytes_is_read_as_the_bytes_header():
    for data in (_encode(), _encode("CMYK"), _with_orientation(_encode(), 6), _encode(fmt="PNG"), b"", b"\xff\xd8"):
        assert read_jpeg_header(np.frombuffer(data, dtype=np.uint8)) == read_jpeg_header(data)
    assert read_jpeg_header(np.frombuffer(_with_orientation(_encode(), 6), dtype=np.uint8)).orientation == 6


@pytest.mark.parametrize(
    ("sizes", "max_bytes", "taken"),
    [
        ([4, 4, 4], 12, [True, True, True]),
        ([4, 4, 4], 11, [True, True, False]),  # ties in input order: the last does not fit
        ([10, 1, 9], 11, [False, True, True]),  # the smallest first: the largest goes to the CPU threads
        ([9, 1, 10], 11, [True, True, False]),
        ([12, 2, 2], 11, [False, True, True]),  # one over the limit alone
        ([4, None, 4], 8, [True, True, True]),  # unreadable: costs nothing, the decoder rejects it
        ([4, 4], None, [True, True]),  # no limit
        ([], 8, []),
    ],
)
def test_a_gpu_decode_call_takes_the_smallest_images_that_fit_its_limit(sizes, max_bytes, taken):
    assert decoded_within(sizes, max_bytes) == taken


def test_oversized_images_go_to_the_cpu_path_that_dead_letters_them():
    data = _encode(size=(400, 300))
    assert cpu_reason(data, max_bytes=10 << 20, max_pixels=100_000) is not None
    assert cpu_reason(data, max_bytes=100, max_pixels=10_000_000) is not None


def test_the_header_reader_never_raises_on_mutated_bytes():
    data = bytearray(_encode())
    rng = np.random.default_rng(1)
    for _ in range(2000):
        mutated = bytearray(data[: int(rng.integers(0, len(data)))])
        for position in rng.integers(0, max(1, len(mutated)), size=4):
            if mutated:
                mutated[position] = int(rng.integers(0, 256))
        cpu_reason(bytes(mutated), **_LIMITS)  # a reason or None, never an exception
        assert read_jpeg_header(np.frombuffer(bytes(mutated), dtype=np.uint8)) == read_jpeg_header(bytes(mutated))
