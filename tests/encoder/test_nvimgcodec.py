"""The ctypes binding of nvImageCodec's C library: its structures against the shipped header, and decoding on the
CPU (the library's libjpeg-turbo backend, into host memory) through the same calls the GPU path makes."""

from __future__ import annotations

import ctypes
import dataclasses
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from benchmarks.common import realistic_jpegs
from encoder import DecodeLimits, PreprocessConfig, decode_image
from encoder import nvimgcodec as nvic
from encoder.gpu_images import GpuImages
from encoder.jpeg import read_jpeg_header
from tests.support.hostile_jpegs import each_kind, routed_batches

CPU_ONLY = ("libjpeg_turbo_ext",)  # without CUDA libraries the GPU extensions only print errors as they load
C_NAMES = {
    nvic.Properties: "nvimgcodecProperties_t",
    nvic.Orientation: "nvimgcodecOrientation_t",
    nvic.ImagePlaneInfo: "nvimgcodecImagePlaneInfo_t",
    nvic.ImageInfo: "nvimgcodecImageInfo_t",
    nvic.ExecutionParams: "nvimgcodecExecutionParams_t",
    nvic.BackendParams: "nvimgcodecBackendParams_t",
    nvic.Backend: "nvimgcodecBackend_t",
    nvic.DecodeParams: "nvimgcodecDecodeParams_t",
    nvic.InstanceCreateInfo: "nvimgcodecInstanceCreateInfo_t",
}
CONSTANTS = {
    "MAX_CODEC_NAME_SIZE": "NVIMGCODEC_MAX_CODEC_NAME_SIZE",
    "MAX_NUM_PLANES": "NVIMGCODEC_MAX_NUM_PLANES",
    "DEVICE_CPU_ONLY": "NVIMGCODEC_DEVICE_CPU_ONLY",
    "STRUCT_PROPERTIES": "NVIMGCODEC_STRUCTURE_TYPE_PROPERTIES",
    "STRUCT_INSTANCE_CREATE_INFO": "NVIMGCODEC_STRUCTURE_TYPE_INSTANCE_CREATE_INFO",
    "STRUCT_DECODE_PARAMS": "NVIMGCODEC_STRUCTURE_TYPE_DECODE_PARAMS",
    "STRUCT_ORIENTATION": "NVIMGCODEC_STRUCTURE_TYPE_ORIENTATION",
    "STRUCT_IMAGE_INFO": "NVIMGCODEC_STRUCTURE_TYPE_IMAGE_INFO",
    "STRUCT_IMAGE_PLANE_INFO": "NVIMGCODEC_STRUCTURE_TYPE_IMAGE_PLANE_INFO",
    "STRUCT_EXECUTION_PARAMS": "NVIMGCODEC_STRUCTURE_TYPE_EXECUTION_PARAMS",
    "COLORSPEC_SRGB": "NVIMGCODEC_COLORSPEC_SRGB",
    "SAMPLING_NONE": "NVIMGCODEC_SAMPLING_NONE",
    "SAMPLEFORMAT_I_RGB": "NVIMGCODEC_SAMPLEFORMAT_I_RGB",
    "SAMPLE_DATA_TYPE_UINT8": "NVIMGCODEC_SAMPLE_DATA_TYPE_UINT8",
    "BUFFER_KIND_STRIDED_DEVICE": "NVIMGCODEC_IMAGE_BUFFER_KIND_STRIDED_DEVICE",
    "BUFFER_KIND_STRIDED_HOST": "NVIMGCODEC_IMAGE_BUFFER_KIND_STRIDED_HOST",
    "PROCESSING_STATUS_SUCCESS": "NVIMGCODEC_PROCESSING_STATUS_SUCCESS",
    "STRUCT_BACKEND": "NVIMGCODEC_STRUCTURE_TYPE_BACKEND",
    "STRUCT_BACKEND_PARAMS": "NVIMGCODEC_STRUCTURE_TYPE_BACKEND_PARAMS",
    "LOAD_HINT_POLICY_FIXED": "NVIMGCODEC_LOAD_HINT_POLICY_FIXED",
    "STATUS_ARCH_MISMATCH": "NVIMGCODEC_STATUS_ARCH_MISMATCH",
}
BACKEND_KINDS = {"cpu": "CPU_ONLY", "gpu": "GPU_ONLY", "hybrid": "HYBRID_CPU_GPU", "hardware": "HW_GPU_ONLY"}


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[bytes]:
    return [p.read_bytes() for p in realistic_jpegs(tmp_path_factory.mktemp("jpegs"), 8, width=320)]


