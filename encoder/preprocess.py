"""Image bytes → fixed-size uint8 RGB arrays, then batched model input.

Matches the checkpoint's own SigLIP image processor (convert to RGB with alpha
composited on white, resize with its resample filter, rescale, normalise) to
< 1e-5, but is cheaper: decoding may use JPEG draft mode (libjpeg scales by
1/2, 1/4 or 1/8 while decoding), and rescale + normalise run once per batch as
tensor ops instead of per image in float64.
"""

from __future__ import annotations

import functools
import io
import json
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from encoder.configs import DecodeLimits

__all__ = [
    "DecodeLimits",
    "ImageDecodeError",
    "PreprocessConfig",
    "channel_stats",
    "check_pixel_batch",
    "decode_image",
    "draft_scale",
    "draft_size",
    "normalize_pixels",
    "prepare_image",
    "to_pixel_values",
]

# Decompression-bomb checks are ours (DecodeLimits.max_pixels), with a reason per item.
Image.MAX_IMAGE_PIXELS = None

_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class ImageDecodeError(ValueError):
    """An image that cannot become model input; the message is the dead-letter reason."""


@dataclass(frozen=True)
class PreprocessConfig:
    """What the model expects: size, resample filter, rescale and normalisation."""

    height: int = 224
    width: int = 224
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}")
        if self.resample not in _RESAMPLE_NAMES:
            raise ValueError(f"unknown PIL resample filter {self.resample}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"need 3 means and 3 positive stds, got {self.image_mean}, {self.image_std}")

    @classmethod
    def from_processor_dict(cls, d: dict) -> PreprocessConfig:
        """Read a `preprocessor_config.json` of a SigLIP image processor.

        Raises:
            ValueError: for options this fast path does not reproduce (crop, pad, no resize).
        """
        unsupported = [k for k in ("do_center_crop", "do_pad") if d.get(k)]
        if d.get("do_resize") is False:
            unsupported.append("do_resize=false")
        if unsupported:
            raise ValueError(f"image processor options not supported: {unsupported}")
        size = d.get("size") or {}
        if "height" not in size or "width" not in size:
            raise ValueError(f"image processor size must have height and width, got {size}")
        rescale = d.get("rescale_factor", 1 / 255) if d.get("do_rescale", True) else 1.0
        mean, std = d.get("image_mean", [0.5] * 3), d.get("image_std", [0.5] * 3)
        if d.get("do_normalize") is False:
            mean, std = [0.0] * 3, [1.0] * 3
        return cls(
            height=int(size["height"]),
            width=int(size["width"]),
            resample=int(d.get("resample", Image.Resampling.BICUBIC)),
            rescale_factor=float(rescale),
            image_mean=tuple(float(v) for v in mean),
            image_std=tuple(float(v) for v in std),
        )

    def canonical_json(self) -> str:
        """Stable text of every field; part of `model_version`."""
        return json.dumps(asdict(self), sort_keys=True)


def decode_image(data: bytes, cfg: PreprocessConfig, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Decode encoded image bytes into model-sized RGB.

    Returns:
        (height, width, 3) uint8.

    Raises:
        ImageDecodeError: empty, oversized, unrecognised, truncated or corrupt input,
            or more pixels than `limits.max_pixels`.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(f"{len(data)} bytes exceeds max_bytes={limits.max_bytes}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Truncated File Read", "Corrupt EXIF data": the outcome says it
        return _decode(data, cfg, limits)


def _decode(data: bytes, cfg: PreprocessConfig, limits: DecodeLimits) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as err:
        raise ImageDecodeError("not a recognised image format (unknown type or corrupt header)") from err
    except Exception as err:  # noqa: BLE001 - PIL raises many types on hostile headers
        raise ImageDecodeError(f"corrupt header: {type(err).__name__}: {err}") from err
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageDecodeError(
            f"decompression bomb: {width}x{height} = {width * height} pixels exceeds max_pixels={limits.max_pixels}"
        )
    if limits.draft and image.format == "JPEG":
        # draft() makes libjpeg decode at the smallest 1/2^k scale that still covers the
        # target in both axes; orientations 5-8 swap the axes after decoding.
        swapped = _orientation(image) in (5, 6, 7, 8)
        image.draft("RGB", (cfg.height, cfg.width) if swapped else (cfg.width, cfg.height))
    try:
        image.load()
    except Exception as err:  # noqa: BLE001 - truncated or corrupt data surfaces as OSError, SyntaxError, ...
        raise ImageDecodeError(f"truncated or corrupt image data: {type(err).__name__}: {err}") from err
    return prepare_image(image, cfg)


def draft_scale(height: int, width: int, cfg: PreprocessConfig) -> int:
    """The scale (1, 2, 4 or 8) Pillow's draft mode decodes a `height` × `width` JPEG at for this model input, each
    side then rounded up: the largest that leaves both sides at least the input's, so 640×480 → 1/2 for 224 px
    but 640×427 → 1/1. Sides as stored (the decode's `draft` call swaps the input's for EXIF rotations)."""
    most = min(width // cfg.width, height // cfg.height)
    return next((s for s in (8, 4, 2) if most >= s), 1)


def draft_size(height: int, width: int, scale: int) -> tuple[int, int]:
    """(height, width) of a JPEG decoded at 1/`scale`: each side rounded up, as libjpeg (and nvJPEG) make it."""
    return -(-height // scale), -(-width // scale)


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF: decode at full scale, keep the pixels as stored
        return 1


def prepare_image(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """Orient, convert to RGB and resize an opened image, as the SigLIP processor does.

    Returns:
        (height, width, 3) uint8.
    """
    try:
        oriented = ImageOps.exif_transpose(image)
    except (OSError, ValueError, TypeError, KeyError, SyntaxError):
        oriented = image  # unreadable EXIF: the pixels are still good, keep them as stored
    rgb = _to_rgb(oriented)
    resized = rgb.resize((cfg.width, cfg.height), resample=cfg.resample, reducing_gap=None)
    return np.array(resized, dtype=np.uint8)  # writable, so torch can take it without a copy warning


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white (the SigLIP processor's rule)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _high_depth_to_l(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit or float grayscale → 8-bit, scaling by the range the data uses (PIL would clip)."""
    values = np.asarray(image, dtype=np.float64)
    top = values.max(initial=0.0)
    if image.mode == "F" and top <= 1.0:
        scaled = values * 255.0
    elif top > 255.0:
        scaled = values / 257.0  # 65535 -> 255
    else:
        scaled = values
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


@functools.lru_cache(maxsize=32)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(1, 3, 1, 1) float32 means and stds on `device`, made once: on a GPU, making them there for every batch
    was a blocking copy, which waits until the device has finished all the work queued before it."""
    with torch.inference_mode(False):  # plain tensors, so training may use them as well as inference
        return tuple(torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device) for v in (mean, std))


def channel_stats(cfg: PreprocessConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's per-channel means and stds as (1, 3, 1, 1) float32 on `device`, for `normalize_pixels`."""
    return _channel_stats(tuple(cfg.image_mean), tuple(cfg.image_std), device)


def normalize_pixels(x: torch.Tensor, cfg: PreprocessConfig, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(n, h, w, 3) uint8 → (n, 3, h, w) float32 `pixel_values`: rescaled, then normalised by `channel_stats`.
    Pure tensor ops, so a compiled model step fuses them into one kernel (eager, they are six passes over the
    batch's float32 pixels)."""
    x = x.permute(0, 3, 1, 2).to(torch.float32) * cfg.rescale_factor
    return ((x - mean) / std).contiguous()


def to_pixel_values(batch: np.ndarray | torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """Rescale and normalise a batch of prepared images.

    Args:
        batch: (n, height, width, 3) uint8 from `decode_image` / `prepare_image`.

    Returns:
        (n, 3, height, width) float32, as the processor's `pixel_values`.
    """
    x = check_pixel_batch(torch.as_tensor(batch))
    return normalize_pixels(x, cfg, *channel_stats(cfg, x.device))


def check_pixel_batch(x: torch.Tensor) -> torch.Tensor:
    """`x`, if it is a batch of prepared images: (n, h, w, 3) uint8.

    Raises:
        ValueError: another layout or dtype.
    """
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected (n, h, w, 3) uint8, got {tuple(x.shape)} {x.dtype}")
    return x
