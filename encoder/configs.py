"""The encoder's settings, checked where they are made, with nothing heavier than the standard library.

A command line or a nightly config builds and checks them before torch, PIL or Beam is imported: a wrong value is
reported in the first fraction of a second, and an orchestrator's task that never loads a model never imports
torch to check its config. `encoder.model`, `encoder.preprocess` and `encoder.gpu_images` use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from encoder.storage import cache_dir

__all__ = ["RESIZES", "DecodeLimits", "EncoderConfig"]

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
