"""The GPU resize as two Triton kernels (`encoder/resize_kernel.py`): on a CPU through Triton's interpreter, against
the dense products of `resize_like_pil` (the same taps) and against Pillow; on a GPU (`gpu`), compiled."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.common import realistic_jpegs
from encoder import DecodeLimits, PreprocessConfig, resize_kernel
from encoder.gpu_images import GpuImages
from encoder.resize import PackedImages, pack_images, resize_like_pil


@pytest.fixture(autouse=True)
def interpreted_on_the_cpu(monkeypatch):
    """Without CUDA the kernels are made for Triton's interpreter (read when they are defined), and made again after."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    resize_kernel._kernels.cache_clear()
    yield
    resize_kernel._kernels.cache_clear()


def _interleaved(tensors: list[torch.Tensor]) -> PackedImages:
    """(3, h, w) images packed (h, w, 3) side by side, as nvImageCodec decodes a batch."""
    parts = [t.permute(1, 2, 0).reshape(-1) for t in tensors]
    offsets = np.cumsum([0] + [p.numel() for p in parts[:-1]]).tolist()
    return PackedImages(torch.cat(parts), tuple(offsets), tuple((t.shape[1], t.shape[2]) for t in tensors), False)


@pytest.mark.parametrize("draft", [False, True])
@pytest.mark.parametrize("planar", [False, True], ids=["interleaved", "planar"])
def test_the_kernels_give_the_products_values_in_float32(planar, draft):
    """The same taps summed in another order: every value as `resize_like_pil`'s float32 products round it, for
    images of many sizes (one smaller than the output, one a single pixel wide), up- and downscaled, in several runs
    of the vertical pass's buffer, bicubic and bilinear."""
    rng = np.random.default_rng(5)
    sizes = [(40, 50), (37, 61), (24, 24), (5, 7), (90, 33), (1, 30), (66, 1)]
    tensors = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in sizes]
    packed = pack_images(tensors) if planar else _interleaved(tensors)
    assert packed.planar == planar
    for resample in (3, 2):
        cfg = PreprocessConfig(height=22, width=20, resample=resample)  # rows: not a multiple of a program's 4
        ours = resize_kernel.resize_packed(packed, cfg, draft=draft, max_buffer_bytes=3 * 4 * 22 * 3 * 90)  # 3 a run
        products = resize_like_pil(packed, cfg, dtype=torch.float32, draft=draft)
        assert ours.shape == (len(sizes), 22, 20, 3) and ours.dtype == torch.uint8
        apart = (ours.int() - products.int()).abs()
        assert apart.max() <= 1 and (apart == 0).float().mean() > 0.999, (apart.max(), (apart == 0).float().mean())


def test_photos_resize_as_pillow_does(tmp_path):
    """Two real photos to the model's 224 px, interleaved as the GPU decoder hands them over: as near Pillow as the
    products are (within 4 levels at bicubic overshoots, README "GPU decode"; within one level as often)."""
    jpegs = [p.read_bytes() for p in realistic_jpegs(tmp_path, 2, width=320)]
    images = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in jpegs]
    cfg = PreprocessConfig(height=224, width=224, resample=3)
    packed = _interleaved([torch.from_numpy(i.copy()).permute(2, 0, 1) for i in images])
    pil = np.stack([np.asarray(Image.fromarray(i).resize((224, 224), 3)) for i in images]).astype(int)
    diff = np.abs(resize_kernel.resize_packed(packed, cfg).numpy().astype(int) - pil)
    products = np.abs(resize_like_pil(packed, cfg, dtype=torch.float32).numpy().astype(int) - pil)
    assert diff.max() <= max(4, products.max()) and (diff <= 1).mean() > (products <= 1).mean() - 1e-4, (
        diff.max(), (diff <= 1).mean(), (products <= 1).mean())  # fmt: skip


def test_resize_like_pil_takes_the_kernels_for_a_list_of_images_too():
    """`resize_like_pil(kernel=True)` over separate images (a grey one among them) packs them first: the products'
    values."""
    rng = np.random.default_rng(8)
    images = [torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in [(3, 30, 40), (1, 20, 10)]]
    cfg = PreprocessConfig(height=16, width=16)
    ours = resize_like_pil(images, cfg, kernel=True)
    assert torch.equal(ours, resize_like_pil(images, cfg, dtype=torch.float32))


def test_the_gpu_worker_resizes_with_the_kernels_when_asked(tmp_path, monkeypatch):
    """`GpuImages(resize="kernel")` (`--gpu-resize kernel`): a batch of JPEGs decoded by a GPU decoder (Pillow
    standing in, on the CPU) comes out as the products make it, within a level; the CPU path's images untouched."""
    jpegs = [p.read_bytes() for p in realistic_jpegs(tmp_path, 3, width=96)]
    cfg = PreprocessConfig(height=24, width=24)
    calls, resize_packed = [], resize_kernel.resize_packed
    monkeypatch.setattr(resize_kernel, "resize_packed", lambda images, *a, **k: calls.append(len(images))
                        or resize_packed(images, *a, **k))  # fmt: skip
    batches = {resize: GpuImages(cfg, "cpu", DecodeLimits(), decoder="pil", cpu_threads=2, resize=resize)
               .prepare([*jpegs, b"not an image"]) for resize in ("kernel", "products")}  # fmt: skip
    ours, products = batches["kernel"], batches["products"]
    assert ours.kept == products.kept == [0, 1, 2] and ours.on_gpu == 3 and ours.failed == products.failed
    assert [i for i, _ in ours.failed] == [3] and calls == [3]  # the kernels took the batch, the products not
    assert (ours.pixels.int() - products.pixels.int()).abs().max() <= 1