@pytest.fixture(scope="module")
def cuda_codec():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    codec = nvic.NvImageCodec("cuda")
    yield codec
    codec.close()


@pytest.fixture(scope="module")
def cuda_kinds(cuda_codec):
    """nvImageCodec on the GPU limited to each kind of its decoders (`tests.support.hostile_jpegs.each_kind`)."""
    kinds = each_kind(lambda backends: nvic.NvImageCodec("cuda", backends=backends))
    assert "CUDA decoder" in kinds
    yield kinds
    for codec in kinds.values():
        codec.close()


@pytest.fixture(scope="module")
def codec():
    codec = nvic.NvImageCodec("cpu", extensions=CPU_ONLY, cpu_threads=2)
    yield codec
    codec.close()


def _pillow(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(bytes(data))).convert("RGB"))


def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


def test_structures_and_constants_match_the_shipped_header(tmp_path):
    """Every size, offset, field width and constant the binding uses, as a C compiler sees the header."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to read the header with")
    (tmp_path / "cuda_runtime_api.h").write_text("typedef struct CUstream_st* cudaStream_t;\n")  # as CUDA defines it
    lines, expected = [], []
    for struct, name in C_NAMES.items():
        lines.append(f'printf("%zu\\n", sizeof({name}));')
        expected.append(ctypes.sizeof(struct))
        for field, kind in struct._fields_:
            lines.append(f'printf("%zu %zu\\n", offsetof({name}, {field}), sizeof((({name}*)0)->{field}));')
            expected.append(f"{getattr(struct, field).offset} {ctypes.sizeof(kind)}")
    for ours, theirs in CONSTANTS.items():
        lines.append(f'printf("%lld\\n", (long long)({theirs}));')
        expected.append(getattr(nvic, ours))
    assert sorted(nvic.BACKENDS) == sorted(BACKEND_KINDS)
    for name, theirs in BACKEND_KINDS.items():
        lines.append(f'printf("%lld\\n", (long long)(NVIMGCODEC_BACKEND_KIND_{theirs}));')
        expected.append(nvic.BACKENDS[name])
    lines.append('printf("%d %d\\n", NVIMGCODEC_VER_MAJOR, NVIMGCODEC_VER_MINOR);')
    expected.append(" ".join(map(str, nvic.SUPPORTED_VERSION)))
    source = tmp_path / "layout.c"
    source.write_text("#include <stddef.h>\n#include <stdio.h>\n#include <nvimgcodec.h>\nint main(void) {\n"
                      + "\n".join(lines) + "\nreturn 0;\n}\n")  # fmt: skip
    include = nvic.library_dir() / "include"
    subprocess.run([compiler, "-I", str(tmp_path), "-I", str(include), str(source), "-o", str(tmp_path / "layout")],
                   check=True, capture_output=True)  # fmt: skip
    printed = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True, text=True).stdout
    assert printed.splitlines() == [str(e) for e in expected]


def test_decodes_bit_for_bit_like_pillow_with_the_same_upsampling(jpegs):
    codec = nvic.NvImageCodec("cpu", extensions=CPU_ONLY, options=":fancy_upsampling=1")  # libjpeg's default
    try:
        images = codec.decode(jpegs)
    finally:
        codec.close()
    for data, image in zip(jpegs, images, strict=True):
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        np.testing.assert_array_equal(_hwc(image), _pillow(data))


def test_default_upsampling_stays_within_a_few_levels_of_pillow(codec, jpegs):
    """The default (`:fancy_upsampling=0`, the package's own default and what was measured on GPUs) replicates
    chroma instead of interpolating it: a few levels at colour edges."""
    for data, image in zip(jpegs, codec.decode(jpegs), strict=True):
        diff = np.abs(_hwc(image).astype(int) - _pillow(data))
        assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 12, (diff.mean(), np.percentile(diff, 99))


def test_what_it_cannot_decode_is_none_and_the_rest_of_the_batch_decodes(codec, jpegs):
    png = io.BytesIO()
    Image.new("RGB", (9, 7), "red").save(png, "PNG")
    batch = [jpegs[0], b"", b"not an image", jpegs[1][: len(jpegs[1]) // 3], png.getvalue(), jpegs[2]]
    images = codec.decode(batch)
    assert [i for i, image in enumerate(images) if image is not None] == [0, 5]
    np.testing.assert_array_equal(_hwc(images[0]), _hwc(codec.decode([jpegs[0]])[0]))
    np.testing.assert_array_equal(_hwc(images[5]), _hwc(codec.decode([jpegs[2]])[0]))
    assert codec.decode([]) == []


def test_views_of_a_larger_buffer_decode_like_their_bytes(codec, jpegs):
    ring = np.zeros(sum(len(d) for d in jpegs[:3]) + 100, np.uint8)
    views, at = [], 7
    for data in jpegs[:3]:
        ring[at : at + len(data)] = np.frombuffer(data, np.uint8)
        views.append(ring[at : at + len(data)])
        at += len(data)
    for view, image, data in zip(views, codec.decode(views), jpegs, strict=False):
        np.testing.assert_array_equal(_hwc(image), _hwc(codec.decode([data])[0]))
        assert view.base is ring  # nothing was copied out of the ring to decode it


def test_outputs_are_views_of_one_buffer_per_batch(codec, jpegs):
    images = codec.decode(jpegs[:4])
    storage = {image.untyped_storage().data_ptr() for image in images}
    assert len(storage) == 1
    sizes = [image.numel() for image in images]
    offsets = [image.storage_offset() for image in images]
    assert offsets == [sum(sizes[:i]) for i in range(4)]  # packed in input order


def test_handles_are_created_once_and_reused(codec, jpegs):
    codec.decode(jpegs[:3])
    first = list(codec._streams[:3]), list(codec._images[:3])
    codec.decode(jpegs[3:6])
    assert (list(codec._streams[:3]), list(codec._images[:3])) == first
    codec.decode(jpegs[:5])  # grows: the first three keep their handles
    assert (list(codec._streams[:3]), list(codec._images[:3])) == first and all(codec._streams[:5])


def test_the_interpreter_lock_is_kept_for_per_image_calls_and_released_for_the_decode(codec):
    """One release per batch: per-image calls are bound with `PyDLL`, the decode and the wait with `CDLL`."""
    pythonapi = ctypes._FUNCFLAG_PYTHONAPI
    lib = codec._lib
    for held in (lib.code_stream_from_host_mem, lib.code_stream_image_info, lib.image_create, lib.statuses):
        assert held._flags_ & pythonapi, held
    for released in (lib.decode, lib.wait):
        assert not released._flags_ & pythonapi, released


def test_another_minor_version_is_refused(monkeypatch):
    monkeypatch.setattr(nvic, "SUPPORTED_VERSION", (0, 8))
    with pytest.raises(nvic.NvImageCodecError, match=r"nvImageCodec 0\.9\.\d+ is installed; .* mirrors 0\.8\.x"):
        nvic.NvImageCodec("cpu", extensions=CPU_ONLY)


def test_a_missing_library_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(nvic.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(nvic.NvImageCodecError, match=r"not installed \(pip install 'lookalike\[gpu\]'\)"):
        nvic.NvImageCodec("cpu")


def test_a_worker_checks_the_library_before_any_work(monkeypatch):
    """`--gpu-decoder nvimgcodec --gpu-decode on` refuses a missing or mismatched library up front, in one line."""
    from pipelines import embed_dofns
    from pipelines.embed import EmbedConfig

    assert nvic.library_problem() is None
    cfg = EmbedConfig(catalog="c", model="m", out="o", gpu_decode="on", gpu_decoder="nvimgcodec")
    monkeypatch.setattr(embed_dofns.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(embed_dofns, "_installed", lambda module: True)  # torchvision, as on a GPU worker
    monkeypatch.setattr(nvic, "SUPPORTED_VERSION", (0, 8))
    with pytest.raises(ValueError, match=r"--gpu-decode on: nvImageCodec 0\.9\.\d+ is installed; .* mirrors 0\.8\.x"):
        embed_dofns.gpu_decoding(cfg, PreprocessConfig())
    monkeypatch.setattr(nvic.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="--gpu-decode on: nvImageCodec is not installed"):
        embed_dofns.gpu_decoding(cfg, PreprocessConfig())
    assert not embed_dofns.gpu_decoding(dataclasses.replace(cfg, gpu_decode="auto"), PreprocessConfig())  # auto: Pillow


def test_backends_restrict_the_decoders_an_instance_may_use(jpegs):
    """The library is given the named kinds only: on the CPU, "cpu" decodes as all of them do, and a GPU kind
    alone leaves it no decoder, which is a clear error (as "hardware" is on a GPU without JPEG engines)."""
    cpu_only = nvic.NvImageCodec("cpu", extensions=CPU_ONLY, cpu_threads=2, backends=("cpu",))
    every = nvic.NvImageCodec("cpu", extensions=CPU_ONLY, cpu_threads=2)
    try:
        for one, other in zip(cpu_only.decode(jpegs[:3]), every.decode(jpegs[:3]), strict=True):
            assert torch.equal(one, other)
        with_hardware = nvic.NvImageCodec("cpu", extensions=CPU_ONLY, cpu_threads=2, backends=("hardware", "cpu"))
        assert all(image is not None for image in with_hardware.decode(jpegs[:2]))
        with_hardware.close()
    finally:
        cpu_only.close()
        every.close()
    for backends in (("hardware",), ("hybrid", "gpu")):
        with pytest.raises(
            nvic.NvImageCodecError, match=re.escape(f"no decoder of the backends {list(backends)} on cpu")
        ):
            nvic.NvImageCodec("cpu", extensions=CPU_ONLY, backends=backends)
    for backends in (("hw",), ()):
        with pytest.raises(nvic.NvImageCodecError, match=r"name one or more of \['cpu', 'gpu', 'hardware', 'hybrid'\]"):
            nvic.NvImageCodec("cpu", extensions=CPU_ONLY, backends=backends)


def test_an_unknown_extension_is_a_clear_error():
    with pytest.raises(nvic.NvImageCodecError, match="extension libnothing_ext not found"):
        nvic.NvImageCodec("cpu", extensions=("libnothing_ext",))


def test_an_instance_loads_only_the_jpeg_decoders_of_its_device_and_they_ship():
    """On a GPU nvJPEG's (the route sends only JPEGs there; what nvJPEG cannot decode goes to the product's CPU
    threads, not to libjpeg-turbo inside the batch's call), on the CPU libjpeg-turbo's; `ALL_EXTENSIONS` as before."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert nvic.default_extensions(cuda, None) == nvic.GPU_EXTENSIONS == ("libnvjpeg_ext",)
    assert nvic.default_extensions(cpu, None) == ("libjpeg_turbo_ext",)
    assert nvic.default_extensions(cuda, nvic.ALL_EXTENSIONS) is None  # the shipped directory, every module in it
    assert nvic.default_extensions(cuda, ("libnvtiff_ext",)) == ("libnvtiff_ext",)
    shipped = nvic.library_dir() / "extensions"
    for name in (*nvic.GPU_EXTENSIONS, *nvic.CPU_EXTENSIONS):
        assert sorted(shipped.glob(f"{name}.so*")), f"{name} is not in {shipped}"


def test_gpu_images_sends_only_what_it_could_not_decode_to_the_cpu(codec, jpegs):
    """A None from the decoder routes that image to Pillow; the rest stay with the decoder, in one call."""
    calls = []

    def decoder(datas, device):
        calls.append(len(datas))
        return [None if i == 1 else image for i, image in enumerate(codec.decode(datas))]

    cfg, limits = PreprocessConfig(height=64, width=64), DecodeLimits(draft=False)
    batch = GpuImages(cfg, "cpu", limits, decoder=decoder, cpu_threads=2).prepare(jpegs[:4])
    assert calls == [4]  # no retry image by image
    assert batch.kept == [0, 1, 2, 3] and batch.failed == [] and batch.on_gpu == 3
    np.testing.assert_array_equal(batch.pixels[1].numpy(), decode_image(jpegs[1], cfg, limits))


def test_a_batch_over_its_decoded_limit_decodes_what_fits_and_leaves_the_rest(codec, jpegs):
    """The buffer holds only what fits in `max_bytes`, the smallest first (`decoded_within`); the rest are left
    out, as images it cannot decode are (the GPU worker decodes those on the CPU threads)."""
    sizes = [_pillow(data).nbytes for data in jpegs[:4]]
    budget = sorted(sizes)[0] + sorted(sizes)[1]
    packed, decoded = codec.decode_packed(jpegs[:4], max_bytes=budget)
    assert decoded == sorted(sorted(range(4), key=lambda i: sizes[i])[:2])  # the two smallest
    alone = codec.decode([jpegs[i] for i in decoded])
    assert all(torch.equal(packed[k], image) for k, image in enumerate(alone))
    widest = max(_pillow(jpegs[i]).shape[1] for i in decoded)
    assert packed.buffer.numel() == budget + 3 * widest  # the others' pixels never allocated
    assert codec.decode_packed(jpegs[:4], max_bytes=sum(sizes))[1] == [0, 1, 2, 3]
    assert codec.decode_packed(jpegs[:4])[1] == [0, 1, 2, 3]  # no limit
    assert codec.decode_packed(jpegs[:2], max_bytes=0)[1] == []


def test_gpu_images_decodes_what_is_over_the_gpu_decoders_limit_on_the_cpu(jpegs, monkeypatch):
    """Through `nvimgcodec_decoder` (its CPU backend): photos past `DECODE_MAX_BYTES` are decoded by Pillow in
    their place, the batch whole and in order."""
    import encoder.gpu_images as gpu_images

    cfg, limits = PreprocessConfig(height=64, width=64), DecodeLimits(draft=False)
    sizes = [_pillow(data).nbytes for data in jpegs[:5]]
    monkeypatch.setattr(gpu_images, "DECODE_MAX_BYTES", sorted(sizes)[0] + sorted(sizes)[1])
    on_gpu = sorted(range(5), key=lambda i: sizes[i])[:2]  # the two smallest
    batch = GpuImages(cfg, "cpu", limits, decoder="nvimgcodec", cpu_threads=2).prepare(jpegs[:5])
    assert batch.kept == [0, 1, 2, 3, 4] and batch.failed == [] and batch.on_gpu == 2
    for row, data in enumerate(jpegs[:5]):  # Pillow's bit for bit; the library's (no fancy upsampling) close
        diff = np.abs(batch.pixels[row].numpy().astype(int) - decode_image(data, cfg, limits).astype(int))
        assert diff.max() <= (12 if row in on_gpu else 0), (row, diff.max())
    for limit, on_gpu in ((sum(sizes), 5), (0, 0)):  # all fit; none does (the `large` path's all-on-the-CPU run)
        monkeypatch.setattr(gpu_images, "DECODE_MAX_BYTES", limit)
        batch = GpuImages(cfg, "cpu", limits, decoder="nvimgcodec", cpu_threads=2).prepare(jpegs[:5])
        assert batch.on_gpu == on_gpu and batch.kept == [0, 1, 2, 3, 4]


@pytest.mark.gpu
def test_on_cuda_it_decodes_into_device_memory_like_the_cpu_backend(jpegs):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    codec = nvic.NvImageCodec("cuda")  # the hardware JPEG engines where the GPU has them, else CUDA
    side = torch.cuda.Stream()
    try:
        with torch.cuda.stream(side):  # decoded on the caller's stream, as the GPU worker's decode stage does
            images = codec.decode([jpegs[0], b"not an image", *jpegs[1:]])
        torch.cuda.current_stream().wait_stream(side)
        assert images[1] is None and all(image.is_cuda for i, image in enumerate(images) if i != 1)
        for data, image in zip(jpegs, images[:1] + images[2:], strict=True):
            diff = np.abs(_hwc(image.cpu()).astype(int) - _pillow(data))
            assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 12, (diff.mean(), np.percentile(diff, 99))
        sizes = [_pillow(data).nbytes for data in jpegs[:4]]
        smallest = sorted(sorted(range(4), key=lambda i: sizes[i])[:2])
        with torch.cuda.stream(side):  # a limit on the decoded bytes that the two smallest fit
            packed, decoded = codec.decode_packed(jpegs[:4], max_bytes=sum(sizes[i] for i in smallest))
        torch.cuda.current_stream().wait_stream(side)
        assert decoded == smallest and packed.buffer.is_cuda
        assert np.abs(_hwc(packed[1].cpu()).astype(int) - _pillow(jpegs[decoded[1]])).mean() < 1.5
    finally:
        codec.close()


def test_gpu_images_resizes_a_packed_batch_and_sends_the_rest_to_the_cpu(codec, jpegs):
    """The packed path end to end: what the decoder left out is decoded by Pillow, in its place."""
    calls = []

    def decoder(datas, device):  # as `nvimgcodec_decoder`, leaving image 2 out as one it could not decode
        calls.append(len(datas))
        packed, decoded = codec.decode_packed(datas)
        keep = [k for k, i in enumerate(decoded) if i != 2]
        return packed.select(keep), [decoded[k] for k in keep]

    cfg, limits = PreprocessConfig(height=64, width=64), DecodeLimits(draft=False)
    batch = GpuImages(cfg, "cpu", limits, decoder=decoder, cpu_threads=2).prepare(jpegs[:5])
    assert calls == [5] and batch.kept == [0, 1, 2, 3, 4] and batch.failed == [] and batch.on_gpu == 4
    np.testing.assert_array_equal(batch.pixels[2].numpy(), decode_image(jpegs[2], cfg, limits))
    separate = GpuImages(cfg, "cpu", limits, decoder=lambda datas, device: codec.decode(datas)).prepare(jpegs[:5])
    assert torch.equal(batch.pixels[[0, 1, 3, 4]], separate.pixels[[0, 1, 3, 4]])  # packed or not: same pixels


def _decode_alone_or_not_at_all(codec, batch: list, max_bytes: int | None, alone: dict | None = None,
                                seeds: tuple[bytes, ...] = ()) -> None:  # fmt: skip
    """`alone`: the decoders that may take an image of the batch, by name (None: `codec`); each decoded image must
    come out as one of them decodes it alone."""
    alone = alone or {"alone": codec}
    packed, decoded = codec.decode_packed(batch, max_bytes)
    assert decoded == sorted(set(decoded)) and all(0 <= i < len(batch) for i in decoded)
    for k, i in enumerate(decoded):
        header = read_jpeg_header(batch[i])
        (height, width), offset = packed.shapes[k], packed.offsets[k]
        assert (height, width) == (header.height, header.width)
        assert offset + 3 * height * width <= packed.buffer.numel()
        images = {name: one.decode([batch[i]])[0] for name, one in alone.items()}
        if any(image is not None and torch.equal(packed[k], image) for image in images.values()):
            continue
        kind = "a seed unchanged" if bytes(batch[i]) in seeds else "damaged"
        if seeds and kind == "damaged" and all(image is None for image in images.values()):
            _the_same_beside_other_neighbours(codec, batch[i], packed[k], seeds, {"its batch's": codec, **alone})
            continue
        seen = {name: _difference(packed[k], image) for name, image in images.items()}
        raise AssertionError(f"image {i} of {batch!r} ({kind}) decoded in its batch, but by no decoder alone: {seen}")


def _the_same_beside_other_neighbours(codec, data, pixels: torch.Tensor, seeds: tuple[bytes, ...], decoders: dict):
    """A damaged image that no decoder takes alone, yet its batch decoded (run E: the hardware decoder reports a whole
    batch decoded when the engines' batched call returns, image by image unchecked, and the CPU path too decodes a
    cut scan, grey where the data ends): what it holds must be its own, the same beside each of two other clean
    neighbours, before or after it, through its batch's decoder or a kind of decoder, never a neighbour's pixels."""
    for seed in seeds[:2]:
        for batch, at in (([seed, data], 1), ([data, seed], 0)):
            tried = {}
            for name, decoder in decoders.items():
                other, decoded = decoder.decode_packed(batch)
                tried[name] = _difference(pixels, other[decoded.index(at)]) if at in decoded else "not decoded"
                if tried[name] == "max difference 0":
                    break
            else:  # no decoder decoded it there as its batch did: its pixels depend on its neighbours, or it is lost
                if all(seen == "not decoded" for seen in tried.values()):
                    continue  # left out beside this neighbour, for the CPU path: nothing of anyone else's embedded
                raise AssertionError(f"a damaged image ({len(bytes(data)):,} B) that no decoder decodes alone came out "
                                     f"otherwise beside another neighbour (at {at} of 2): {tried}")  # fmt: skip


def _difference(image: torch.Tensor, other: torch.Tensor | None) -> str:
    if other is None:
        return "not decoded"
    if other.shape != image.shape:
        return f"shape {tuple(other.shape)} against {tuple(image.shape)}"
    return f"max difference {(image.int() - other.int()).abs().max()}"


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data(), st.sampled_from([None, 400_000, 1 << 30]))
def test_hostile_jpegs_past_the_route_decode_alone_or_not_at_all(codec, jpegs, data, max_bytes):
    """Damaged JPEGs whose headers pass the route reach the library in a batch: each decodes to its header's size,
    within the batch's buffer, exactly as it decodes alone (a damaged neighbour never writes into its pixels), or is
    left out for the CPU path; never a crash."""
    _decode_alone_or_not_at_all(codec, data.draw(routed_batches(jpegs[:4])), max_bytes)


@pytest.mark.gpu
@settings(max_examples=100, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data(), st.sampled_from([None, 400_000]))
def test_hostile_jpegs_on_the_gpu_decode_alone_or_not_at_all(cuda_codec, cuda_kinds, jpegs, data, max_bytes):
    """The same through the GPU's decoders (the hardware JPEG engines where it has them): each image as the decoder
    of one kind decodes it alone, since a damaged neighbour may hand the whole batch to the CUDA decoder."""
    _decode_alone_or_not_at_all(cuda_codec, data.draw(routed_batches(jpegs[:4])), max_bytes, cuda_kinds,
                                seeds=tuple(jpegs[:4]))  # fmt: skip
    torch.cuda.synchronize()
