"""Load a SigLIP image tower and embed images with it.

A checkpoint is a Hugging Face Hub id, a local directory, or a gs:// directory
(copied to a local cache first). Weights load from safetensors only; pickle
files are refused and remote code is never run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from encoder.configs import EncoderConfig
from encoder.cuda_graph import Capture, GraphedStep, capture_cuda_graph
from encoder.devices import gpu_for_process
from encoder.failures import device_failed
from encoder.gelu_epilogue import gelu_in_epilogue
from encoder.patch_embedding import patch_embedding_as_matmul
from encoder.preprocess import (
    DecodeLimits,
    PreprocessConfig,
    channel_stats,
    check_pixel_batch,
    decode_image,
    normalize_pixels,
    prepare_image,
)
from encoder.siglip_tower import load_tower, not_a_checkpoint, read_tower_config
from encoder.sm_share import SmShare, SmShareError, share_sms
from encoder.stamps import Remembered, file_stamps
from encoder.storage import describe_error, download_gcs_dir, is_gcs

__all__ = [
    "EncoderConfig",
    "ImageEncoder",
    "PendingVectors",
    "batch_for_memory",
    "fit_batch_size",
    "load_encoder",
    "model_version",
    "pick_device",
    "quiet_transformers",
    "read_preprocess",
    "resolve_checkpoint",
]

log = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]
# SigLIP's image tower as this project computes it (`encoder.siglip_tower`), not transformers' `SiglipVisionModel`:
# the same vectors without importing transformers' modelling code (~2.3 s a process); off only to measure the two.
OWN_TOWER = True
# The tower's patch convolution as one matrix product (`encoder.patch_embedding`); off only to measure the two.
PATCHES_AS_MATMUL = True
# On CUDA, the MLPs' GELU in the first product's epilogue (`encoder.gelu_epilogue`); off only to measure the two.
GELU_IN_EPILOGUE = True


def resolve_checkpoint(source: str, cache_dir: str | Path) -> Path:
    """Turn a Hub id, local directory or gs:// directory into a local directory.

    Raises:
        FileNotFoundError: the directory or Hub repository does not exist.
        ValueError: the checkpoint has pickle weights only.
    """
    if is_gcs(source):
        path = download_gcs_dir(source, cache_dir)
    elif os.path.isdir(source):
        path = Path(source)
    elif os.path.exists(source) or source.startswith((".", "/")) or source.count("/") > 1:
        raise FileNotFoundError(f"model {source!r} is not a checkpoint directory")
    else:
        path = _download_from_hub(source)
    _check_safetensors(path)
    return path


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except HFValidationError as err:
        raise FileNotFoundError(f"model {repo_id!r} is neither a directory nor a Hub id") from err
    except Exception as err:  # noqa: BLE001 - hub errors vary; say what to do
        raise FileNotFoundError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: {err}); "
            "pass a local or gs:// directory, or run once online to fill the cache"
        ) from err


def _check_safetensors(path: Path) -> None:
    names = [p.name for p in path.iterdir()]
    if not (path / "config.json").is_file():
        raise not_a_checkpoint(path)
    if not any(n.endswith(".safetensors") for n in names):
        pickles = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
        hint = f" (found pickle weights {pickles}, refused: convert them to safetensors)" if pickles else ""
        raise ValueError(f"{path} has no .safetensors weights{hint}")


def model_version(vision_state: dict[str, torch.Tensor], preprocess: PreprocessConfig) -> str:
    """Content hash of the image tower's weights and the preprocessing config.

    Independent of file layout: the same tower saved alone or inside a two-tower
    checkpoint has the same version.
    """
    digest = hashlib.sha256()
    for name in sorted(vision_state):
        tensor = vision_state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    digest.update(preprocess.canonical_json().encode())
    return f"siglip-{digest.hexdigest()[:16]}"


_VERSIONS: dict[str, str] = {}
_VERSION_RECIPE = 1  # `model_version`'s recipe: changing it makes every version remembered on disk stale
_SETTLED_S = 2.0  # files changed this recently are not remembered on disk: a coarse clock could hide the next change


def _cached_version(path: Path, preprocess: PreprocessConfig, compute, cache_dir: str | Path | None = None) -> str:
    """`model_version`, hashed once per checkpoint: hashing a tower's weights takes 0.36 s for base and 2.9 s for
    so400m on a 2-core CPU, and every process that loads the model would pay it, every run (the launcher, each local
    worker process). Remembered in this process, and on disk under `cache_dir/versions/` for later processes on this
    machine, keyed by the checkpoint's files' stamps (`encoder.stamps`: a checkpoint rewritten in place is hashed
    again; files changed in the last `_SETTLED_S` seconds are hashed and not remembered on disk)."""
    stamps = file_stamps(sorted(f for f in path.iterdir() if f.is_file()))
    key = json.dumps([_VERSION_RECIPE, str(path.resolve()), preprocess.canonical_json(), stamps])
    if key in _VERSIONS:
        return _VERSIONS[key]
    remembered = Remembered(Path(cache_dir) / "versions", key) if cache_dir is not None else None
    version = remembered.get(_is_version) if remembered is not None else None
    if version is None:
        version = compute()
        if remembered is not None:
            remembered.put(version, stamps, _SETTLED_S)
    _VERSIONS[key] = version
    return version


def _is_version(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"siglip-[0-9a-f]{16}", value) is not None


def pick_device(requested: str) -> torch.device:
    """The device to use; CUDA devices always carry an index (some torch.cuda calls refuse a bare "cuda").
    A bare "cuda" on a machine with several GPUs is the one this process claimed (`encoder.devices`), so
    processes that each load a model spread over the GPUs instead of all landing on the first."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("device auto → %s", requested)
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} requested but CUDA is not available")
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = gpu_for_process()
    return device


