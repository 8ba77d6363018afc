"""Encoded images → model-sized uint8 batches on the GPU, with a CPU fallback per image.

JPEGs that nvJPEG takes (`encoder.jpeg.cpu_reason`) are decoded in one batched call
(`torchvision.io.decode_jpeg(device="cuda")`), resized on the GPU with the same
antialiased filter PIL uses, and rounded to uint8 as PIL does. Everything else, and any
JPEG the GPU decoder rejects, is decoded by `decode_image` on CPU threads: same output,
same dead-letter reasons. Results keep the input order; nothing is dropped silently.

torchvision is imported only here and only when a GPU path is built: on CPU-only
installs it is absent (it breaks transformers' SigLIP import there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from encoder.jpeg import cpu_reason
from encoder.preprocess import DecodeLimits, ImageDecodeError, PreprocessConfig, decode_image

__all__ = ["DECODERS", "GpuImages", "PreparedBatch", "nvimgcodec_decoder", "nvjpeg_decoder", "resize_like_pil"]

_MODES = {2: "bilinear", 3: "bicubic"}  # PIL resample → torch interpolate; both antialiased like PIL

# A batch of encoded JPEGs → decoded (3, h, w) uint8 tensors on the device; raises if any fails.
BatchDecoder = Callable[[list[bytes], torch.device], list[torch.Tensor]]


def nvjpeg_decoder() -> BatchDecoder:
    """nvJPEG on the SMs through torchvision (CUDA kernels for Huffman-decoded blocks)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(datas: list[bytes], device: torch.device) -> list[torch.Tensor]:
        encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)

    return decode


def nvimgcodec_decoder() -> BatchDecoder:
    """nvImageCodec: the GPU's hardware JPEG engines where it has them (A100, H100), else CUDA."""
    from nvidia import nvimgcodec

    decoder = nvimgcodec.Decoder()
    params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.RGB)

    def decode(datas: list[bytes], device: torch.device) -> list[torch.Tensor]:
        # On the caller's stream, so what follows on that stream sees finished images.
        images = decoder.decode(datas, params=params, cuda_stream=torch.cuda.current_stream(device).cuda_stream)
        if any(image is None for image in images):
            raise RuntimeError("nvImageCodec could not decode an image of the batch")
        return [torch.as_tensor(image, device=device).permute(2, 0, 1) for image in images]  # HWC → CHW views

    return decode


def pil_decoder() -> BatchDecoder:
    """Pillow at full size, then onto the device: the GPU path's logic on a machine without one."""
    import io

    from PIL import Image

    def decode(datas: list[bytes], device: torch.device) -> list[torch.Tensor]:
        images = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in datas]
        return [torch.from_numpy(i.copy()).permute(2, 0, 1).to(device) for i in images]

    return decode


DECODERS = {"nvjpeg": nvjpeg_decoder, "nvimgcodec": nvimgcodec_decoder, "pil": pil_decoder}


@dataclass
class PreparedBatch:
    """Model-sized images in input order, and what became of each input."""

    pixels: torch.Tensor  # (n_ok, height, width, 3) uint8 on the device
    kept: list[int]  # input positions of the rows of `pixels`
    failed: list[tuple[int, str]]  # (input position, dead-letter reason)
    on_gpu: int  # how many were decoded on the GPU (the rest on the CPU)


def resize_like_pil(images: Sequence[torch.Tensor], cfg: PreprocessConfig) -> torch.Tensor:
    """(3, h, w) uint8 images of any sizes → (n, height, width, 3) uint8, PIL's antialiased filter.

    Images of one size are resized in one call. Matches PIL's uint8 resize to within one
    level on ~all pixels (tests/encoder/test_gpu_images.py measures it on the CPU).
    """
    mode = _MODES[cfg.resample]
    out = torch.empty((len(images), cfg.height, cfg.width, 3), dtype=torch.uint8, device=images[0].device)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(tuple(image.shape[1:]), []).append(i)
    for (h, w), rows in by_size.items():
        x = torch.stack([images[i] for i in rows])
        if (h, w) != (cfg.height, cfg.width):
            x = torch.nn.functional.interpolate(
                x.float(), size=(cfg.height, cfg.width), mode=mode, antialias=True, align_corners=False
            )
            x = x.round_().clamp_(0, 255).to(torch.uint8)
        out[rows] = x.permute(0, 2, 3, 1)
    return out


