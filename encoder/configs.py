"""The encoder's settings, checked where they are made, with nothing heavier than the standard library.

A command line or a nightly config builds and checks them before torch, PIL or Beam is imported: a wrong value is
reported in the first fraction of a second, and an orchestrator's task that never loads a model never imports
torch to check its config. `encoder.model`, `encoder.preprocess` and `encoder.gpu_images` use them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from encoder.storage import cache_dir

__all__ = ["RESIZES", "DecodeLimits", "EncoderConfig", "embedding_dim"]

# How the GPU resize sums PIL's taps: batched products over dense resampling matrices (`encoder.resize`), or two
# Triton kernels that gather them from the decoder's buffer (`encoder.resize_kernel`; the products until a GPU run
# shows the kernels faster: BENCHMARKS.md, run E).
RESIZES = ("products", "kernel")


@dataclass(frozen=True)
class EncoderConfig:
    """Which checkpoint, where it runs, and how it computes."""

    model: str  # Hub id, local directory or gs:// directory
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    batch_size: int = 64  # images per forward pass (on a GPU at most what fits; 0: the most that fits)
    compile: bool = False  # torch.compile the tower (CUDA; pays a one-off compile)
    compile_frozen: bool = False  # with compile: the weights as constants (inductor freezing), Q, K, V in one GEMM
    cuda_graph: bool = False  # replay the device step as one CUDA graph at the batch size (encoder.cuda_graph)
    # On CUDA, SMs the model's kernels leave free for decoding and resizing in the GPU worker (encoder.sm_share); 0: none
    decode_sms: int = 0
    cache_dir: str = field(default_factory=lambda: cache_dir("models"))  # gs:// checkpoints, versions (storage)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a checkpoint (Hub id, directory or gs:// directory)")
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be >= 1, or 0 to fit GPU memory, got {self.batch_size}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.compile_frozen and not self.compile:
            raise ValueError("compile_frozen needs compile")
        if self.decode_sms < 0:
            raise ValueError(f"decode_sms must be >= 0, got {self.decode_sms}")
        if self.decode_sms and self.cuda_graph:  # the graph is captured on streams of the whole GPU: not combined
            raise ValueError("decode_sms cannot be combined with cuda_graph")


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what one image may cost, and whether to decode JPEGs at reduced scale."""

    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 100_000_000
    draft: bool = True  # JPEG only; changes pixels slightly (see README, "Preprocessing")

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError(f"limits must be positive, got {self}")


def embedding_dim(model: str) -> int | None:
    """The dimension of a checkpoint's image vectors (its vision tower's width), read from its config.json alone: a
    local or gs:// directory, or a Hub id already in the cache. None where that file cannot be read here without a
    download or is not a SigLIP config: the model's load then says what is wrong.

    For checks made before any work (a night's `reduce` against the model), without torch or transformers."""
    import json

    from encoder import storage

    if storage.is_gcs(model) or os.path.isdir(model):
        try:
            text = storage.read_bytes(storage.join(model, "config.json"))
        except Exception:  # noqa: BLE001 - missing, forbidden, unreachable: the model's load says which
            return None
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model, "config.json")
        except ValueError:  # not a Hub id
            return None
        if not isinstance(cached, str):
            return None
        text = Path(cached).read_bytes()
    try:
        config = json.loads(text)
    except ValueError:
        return None
    if not isinstance(config, dict):
        return None
    vision = config if config.get("model_type") == "siglip_vision_model" else config.get("vision_config")
    if config.get("model_type") not in ("siglip", "siglip_vision_model") or not isinstance(vision, dict):
        return None
    width = vision.get("hidden_size", 768)  # transformers' default, as the tower's
    return width if isinstance(width, int) and width > 0 else None