def _pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, requested)


class ImageEncoder:
    """A SigLIP image tower with its preprocessing; `embed` gives L2-normalised vectors."""

    def __init__(
        self,
        vision_model: torch.nn.Module,
        preprocess: PreprocessConfig,
        version: str,
        *,
        batch_size: int = 64,
        limits: DecodeLimits = DecodeLimits(),
        static_batch: bool = False,
    ) -> None:
        self.vision_model = vision_model
        self.preprocess = preprocess
        self.model_version = version
        self.batch_size = batch_size
        self.limits = limits
        self.static_batch = static_batch  # pad short chunks so a compiled graph sees one shape
        first = next(vision_model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.dim = int(vision_model.config.hidden_size)
        self.graph: GraphedStep | None = None  # set by `capture_graph`
        self._compiled_forward = None  # set by `compile`
        self.compile_s: float | None = None  # how long `load_encoder` took to compile the step, when it did
        # Where the GPU worker's stream of batches runs the model: on a share of the SMs (`encoder.sm_share`); None:
        # on the stream it is called from, every SM.
        self.sm_share: SmShare | None = None

    def embed(self, images: Sequence[Image.Image | bytes | str | os.PathLike]) -> np.ndarray:
        """Embed PIL images, encoded bytes or file paths.

        Returns:
            (n, dim) float32, L2-normalised.

        Raises:
            ImageDecodeError: an input cannot be decoded (use `decode_image` per item
                to dead-letter instead).
        """
        prepared = [self._prepare(image) for image in images]
        if not prepared:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_prepared(np.stack(prepared))

    def _prepare(self, image: Image.Image | bytes | str | os.PathLike) -> np.ndarray:
        if isinstance(image, Image.Image):
            return prepare_image(image, self.preprocess)
        if isinstance(image, (str, os.PathLike)):
            image = Path(image).read_bytes()
        return decode_image(image, self.preprocess, self.limits)

    def embed_prepared(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Embed prepared images in chunks of `batch_size`.

        Args:
            batch: (n, height, width, 3) uint8 from `decode_image` / `prepare_image`, on the
                host or already on the model's device (`encoder.gpu_images`).

        Returns:
            (n, dim) float32, L2-normalised.
        """
        return self.launch(batch).result()

    @torch.inference_mode()
    def launch(self, batch: np.ndarray | torch.Tensor, eager: bool = False) -> PendingVectors:
        """`embed_prepared` without waiting for the device: the work is queued on the current CUDA stream and
        the vectors are on their way to the host when this returns, so the caller can launch the next batch
        before taking this one's (`PendingVectors.result`) and the GPU never waits on the host in between.
        On the CPU the vectors are done on return.

        `eager`: the model's eager step at the batch's own size, without the compiled step, its padding or the
        CUDA graph: for the pieces of a batch that failed (`encoder.gpu_stream.embed_checked`), which padded
        back to the batch size would cost a whole batch each, and fail again where the batch ran out of memory,
        and unpadded would compile the step again for each new size."""
        cuda = self.device.type == "cuda"
        out = torch.empty((len(batch), self.dim), dtype=torch.float32, pin_memory=cuda)
        graphed = self.graph is not None and not eager
        for start in range(0, len(batch), self.batch_size):
            chunk = torch.as_tensor(batch[start : start + self.batch_size])
            n = len(chunk)
            if not (eager or graphed) and self.static_batch and n < self.batch_size:  # one shape: pad, then drop
                chunk = torch.cat([chunk, chunk.new_zeros((self.batch_size - n, *chunk.shape[1:]))])
            if chunk.device != self.device and cuda:
                chunk = chunk.pin_memory()
            if graphed:  # copies the chunk in itself, from the host or the device
                self.graph(chunk, out[start : start + n])
                continue
            chunk = chunk.to(self.device, non_blocking=True)
            out[start : start + n].copy_(self._step(chunk, eager)[:n], non_blocking=True)
        done = None
        if cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
        return PendingVectors(out, done)

    def _step(self, pixels: torch.Tensor, eager: bool = False) -> torch.Tensor:
        """What the device does for a batch: (n, h, w, 3) uint8 on the device -> (n, dim) unit float32; `eager`:
        without the compiled step."""
        check_pixel_batch(pixels)
        if torch.is_inference_mode_enabled() and not pixels.is_inference():
            # One kind of tensor in: a compiled step guards on it, and would compile again for a batch made
            # outside inference mode (a caller's own tensor) after ones made in it (host batches, padding, the
            # GPU decoder's, which `encoder.gpu_stream` resizes in inference mode).
            pixels = pixels.clone()  # 38 MB for 256 images at 224 px: ~0.1% of the step's time on a GPU
        forward = (None if eager else self._compiled_forward) or ImageEncoder._forward
        return forward(self, pixels, *channel_stats(self.preprocess, pixels.device))

    def _forward(self, pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """`_step` past its checks, which `compile` compiles whole: the pixels' rescale and normalisation fuse
        into one kernel, where eager they are six passes over the batch in float32 (~1.7 GB of memory traffic
        for 256 images at 224 px, ~0.6 ms of an H100's ~25 ms step). The stats come in as arguments, so their
        one-off creation stays out of the graph."""
        pixel_values = normalize_pixels(pixels, self.preprocess, mean, std).to(self.dtype)
        features = self.vision_model(pixel_values=pixel_values)
        return torch.nn.functional.normalize(features.pooler_output.float(), dim=-1)

    def compile(self, mode: str | None = None) -> None:
        """Compile the model's step for the batch size (`torch.compile`, static shapes): short chunks are padded
        to it from now on. `mode`: a `torch.compile` mode (None: the default one)."""
        # The function, not this encoder's bound method: kept here, that would make a reference cycle, and the
        # model's memory would wait for the cyclic collector once the encoder is dropped.
        self._compiled_forward = torch.compile(ImageEncoder._forward, dynamic=False, mode=mode)
        self.static_batch = True

    @torch.inference_mode()
    def capture_graph(self, capture: Capture = capture_cuda_graph) -> bool:
        """Replay `_step` as one graph at `batch_size` from now on (`encoder.cuda_graph`); call it after the
        batch size is final. A model that cannot be captured keeps running as it did, with a warning.

        Returns:
            Whether the graph is in use.
        """
        size = (self.batch_size, self.preprocess.height, self.preprocess.width, 3)
        try:
            self.graph = GraphedStep(self._step, torch.zeros(size, dtype=torch.uint8, device=self.device), capture)
        except RuntimeError as err:  # out of memory, or a model that synchronises mid-forward
            log.warning("could not capture the model as a CUDA graph (%s); running it without one", err)
            self.graph = None
        return self.graph is not None


@dataclass
class PendingVectors:
    """A batch's vectors while the device computes them."""

    vectors: torch.Tensor  # (n, dim) float32 on the host: pinned, filled by the device, when it is a GPU
    done: torch.cuda.Event | None  # recorded after the copy to the host; None when computed already

    def result(self) -> np.ndarray:
        """(n, dim) float32, L2-normalised; waits for the device (without holding the GIL)."""
        if self.done is None:
            return self.vectors.numpy()
        self.done.synchronize()
        return self.vectors.numpy().copy()  # a copy, so the pinned buffer goes back to torch's cache now


def batch_for_memory(free_bytes: int, per_image_bytes: int, cap: int = 1024, multiple: int = 8,
                     headroom: float = 0.7) -> int:  # fmt: skip
    """The largest batch, a multiple of `multiple` up to `cap`, whose activations use `headroom` of free memory."""
    fits = int(free_bytes * headroom) // max(1, per_image_bytes)
    return max(1, min(cap, fits // multiple * multiple or min(fits, multiple) or 1))


@torch.inference_mode()
def fit_batch_size(encoder: ImageEncoder, cap: int = 1024) -> int:
    """Measure activation memory per image on this GPU, then size the batch to its free memory."""
    if encoder.device.type != "cuda":
        return encoder.batch_size
    size = (encoder.preprocess.height, encoder.preprocess.width, 3)
    peaks = []
    for n in (8, 16):
        torch.cuda.synchronize(encoder.device)
        torch.cuda.reset_peak_memory_stats(encoder.device)
        base = torch.cuda.memory_allocated(encoder.device)
        pixels = torch.zeros((n, *size), dtype=torch.uint8, device=encoder.device)
        ImageEncoder._forward(encoder, pixels, *channel_stats(encoder.preprocess, encoder.device))  # eager, always
        peaks.append(torch.cuda.max_memory_allocated(encoder.device) - base)
    per_image = max(1, (peaks[1] - peaks[0]) // 8)
    free, _ = torch.cuda.mem_get_info(encoder.device)
    return batch_for_memory(free, per_image, cap)


def load_encoder(cfg: EncoderConfig, limits: DecodeLimits = DecodeLimits()) -> ImageEncoder:
    """Load the image tower and preprocessing of a SigLIP checkpoint.

    Raises:
        FileNotFoundError, ValueError: missing checkpoint, pickle-only weights, not SigLIP, a preprocessing whose
            images the tower cannot take.
    """
    path = resolve_checkpoint(cfg.model, cfg.cache_dir)
    shape = read_tower_config(path)
    preprocess = read_preprocess(path)
    grid = (preprocess.height // shape.patch_size, preprocess.width // shape.patch_size)
    if grid != (shape.grid, shape.grid):  # the position embeddings are for the tower's own grid of patches
        raise ValueError(f"{cfg.model}'s preprocessor_config.json makes {preprocess.height}x{preprocess.width} images "
                         f"but its tower takes {shape.image_size}x{shape.image_size}")  # fmt: skip
    device = pick_device(cfg.device)
    dtype = _pick_dtype(cfg.dtype, device)
    model = load_tower(path, shape) if OWN_TOWER else _transformers_tower(cfg.model, path)
    version = _cached_version(path, preprocess, lambda: model_version(model.state_dict(), preprocess), cfg.cache_dir)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if PATCHES_AS_MATMUL:
        patch_embedding_as_matmul(model)
    if GELU_IN_EPILOGUE:
        gelu_in_epilogue(model, device)
    encoder = ImageEncoder(model, preprocess, version, batch_size=cfg.batch_size or 64, limits=limits)
    if device.type == "cuda":  # never more than fits: 0 asks for the largest that does
        encoder.batch_size = fit_batch_size(encoder, cap=cfg.batch_size or 1024)
    if cfg.compile:
        encoder.compile()
        encoder.compile_s = _compile_now(encoder, frozen=cfg.compile_frozen)
    if cfg.cuda_graph and device.type != "cuda":
        log.warning("cuda_graph needs a CUDA device; the model runs on %s without one", device)
    elif cfg.cuda_graph:
        encoder.capture_graph()  # of the compiled step, when asked for both
    if cfg.decode_sms:
        encoder.sm_share = _share_sms(encoder, cfg.decode_sms)
    log.info("loaded %s (%s) on %s as %s, batch %d%s", cfg.model, version, device, dtype, encoder.batch_size,
             ", one CUDA graph" if encoder.graph is not None else "")  # fmt: skip
    return encoder


def _transformers_tower(name: str, path: Path) -> torch.nn.Module:
    """transformers' `SiglipVisionModel` for the checkpoint (with `OWN_TOWER` off: to measure the two)."""
    from transformers import SiglipVisionModel

    # SDPA attention everywhere: same numbers as eager in fp32, far faster in bf16 on CUDA.
    with quiet_transformers():  # a two-tower checkpoint always has "unexpected" text weights; missing ones we check
        model, info = SiglipVisionModel.from_pretrained(
            path, use_safetensors=True, trust_remote_code=False, attn_implementation="sdpa", output_loading_info=True
        )
    if info["missing_keys"]:  # would otherwise be silently random
        raise ValueError(f"{name} lacks image-tower weights: {sorted(info['missing_keys'])[:5]}")
    return model


def _share_sms(encoder: ImageEncoder, decode_sms: int) -> SmShare | None:
    """`share_sms`, once a batch of the model's step has run there; or None, with a warning, where the device, torch
    or its driver cannot share the SMs, or the step cannot run on its share (a kernel that will not launch there):
    the model then runs on every SM, as it would without `decode_sms`, rather than fail every batch of a run.

    Raises:
        ValueError: `decode_sms` does not fit the GPU.
        torch.AcceleratorError: the device itself failed (`device_failed`).
    """
    try:
        share = share_sms(encoder.device, decode_sms)
    except SmShareError as err:
        log.warning("decode_sms %d ignored (%s): the model runs on every SM", decode_sms, err)
        return None
    if encoder.device.type == "cuda":
        # torch caches freed memory per stream: what the load's batches left cached on the default stream would not
        # serve the share's, and a batch size fitted to the free memory leaves no room for both
        torch.cuda.synchronize(encoder.device)
        torch.cuda.empty_cache()
    size = (encoder.batch_size, encoder.preprocess.height, encoder.preprocess.width, 3)
    try:
        with torch.cuda.stream(share.stream):
            encoder.embed_prepared(torch.zeros(size, dtype=torch.uint8, device=encoder.device))
    except Exception as err:  # noqa: BLE001 - any failure there: the whole GPU still runs it
        if device_failed(err):
            raise
        log.warning("decode_sms %d ignored: the model's step did not run on %d of %d SMs (%s); it runs on every SM",
                    decode_sms, share.model_sms, share.total_sms, describe_error(err))  # fmt: skip
        return None
    return share


def _compile_now(encoder: ImageEncoder, frozen: bool) -> float | None:
    """Compile the step now, at the batch size: a run's first batch does not wait for it, and its cost is the
    load's, reported apart (`compile_s`, the embed manifest's `time_s`). A step that cannot compile (no compiler
    for the device, an inductor error) runs eagerly from now on, with a warning, as a model that cannot be
    captured as a CUDA graph does.

    `frozen`: with inductor's freezing: the weights become constants, so the query, key and value projections,
    which read one input, run as one GEMM. Freezing is read from inductor's config while the first call compiles
    (given as `torch.compile(options=...)` it is not applied); later calls of the same shape run that graph.

    Returns:
        The seconds the compile took, or None where it failed.
    """
    import torch._inductor.config

    size = (encoder.batch_size, encoder.preprocess.height, encoder.preprocess.width, 3)
    started = time.monotonic()
    try:
        with torch._inductor.config.patch(freezing=True) if frozen else contextlib.nullcontext():
            encoder.embed_prepared(torch.zeros(size, dtype=torch.uint8, device=encoder.device))
    except Exception as err:  # noqa: BLE001 - any compile failure: the eager step still runs
        if device_failed(err):  # the device itself failed: nothing runs on it
            raise
        log.warning("could not compile the model (%s); running it without compiling", describe_error(err))
        encoder._compiled_forward, encoder.static_batch = None, False
        return None
    return time.monotonic() - started


@contextlib.contextmanager
def quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def read_preprocess(path: Path) -> PreprocessConfig:
    config_file = path / "preprocessor_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no preprocessor_config.json; cannot reproduce its preprocessing")
    return PreprocessConfig.from_processor_dict(json.loads(config_file.read_text()))