class GpuImages:
    """Decode and resize batches of encoded images on `device`, falling back to the CPU per image."""

    def __init__(self, preprocess: PreprocessConfig, device: torch.device | str, limits: DecodeLimits = DecodeLimits(),
                 cpu_pool: Executor | None = None, decoder: str | BatchDecoder = "nvjpeg") -> None:  # fmt: skip
        if preprocess.resample not in _MODES:
            raise ValueError(f"GPU resize supports bilinear and bicubic, not PIL filter {preprocess.resample}")
        self.preprocess, self.limits = preprocess, limits
        self.device = torch.device(device)
        self._pool = cpu_pool or ThreadPoolExecutor(8, thread_name_prefix="cpu-decode")
        self._decode = DECODERS[decoder]() if isinstance(decoder, str) else decoder

    def route(self, datas: Sequence[bytes]) -> tuple[list[int], list[int]]:
        """Input positions for the GPU decoder and for the CPU decoder."""
        gpu, cpu = [], []
        for i, data in enumerate(datas):
            (cpu if cpu_reason(data, self.limits.max_bytes, self.limits.max_pixels) else gpu).append(i)
        return gpu, cpu

    def prepare(self, datas: Sequence[bytes]) -> PreparedBatch:
        """Every input either becomes a row of `pixels` or a (position, reason) failure."""
        gpu, cpu = self.route(datas)
        decoded, rejected = self._decode_on_gpu([datas[i] for i in gpu])
        cpu = sorted(cpu + [gpu[j] for j in rejected])
        cpu_jobs = {i: self._pool.submit(_decode_on_cpu, datas[i], self.preprocess, self.limits) for i in cpu}
        parts: dict[int, torch.Tensor] = {}
        if decoded:
            resized = resize_like_pil([image for _, image in decoded], self.preprocess)
            parts.update({gpu[j]: resized[k] for k, (j, _) in enumerate(decoded)})
        failed, cpu_pixels = [], {}
        for i, job in cpu_jobs.items():
            result = job.result()
            if isinstance(result, str):
                failed.append((i, result))
            else:
                cpu_pixels[i] = result
        if cpu_pixels:
            host = torch.from_numpy(np.stack(list(cpu_pixels.values())))
            if self.device.type == "cuda":
                host = host.pin_memory()
            uploaded = host.to(self.device, non_blocking=True)
            parts.update(dict(zip(cpu_pixels, uploaded, strict=True)))
        kept = sorted(parts)
        if decoded and len(decoded) == len(datas):  # the usual batch: all on the GPU, already in order
            return PreparedBatch(resized, kept, [], on_gpu=len(decoded))
        if kept:
            pixels = torch.stack([parts[i] for i in kept])
        else:
            pixels = torch.empty((0, self.preprocess.height, self.preprocess.width, 3), dtype=torch.uint8,
                                 device=self.device)  # fmt: skip
        return PreparedBatch(pixels, kept, sorted(failed), on_gpu=len(decoded))

    def _decode_on_gpu(self, datas: list[bytes]) -> tuple[list[tuple[int, torch.Tensor]], list[int]]:
        """(position, image) for what the GPU decoded, and the positions it rejected."""
        if not datas:
            return [], []
        try:
            return list(enumerate(self._decode(datas, self.device))), []
        except Exception:  # noqa: BLE001 - one bad image fails the batched call: find it
            decoded, rejected = [], []
            for j, one in enumerate(datas):
                try:
                    decoded.append((j, self._decode([one], self.device)[0]))
                except Exception:  # noqa: BLE001 - the CPU decoder will decode it or say why not
                    rejected.append(j)
            return decoded, rejected


def _decode_on_cpu(data: bytes, cfg: PreprocessConfig, limits: DecodeLimits) -> np.ndarray | str:
    try:
        return decode_image(data, cfg, limits)
    except ImageDecodeError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - a decoder bug on one image must not stop the batch
        return f"unexpected {type(err).__name__}: {err}"