def test_kernels_that_cannot_run_are_given_up_for_the_products_once(tmp_path, monkeypatch, caplog):
    """Kernels that fail otherwise than for memory (Triton unable to build them for a GPU, say): the run goes on with
    the products, one warning; running out of memory is the backoff's, as for the products."""
    jpegs = [p.read_bytes() for p in realistic_jpegs(tmp_path, 2, width=96)]
    cfg = PreprocessConfig(height=16, width=16)
    products = GpuImages(cfg, "cpu", decoder="pil", cpu_threads=2).prepare(jpegs).pixels
    calls = []

    def broken(images, *args, **kwargs):
        calls.append(len(images))
        raise RuntimeError("PTX .version 9.9 does not support .target sm_35")

    monkeypatch.setattr(resize_kernel, "resize_packed", broken)
    images = GpuImages(cfg, "cpu", decoder="pil", cpu_threads=2, resize="kernel")
    with caplog.at_level("WARNING", logger="encoder.gpu_images"):
        first, second = images.prepare(jpegs), images.prepare(jpegs)
    assert torch.equal(first.pixels, products) and torch.equal(second.pixels, products) and first.failed == []
    assert calls == [2] and images.resize == "products"
    assert [r.getMessage() for r in caplog.records if "kernels failed" in r.getMessage()] == [
        "the GPU resize's kernels failed (RuntimeError: PTX .version 9.9 does not support .target sm_35): resizing "
        "with the products from now on"
    ]

    def out_of_memory(images, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(resize_kernel, "resize_packed", out_of_memory)
    images = GpuImages(cfg, "cpu", decoder="pil", cpu_threads=2, resize="kernel")
    batch = images.prepare(jpegs)
    assert images.resize == "kernel" and batch.kept == [] and all("out of memory" in why for _, why in batch.failed)


def test_the_gpu_worker_refuses_a_resize_it_does_not_know_or_cannot_run(monkeypatch):
    cfg = PreprocessConfig(height=8, width=8)
    with pytest.raises(ValueError, match="resize must be one of products, kernel"):
        GpuImages(cfg, "cpu", decoder="pil", resize="fast")
    monkeypatch.setattr(resize_kernel, "available", lambda: False)
    with pytest.raises(ValueError, match="need Triton"):
        GpuImages(cfg, "cpu", decoder="pil", resize="kernel")


@pytest.mark.parametrize("n", [1, 3, 5, 6, 7, 10])
def test_every_array_the_kernels_take_is_16_byte_aligned_whatever_the_count(monkeypatch, n):
    """Triton compiles a kernel once per alignment of its pointers: a batch of an odd count (images routed to the
    CPU) must not make it compile another mid-run, in one run or several (a small buffer)."""
    pointers = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **meta: pointers.extend(a.data_ptr() for a in args if isinstance(a, torch.Tensor))

    def kernels():
        return Recorder(), Recorder()

    kernels.cache_clear = lambda: None  # as the fixture's teardown, before the patch is undone, expects
    monkeypatch.setattr(resize_kernel, "_kernels", kernels)
    rng = np.random.default_rng(n)
    images = _interleaved([torch.from_numpy(rng.integers(0, 256, (3, 20 + k, 30 + 2 * k), dtype=np.uint8))
                           for k in range(n)])  # fmt: skip
    cfg = PreprocessConfig(height=16, width=16, resample=3)
    for budget in (1 << 28, 4 * 16 * 3 * (30 + 2 * n) * 5):  # every image in one run; runs of 4 (room for 5)
        pointers.clear()
        resize_kernel.resize_packed(images, cfg, max_buffer_bytes=budget)
        assert pointers and all(p % 16 == 0 for p in pointers), [p % 16 for p in pointers]


def test_an_empty_batch_resizes_to_nothing():
    empty = PackedImages(torch.zeros(0, dtype=torch.uint8), (), (), False)
    assert resize_kernel.resize_packed(empty, PreprocessConfig(height=8, width=8)).shape == (0, 8, 8, 3)


@pytest.mark.gpu
def test_compiled_on_the_gpu_the_kernels_give_the_products_values(tmp_path):
    """On CUDA, compiled: a batch of real photos of mixed sizes, draft mode as the GPU worker runs it, within a level
    of the float32 products (the sums' order differs) and mostly equal."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    jpegs = [p.read_bytes() for p in realistic_jpegs(tmp_path, 32, width=640)]
    tensors = [torch.from_numpy(np.asarray(Image.open(io.BytesIO(d)).convert("RGB")).copy()).permute(2, 0, 1)
               for d in jpegs]  # fmt: skip
    packed = _interleaved(tensors)
    packed = PackedImages(packed.buffer.cuda(), packed.offsets, packed.shapes, False)
    cfg = PreprocessConfig()
    ours = resize_kernel.resize_packed(packed, cfg, draft=True)
    products = resize_like_pil(packed, cfg, dtype=torch.float32, draft=True)
    apart = (ours.int() - products.int()).abs()
    assert apart.max() <= 1 and (apart == 0).float().mean() > 0.999, (apart.max(), (apart == 0).float().mean())
