"""Preprocessing: parity with the SigLIP image processor, and every awkward image we promise to handle."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from encoder.preprocess import (
    DecodeLimits,
    ImageDecodeError,
    PreprocessConfig,
    decode_image,
    draft_scale,
    draft_size,
    prepare_image,
    to_pixel_values,
)

CFG = PreprocessConfig(height=64, width=64)
EXACT = DecodeLimits(draft=False)


def _encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _photo(width=200, height=150, seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs * 255 // width, ys * 255 // height, (xs + ys) % 256], axis=-1)
    pixels = np.clip(pixels + rng.integers(-20, 20, size=pixels.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _processor(size: int):
    from transformers import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": size, "width": size})


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA", "CMYK"])
@pytest.mark.parametrize("size", [(200, 150), (37, 300), (64, 64)])
def test_matches_siglip_image_processor(mode, size):
    image = _photo(*size, mode=mode)
    if mode in ("RGBA", "LA"):
        alpha = Image.fromarray(np.linspace(0, 255, size[0] * size[1]).reshape(size[1], size[0]).astype(np.uint8))
        image.putalpha(alpha)
    reference = _processor(64)(images=image, return_tensors="pt")["pixel_values"]
    ours = to_pixel_values(prepare_image(image, CFG)[None], CFG)
    assert ours.shape == reference.shape == (1, 3, 64, 64)
    diff = (ours - reference).abs().max().item()
    assert diff < 1e-5, f"max abs difference {diff} for {mode} {size}"


def test_config_round_trips_a_processor_config():
    processor = _processor(96)
    cfg = PreprocessConfig.from_processor_dict(processor.to_dict())
    assert (cfg.height, cfg.width, cfg.resample) == (96, 96, 3)
    assert cfg.image_mean == (0.5, 0.5, 0.5) and cfg.rescale_factor == pytest.approx(1 / 255)


def test_unsupported_processor_options_are_refused():
    with pytest.raises(ValueError, match="do_center_crop"):
        PreprocessConfig.from_processor_dict({"size": {"height": 8, "width": 8}, "do_center_crop": True})
    with pytest.raises(ValueError, match="height and width"):
        PreprocessConfig.from_processor_dict({"size": {"shortest_edge": 8}})


def test_jpeg_bytes_without_draft_equal_the_processor_on_the_decoded_image():
    data = _encode(_photo(640, 480), quality=90)
    reference = _processor(64)(images=Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"]
    ours = to_pixel_values(decode_image(data, CFG, EXACT)[None], CFG)
    assert (ours - reference).abs().max().item() < 1e-5


def test_draft_mode_stays_close_to_full_decode():
    data = _encode(_photo(640, 480), quality=90)
    full = to_pixel_values(decode_image(data, CFG, EXACT)[None], CFG)
    draft = to_pixel_values(decode_image(data, CFG, DecodeLimits(draft=True))[None], CFG)
    # Documented in README "Preprocessing": mean |Δ| in normalised units ([-1, 1] range).
    assert (draft - full).abs().mean().item() < 0.03
    assert not torch.equal(draft, full)  # draft really decoded at reduced scale


@pytest.mark.parametrize(("width", "height", "expected"), [(640, 480, 2), (640, 427, 1), (641, 479, 2), (1000, 1000, 4),
                                                           (2000, 1799, 8), (224, 224, 1), (223, 4000, 1),
                                                           (5000, 1800, 8), (897, 900, 4)])  # fmt: skip
@pytest.mark.parametrize(("mode", "progressive"), [("RGB", False), ("L", False), ("RGB", True)])
def test_draft_scale_is_the_scale_pillows_draft_mode_decodes_at(width, height, expected, mode, progressive):
    """The GPU path's resize reduces as this scale says (`encoder.resize.draft_taps`): it must be Pillow's."""
    image = Image.open(io.BytesIO(_encode(Image.new(mode, (width, height)), progressive=progressive)))
    image.draft("RGB", (224, 224))
    scale = draft_scale(height, width, PreprocessConfig())
    assert image.size == draft_size(height, width, scale)[::-1]
    assert scale == expected


def test_batched_normalisation_equals_per_image():
    batch = np.stack([prepare_image(_photo(seed=s), CFG) for s in range(4)])
    together = to_pixel_values(batch, CFG)
    for i in range(4):
        assert torch.equal(together[i : i + 1], to_pixel_values(batch[i : i + 1], CFG))


def test_to_pixel_values_rejects_wrong_layout():
    with pytest.raises(ValueError, match="uint8"):
        to_pixel_values(np.zeros((1, 3, 8, 8), dtype=np.float32), CFG)


# ------------------------------------------------------------------ bad and awkward input


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"<html>not found</html>", "not a recognised image format"),
        (b"\xff\xd8\xff\xe0" + bytes(40), "corrupt header"),
    ],
)
def test_unusable_bytes_raise_with_a_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data, CFG)


def test_truncated_jpeg_is_refused():
    data = _encode(_photo(400, 300), quality=90)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 2], CFG, EXACT)


def test_corrupt_header_is_refused():
    data = bytearray(_encode(_photo(400, 300)))
    data[2:40] = bytes(range(38))
    with pytest.raises(ImageDecodeError):
        decode_image(bytes(data), CFG, EXACT)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = _encode(Image.new("L", (12000, 12000)), "PNG")  # 144 Mpx of zeros compresses to ~150 KB
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(bomb, CFG, DecodeLimits(max_pixels=100_000_000))


def test_oversized_bytes_are_refused():
    with pytest.raises(ImageDecodeError, match="max_bytes"):
        decode_image(_encode(_photo()), CFG, DecodeLimits(max_bytes=100))


def _decoded(image: Image.Image, fmt: str, **kwargs) -> np.ndarray:
    out = decode_image(_encode(image, fmt, **kwargs), CFG, EXACT)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    return out


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("CMYK", "JPEG"), ("L", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("RGB", "WEBP"), ("RGB", "TIFF"), ("RGB", "BMP")],
)
def test_common_modes_and_formats_decode(mode, fmt):
    image = _photo(mode=mode)
    out = _decoded(image, fmt)
    reference = prepare_image(Image.open(io.BytesIO(_encode(image, fmt))), CFG)
    assert np.abs(out.astype(int) - reference.astype(int)).max() <= 1


def test_sixteen_bit_grayscale_keeps_its_range():
    ramp = (np.linspace(0, 65535, 128 * 128).reshape(128, 128)).astype(np.uint16)
    out = _decoded(Image.fromarray(ramp, mode="I;16"), "PNG")
    assert out.min() < 10 and out.max() > 245  # PIL's own convert would clip almost all of it to white
    assert np.all(np.diff(out[:, 32, 0].astype(int)) >= -1)  # still a ramp, top to bottom


def test_alpha_is_composited_on_white():
    transparent = Image.new("RGBA", (50, 50), (255, 0, 0, 0))
    assert (_decoded(transparent, "PNG") == 255).all()


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (40, 40), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    assert (_decoded(image, "PNG", transparency=0) == 255).all()


def test_exif_rotation_is_applied():
    pixels = np.zeros((60, 120, 3), dtype=np.uint8)
    pixels[:, :60] = (255, 0, 0)  # left half red
    pixels[:, 60:] = (0, 0, 255)  # right half blue
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # stored landscape; display rotated 90° clockwise: left half ends up on top
    out = decode_image(_encode(image, "JPEG", exif=exif, quality=95), CFG, EXACT)
    top, bottom = out[:16].reshape(-1, 3).mean(0), out[-16:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60, f"top should be red, got {top}"
    assert bottom[2] > 200 and bottom[0] < 60, f"bottom should be blue, got {bottom}"


def test_exif_rotation_with_draft_decodes_enough_pixels():
    image = _photo(800, 400)
    exif = image.getexif()
    exif[0x0112] = 8
    out = decode_image(_encode(image, "JPEG", exif=exif), PreprocessConfig(height=300, width=100), DecodeLimits())
    assert out.shape == (300, 100, 3)


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((0, 200, 0), (200, 0, 0), (0, 0, 200))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50)
    out = decode_image(buffer.getvalue(), CFG, EXACT)
    assert out[..., 1].mean() > 150 and out[..., 0].mean() < 50


@pytest.mark.parametrize("size", [(1, 1), (10000, 10), (10, 10000)])
def test_extreme_sizes_decode(size):
    out = _decoded(Image.new("RGB", size, (10, 20, 30)), "PNG")
    assert np.abs(out.astype(int) - (10, 20, 30)).max() <= 1
