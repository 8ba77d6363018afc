"""The encoder's settings, checked where they are made, with nothing heavier than the standard library.

A command line or a nightly config builds and checks them before torch, PIL or Beam is imported: a wrong value is
reported in the first fraction of a second, and an orchestrator's task that never loads a model never imports
torch to check its config. `encoder.model`, `encoder.preprocess` and `encoder.gpu_images` use them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from encoder.storage import cache_dir

__all__ = [
    "RESIZES",
    "SUPPORTED_TYPES",
    "DecodeLimits",
    "EncoderConfig",
    "TowerConfig",
    "embedding_dim",
    "tower_config",
]

# How the GPU resize sums PIL's taps: batched products over dense resampling matrices (`encoder.resize`), or two
# Triton kernels that gather them from the decoder's buffer (`encoder.resize_kernel`; the products until a GPU run
# shows the kernels faster: BENCHMARKS.md, run E).
RESIZES = ("products", "kernel")


SUPPORTED_TYPES = ("siglip", "siglip_vision_model")  # a two-tower checkpoint, or its image tower saved alone
# transformers' activation names this tower computes: GELU's tanh approximation (SigLIP's), or exact GELU
ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}


@dataclass(frozen=True)
class TowerConfig:
    """The image tower's shape: a checkpoint's `vision_config`, transformers' defaults where it says nothing."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                     "image_size", "patch_size"):  # fmt: skip
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"vision_config.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision_config.hidden_size {self.hidden_size} is not a multiple of its "
                             f"{self.num_attention_heads} attention heads")  # fmt: skip
        if type(self.layer_norm_eps) not in (int, float) or not 0 < self.layer_norm_eps < 1:
            raise ValueError(f"vision_config.layer_norm_eps must be a number in (0, 1), got {self.layer_norm_eps!r}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision_config.hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if not self.vision_use_head:  # the vectors are the attention-pooling head's output
            raise ValueError("vision_config.vision_use_head is false: the tower has no pooling head to embed with")
        if self.image_size < self.patch_size:
            raise ValueError(f"vision_config.image_size {self.image_size} is smaller than a patch ({self.patch_size})")

    @property
    def grid(self) -> int:
        """Patches a side."""
        return self.image_size // self.patch_size


def tower_config(config: dict, name: str, where: str | None = None) -> TowerConfig:
    """The image tower's shape from a checkpoint's config.json (`name` says whose; `where`, which file): its
    `vision_config`, or the whole of an image tower saved alone, with transformers' defaults where it says nothing.

    Raises:
        ValueError: not a SigLIP checkpoint, or a tower this project cannot compute.
    """
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED_TYPES:
        raise ValueError(f"{name} is a {model_type!r} checkpoint; expected one of {SUPPORTED_TYPES}")
    vision = config if model_type == "siglip_vision_model" else config.get("vision_config") or {}
    if not isinstance(vision, dict):
        raise ValueError(f"{where or name}'s vision_config is not an object: {vision!r:.80}")
    known = {f.name for f in fields(TowerConfig)}
    return TowerConfig(**{k: v for k, v in vision.items() if k in known})


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
    download or is not a SigLIP tower's: the model's load then says what is wrong.

    For checks made before any work (a night's `reduce` against the model), without torch or transformers."""
    from encoder import storage

    try:
        if storage.is_gcs(model) or os.path.isdir(model):
            text = storage.read_bytes(storage.join(model, "config.json"))
        else:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")  # ValueError: not a Hub id
            if not isinstance(cached, str):
                return None
            text = Path(cached).read_bytes()
        return tower_config(json.loads(text), model).hidden_size
    except Exception:  # noqa: BLE001 - missing, forbidden, unreachable, not JSON, not SigLIP: the load says which
        return None
