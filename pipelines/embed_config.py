"""A run of the embed pipeline's settings (`EmbedConfig`), checked where they are made, without the pipeline's heavy
imports (Beam, torch, pyarrow): the command line and the nightly config check a run's settings in the first fraction
of a second, and an orchestrator's task that never embeds never imports the pipeline to check its config.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime

from encoder.configs import RESIZES, DecodeLimits, EncoderConfig
from encoder.storage import check_id
from pipelines.dates import parse_when

__all__ = ["ROWS_PER_SHARD", "EmbedConfig"]

# A fetch chunk is 4 items per fetch thread, read and decoded as a whole: 1,024 images of 224 px is ~150 MB; a typo'd
# 16000 would hold 64,000 (~10 GB) per chunk in flight.
MAX_FETCH_THREADS = 256
ROWS_PER_SHARD = 100_000  # ~300 MB of 768 float32s: a few thousand files for a catalog of hundreds of millions


@dataclass(frozen=True)
class EmbedConfig:
    """How catalog images become vectors."""

    catalog: str  # manifest (Parquet/CSV/JSONL), a glob of them, or a glob of images; local or gs://
    model: str  # Hub id, local directory or gs:// directory
    out: str  # output root; runs land in out/embeddings/<run_id>/
    batch_size: int = 64  # images per forward pass (CPU); use ~256 on a GPU
    fetch_threads: int = 16  # concurrent CPU decodes and local reads per worker process
    hedge_reads: bool = True  # object-store reads in the latency tail get a second request (pipelines.hedged_reads)
    page_lock_reads: bool = True  # a GPU worker's file readers' ring page-locked for its GPU (encoder.page_lock)
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    compile_frozen: bool = False  # with compile: weights as constants, Q, K, V in one GEMM (EncoderConfig)
    cuda_graph: bool = False  # replay the model's device step as one CUDA graph (encoder.cuda_graph)
    decode_sms: int = 0  # on a GPU worker, SMs the model leaves free for decoding and resizing (encoder.sm_share)
    gpu_decode: str = "auto"  # auto | on | off: JPEGs decoded and resized on the GPU (encoder.gpu_images)
    gpu_decoder: str = "auto"  # auto | nvimgcodec (NVIDIA nvImageCodec) | nvjpeg (torchvision): gpu_decoder_name
    gpu_decode_threads: int = 1  # threads decoding batches at once on the GPU, a decoder and stream each
    gpu_resize: str = "products"  # products | kernel (Triton): how the GPU resize sums its taps (encoder.gpu_images)
    draft: bool = True  # JPEG draft-mode decoding (see README, "Preprocessing")
    max_image_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 100_000_000
    max_decode_s: float = 30.0  # an image still decoding after this is dead-lettered and its thread abandoned
    max_dead_letters: float = 0.5  # a run with more of its items dead-lettered is refused (pipelines.dead_letters)
    incremental: bool = True  # reuse vectors of unchanged images from an earlier run
    previous: str | None = None  # that earlier run's directory; default: the latest complete one under `out`
    workers: int = 1  # local runner: >1 runs that many worker processes
    fork_workers: bool = True  # those processes forked from one that imported their modules once (worker_fork)
    reembed_since: str | None = None  # ISO date: items with updated_at on or after it are never reused
    reuse_memory_mb: int = 1024  # earlier vectors up to this size are joined in memory per worker; beyond, by a shuffle
    rows_per_shard: int = ROWS_PER_SHARD  # a bundle's rows beyond it go to more files (pipelines.shard_files)
    run_id: str = field(default_factory=lambda: f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}")

    def __post_init__(self) -> None:
        if self.reuse_memory_mb < 0:
            raise ValueError(f"reuse_memory_mb must be >= 0, got {self.reuse_memory_mb}")
        for name in ("batch_size", "fetch_threads", "gpu_decode_threads", "max_image_bytes", "max_image_pixels",
                     "rows_per_shard", "workers"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fetch_threads > MAX_FETCH_THREADS:
            raise ValueError(
                f"fetch_threads must be at most {MAX_FETCH_THREADS}, got {self.fetch_threads}: a fetch chunk "
                f"holds 4 images per thread, so {self.fetch_threads:,} would hold "
                f"{4 * self.fetch_threads:,} images at once"
            )
        if self.gpu_decode not in ("auto", "on", "off"):
            raise ValueError(f"gpu_decode must be auto, on or off, got {self.gpu_decode!r}")
        if self.gpu_decoder not in ("auto", "nvimgcodec", "nvjpeg"):
            raise ValueError(f"gpu_decoder must be auto, nvimgcodec or nvjpeg, got {self.gpu_decoder!r}")
        if self.gpu_resize not in RESIZES:
            raise ValueError(f"gpu_resize must be one of {', '.join(RESIZES)}, got {self.gpu_resize!r}")
        if not self.max_decode_s > 0:
            raise ValueError(f"max_decode_s must be > 0, got {self.max_decode_s}")
        if not 0 <= self.max_dead_letters <= 1:
            raise ValueError(f"max_dead_letters is a share of the items, 0 to 1; got {self.max_dead_letters}")
        if self.reembed_since is not None:
            parse_when(self.reembed_since)
        check_id(self.run_id, "run_id")
        self.encoder  # noqa: B018 - checks the encoder's fields (dtype, device, compile_frozen) before any work

    @property
    def encoder(self) -> EncoderConfig:
        return EncoderConfig(model=self.model, device=self.device, dtype=self.dtype, batch_size=self.batch_size,
                             compile=self.compile, compile_frozen=self.compile_frozen,
                             cuda_graph=self.cuda_graph, decode_sms=self.decode_sms)  # fmt: skip

    @property
    def limits(self) -> DecodeLimits:
        return DecodeLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels, draft=self.draft)


def option(setting: str) -> str:
    """A run's setting as `lookalike embed`'s option: `batch_size` → `--batch-size`."""
    return f"--{setting.replace('_', '-')}"


# `lookalike embed`'s options, offered where a flag handed on to Beam is not Beam's.
EMBED_OPTIONS = tuple(option(f.name) for f in fields(EmbedConfig))
