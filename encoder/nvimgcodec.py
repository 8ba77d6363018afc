"""nvImageCodec's C library through ctypes: a batch of JPEGs decoded with one release of the interpreter lock.

The package's own Python binding (`nvidia.nvimgcodec.Decoder.decode`) releases and retakes
the interpreter lock once per image of a batch, to read that image's header, and allocates
each output while holding it; wrapping each output as a tensor costs more interpreter time.
In the GPU worker other threads (resize, model, writer, file readers' consumer) hold the lock
in between, so every retake can wait: measured on an H200, its decode thread was 98% busy at
3.6k images/s end to end while the decoder alone ran at 14k/s (BENCHMARKS.md).

Here the per-image work — parse the header, describe the output — is a few short C calls
made holding the lock (`ctypes.PyDLL`), the outputs are views into one buffer allocated per
batch, and the lock is released once, for the decode itself (`ctypes.CDLL`). Handles for
code streams and images are created once and reused batch after batch.

The structures below mirror `nvimgcodec.h` of the pinned release (0.9); a library of another
minor version is refused. `tests/encoder/test_nvimgcodec.py` compiles a C program against the
shipped header and checks every size, offset and constant used here. On a machine without a
GPU the same code decodes into host memory (`device="cpu"`), which is how it is tested.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from ctypes import POINTER, byref, c_char, c_char_p, c_float, c_int, c_size_t, c_uint8, c_uint32, c_void_p
from pathlib import Path

import numpy as np
import torch

from encoder.jpeg import decoded_within
from encoder.resize import PackedImages

__all__ = [
    "ALL_EXTENSIONS",
    "BACKENDS",
    "GPU_EXTENSIONS",
    "NvImageCodec",
    "NvImageCodecError",
    "default_extensions",
    "library_dir",
    "library_problem",
]

SUPPORTED_VERSION = (0, 9)  # major, minor of the header these structures mirror

# Constants of nvimgcodec.h (checked against the header by the tests).
MAX_CODEC_NAME_SIZE = 256
MAX_NUM_PLANES = 32
DEVICE_CPU_ONLY = -99999
STRUCT_PROPERTIES = 1
STRUCT_INSTANCE_CREATE_INFO = 2
STRUCT_DECODE_PARAMS = 5
STRUCT_ORIENTATION = 7
STRUCT_IMAGE_INFO = 11
STRUCT_IMAGE_PLANE_INFO = 12
STRUCT_BACKEND = 17
STRUCT_BACKEND_PARAMS = 29
STRUCT_EXECUTION_PARAMS = 30
COLORSPEC_SRGB = 1
SAMPLING_NONE = 0
SAMPLEFORMAT_I_RGB = 8
SAMPLE_DATA_TYPE_UINT8 = 0x0802
BUFFER_KIND_STRIDED_DEVICE = 1
BUFFER_KIND_STRIDED_HOST = 2
PROCESSING_STATUS_SUCCESS = 1
STATUS_ARCH_MISMATCH = 7  # DecoderCreate: no decoder of the allowed backends runs on this device
LOAD_HINT_POLICY_FIXED = 2
# The decoders an instance may use, by the kind of backend they declare (nvimgcodecBackendKind_t). Of nvJPEG's:
# "hardware" is the GPU's JPEG engines (A100, H100), which decode a batch in one call and fail it whole when one
# image fails; "hybrid" is its CUDA decoder (Huffman on the library's CPU threads or, for larger images, on the GPU,
# the rest in CUDA kernels, image by image) and its lossless one; "gpu" decoders that run all on the GPU; "cpu"
# libjpeg-turbo. All of them (None) by default: the framework hands what one decoder fails to the next.
BACKENDS = {"cpu": 1, "gpu": 2, "hybrid": 3, "hardware": 4}
DEFAULT_OPTIONS = ":fancy_upsampling=0"  # the decoder's options unless given: its package's default
CPU_EXTENSIONS = ("libjpeg_turbo_ext",)  # what a CPU-only instance loads (JPEG)
# What a GPU instance loads: nvJPEG's decoders (the hardware engines, CUDA, hybrid). Not the other formats' (the route
# sends only JPEGs here), nor libjpeg-turbo's: a JPEG nvJPEG cannot decode goes to the product's CPU threads, each
# image within its time limit and beside the batch, instead of being decoded on the CPU inside the batch's call.
GPU_EXTENSIONS = ("libnvjpeg_ext",)
ALL_EXTENSIONS = "all"  # every extension the library ships (as before: `benchmarks/gpu_embed.py` compares)


class Properties(ctypes.Structure):
    _fields_ = [("struct_type", c_int), ("struct_size", c_size_t), ("struct_next", c_void_p),
                ("version", c_uint32), ("cudart_version", c_uint32)]  # fmt: skip


class Orientation(ctypes.Structure):
    _fields_ = [("struct_type", c_int), ("struct_size", c_size_t), ("struct_next", c_void_p),
                ("rotated", c_int), ("flip_x", c_int), ("flip_y", c_int)]  # fmt: skip


class ImagePlaneInfo(ctypes.Structure):
    _fields_ = [("struct_type", c_int), ("struct_size", c_size_t), ("struct_next", c_void_p),
                ("width", c_uint32), ("height", c_uint32), ("row_stride", c_size_t), ("num_channels", c_uint32),
                ("sample_type", c_int), ("precision", c_uint8)]  # fmt: skip


class ImageInfo(ctypes.Structure):
    _fields_ = [("struct_type", c_int), ("struct_size", c_size_t), ("struct_next", c_void_p),
                ("codec_name", c_char * MAX_CODEC_NAME_SIZE), ("color_spec", c_int), ("chroma_subsampling", c_int),
                ("sample_format", c_int), ("orientation", Orientation), ("num_planes", c_uint32),
                ("plane_info", ImagePlaneInfo * MAX_NUM_PLANES), ("buffer", c_void_p), ("buffer_kind", c_int),
                ("cuda_stream", c_void_p)]  # fmt: skip


class ExecutionParams(ctypes.Structure):
    _fields_ = [("struct_type", c_int), ("struct_size", c_size_t), ("struct_next", c_void_p),
                ("device_allocator", c_void_p), ("pinned_allocator", c_void_p), ("max_num_cpu_threads", c_int),
                ("executor", c_void_p), ("device_id", c_int), ("pre_init", c_int), ("skip_pre_sync", c_int),
                ("num_backends", c_int), ("backends", c_void_p)]  # fmt: skip


class BackendParams(ctypes.Structure):
    _fields_ = [("struct_type", c_int), ("struct_size", c_size_t), ("struct_next", c_void_p),
                ("load_hint", c_float), ("load_hint_policy", c_int)]  # fmt: skip


class Backend(ctypes.Structure):
    _fields_ = [("struct_type", c_int), ("struct_size", c_size_t), ("struct_next", c_void_p),
                ("kind", c_int), ("params", BackendParams)]  # fmt: skip


class DecodeParams(ctypes.Structure):
    _fields_ = [("struct_type", c_int), ("struct_size", c_size_t), ("struct_next", c_void_p),
                ("apply_exif_orientation", c_int)]  # fmt: skip


class InstanceCreateInfo(ctypes.Structure):
    _fields_ = [("struct_type", c_int), ("struct_size", c_size_t), ("struct_next", c_void_p),
                ("load_builtin_modules", c_int), ("load_extension_modules", c_int),
                ("extension_modules_path", c_char_p), ("create_debug_messenger", c_int),
                ("debug_messenger_desc", c_void_p), ("message_severity", c_uint32),
                ("message_category", c_uint32)]  # fmt: skip


_HANDLE = ctypes.sizeof(c_void_p)


def _header(struct: type[ctypes.Structure], struct_type: int) -> ctypes.Structure:
    return struct(struct_type=struct_type, struct_size=ctypes.sizeof(struct))


class NvImageCodecError(RuntimeError):
    """The library is missing, of another version, or failed a call that is not about one image."""


def library_dir() -> Path:
    """Where the `nvidia-nvimgcodec-cu13` wheel put `libnvimgcodec.so.0` and its extensions (its Python
    binding is not imported)."""
    spec = importlib.util.find_spec("nvidia.nvimgcodec")
    if spec is None or not spec.submodule_search_locations:
        raise NvImageCodecError("nvImageCodec is not installed (pip install 'lookalike[gpu]')")
    return Path(next(iter(spec.submodule_search_locations)))


def library_problem() -> str | None:
    """Why `NvImageCodec` cannot be used here (not installed, another minor version), or None; loads the library
    without creating an instance, for a worker's checks before any work."""
    try:
        _load(library_dir())
    except NvImageCodecError as err:
        return str(err)
    return None


def _load(where: Path) -> tuple[_Library, tuple[int, int, int]]:
    """The library in `where` and its version; raises `NvImageCodecError` for one of another minor version."""
    lib = _Library(where / "libnvimgcodec.so.0")
    props = _header(Properties, STRUCT_PROPERTIES)
    _check(lib.get_properties(byref(props)), "GetProperties")
    version = (props.version // 1000, props.version % 1000 // 100, props.version % 100)
    if version[:2] != SUPPORTED_VERSION:
        raise NvImageCodecError(f"nvImageCodec {'.'.join(map(str, version))} is installed; this binding "
                                f"mirrors {'.'.join(map(str, SUPPORTED_VERSION))}.x (pip install 'lookalike[gpu]')")  # fmt: skip
    return lib, version


class _Library:
    """The C functions, bound twice: those that do the decoding release the interpreter lock (`CDLL`), the
    short per-image ones keep it (`PyDLL`), so one batch takes and gives the lock back once."""

    def __init__(self, path: Path) -> None:
        held, released = ctypes.PyDLL(str(path)), ctypes.CDLL(str(path))
        status, handle = c_int, c_void_p

        def bind(lib, name: str, *args):
            fn = getattr(lib, "nvimgcodec" + name)
            fn.argtypes, fn.restype = list(args), status
            return fn

        self.get_properties = bind(held, "GetProperties", POINTER(Properties))
        self.instance_create = bind(released, "InstanceCreate", POINTER(handle), POINTER(InstanceCreateInfo))
        self.instance_destroy = bind(released, "InstanceDestroy", handle)
        self.decoder_create = bind(released, "DecoderCreate", handle, POINTER(handle), POINTER(ExecutionParams),
                                   c_char_p)  # fmt: skip
        self.decoder_destroy = bind(released, "DecoderDestroy", handle)
        self.code_stream_from_host_mem = bind(held, "CodeStreamCreateFromHostMem", handle, c_void_p, c_void_p,
                                              c_size_t, c_void_p)  # fmt: skip
        self.code_stream_destroy = bind(held, "CodeStreamDestroy", handle)
        self.code_stream_image_info = bind(held, "CodeStreamGetImageInfo", handle, POINTER(ImageInfo))
        self.image_create = bind(held, "ImageCreate", handle, c_void_p, POINTER(ImageInfo))
        self.image_destroy = bind(held, "ImageDestroy", handle)
        self.decode = bind(released, "DecoderDecode", handle, POINTER(handle), POINTER(handle), c_int,
                           POINTER(DecodeParams), POINTER(handle))  # fmt: skip
        self.wait = bind(released, "FutureWaitForAll", handle)
        self.statuses = bind(held, "FutureGetProcessingStatus", handle, POINTER(c_uint32), POINTER(c_size_t))
        self.future_destroy = bind(held, "FutureDestroy", handle)


def _check(status: int, what: str) -> None:
    if status != 0:
        raise NvImageCodecError(f"nvImageCodec {what} failed (status {status})")


class NvImageCodec:
    """Decode batches of encoded images to (3, h, w) uint8 RGB on `device` (a CUDA device, or "cpu" for the
    library's CPU decoders). Calls from several threads take turns.

    `extensions`: names of the extension modules to load, or `ALL_EXTENSIONS`; None loads the JPEG decoders only:
    nvJPEG's on a GPU (`GPU_EXTENSIONS`), libjpeg-turbo's on the CPU (without CUDA libraries the others print errors
    as they load).
    `cpu_threads`: the library's own threads (0: one per core). `options`: the decoder's, as nvImageCodec
    spells them; None is `DEFAULT_OPTIONS`, its package's default (chroma replicated, not interpolated:
    ":fancy_upsampling=1" decodes as libjpeg and Pillow do, bit for bit on the CPU backend).
    `backends`: names from `BACKENDS`, the only kinds of decoder it may use (None: every one loaded), e.g.
    ("hardware",) for the JPEG engines alone, an image they fail left undecoded instead of handed to the next.
    """

    def __init__(self, device: torch.device | str = "cuda", extensions: Sequence[str] | str | None = None,
                 cpu_threads: int = 0, options: str | None = None,
                 backends: Sequence[str] | None = None) -> None:  # fmt: skip
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        where = library_dir()
        lib, self.version = _load(where)
        self._lib, self._lock = lib, threading.Lock()
        self._instance, self._decoder = c_void_p(), c_void_p()
        self._streams, self._images = (c_void_p * 0)(), (c_void_p * 0)()
        # Checked before any handle is made: nothing to free if they are wrong.
        allowed = None if backends is None else _backends(backends)
        info = _header(InstanceCreateInfo, STRUCT_INSTANCE_CREATE_INFO)
        info.load_builtin_modules, info.load_extension_modules = 1, 1
        chosen = default_extensions(self.device, extensions)
        with _extension_dir(where / "extensions", chosen) as modules:  # read once, by InstanceCreate
            info.extension_modules_path = str(modules).encode()
            _check(lib.instance_create(byref(self._instance), byref(info)), "InstanceCreate")
        params = _header(ExecutionParams, STRUCT_EXECUTION_PARAMS)
        params.device_id = DEVICE_CPU_ONLY if self.device.type == "cpu" else self.device.index
        params.max_num_cpu_threads = cpu_threads
        if allowed is not None:
            params.num_backends, params.backends = len(allowed), ctypes.addressof(allowed)
        self._execution = (params, allowed)  # kept alive with the instance: the library may hold on to them
        options = DEFAULT_OPTIONS if options is None else options
        status = lib.decoder_create(self._instance, byref(self._decoder), byref(params), options.encode())
        if status != 0:
            self.close()
            if status == STATUS_ARCH_MISMATCH and allowed is not None:
                raise NvImageCodecError(f"nvImageCodec has no decoder of the backends {list(backends)} on "
                                        f"{self.device} (status {status})")  # fmt: skip
            _check(status, "DecoderCreate")
        self._params = _header(DecodeParams, STRUCT_DECODE_PARAMS)  # apply_exif_orientation = 0, as PIL decodes
        self._probe = _header(ImageInfo, STRUCT_IMAGE_INFO)
        self._out = _output_info(BUFFER_KIND_STRIDED_HOST if self.device.type == "cpu" else BUFFER_KIND_STRIDED_DEVICE)
        self._plane = self._out.plane_info[0]  # a view into `_out`: setting its fields sets `_out`'s

    def decode(self, datas: Sequence[bytes | np.ndarray]) -> list[torch.Tensor | None]:
        """Each input (bytes, or a 1-D uint8 array) decoded to a (3, h, w) uint8 RGB tensor, in order; None for
        one the library cannot parse or decode. On CUDA the work is ordered on the current stream."""
        packed, positions = self.decode_packed(datas)
        images: list[torch.Tensor | None] = [None] * len(datas)
        for k, i in enumerate(positions):
            images[i] = packed[k]
        return images

    def decode_packed(self, datas: Sequence[bytes | np.ndarray],
                      max_bytes: int | None = None) -> tuple[PackedImages, list[int]]:  # fmt: skip
        """The images decoded, side by side in one buffer (`PackedImages`, in input order), and the input
        positions they came from; the others the library could not parse or decode, or that did not fit in
        `max_bytes` of decoded pixels (`encoder.jpeg.decoded_within`). No tensor op per image."""
        with self._lock:
            return self._decode(datas, max_bytes)

    def _decode(self, datas: Sequence[bytes | np.ndarray], max_bytes: int | None) -> tuple[PackedImages, list[int]]:
        lib, n = self._lib, len(datas)
        self._reserve(n)
        streams, images, probe = self._streams, self._images, self._probe
        stream_slots, image_slots = ctypes.addressof(streams), ctypes.addressof(images)  # where handle i goes
        # Slot i of `streams` and `images` serves input i in every batch: the library re-initialises a handle
        # it is given instead of creating one.
        shapes: list[tuple[int, int] | None] = []
        codecs: list[bytes] = []
        for i, data in enumerate(datas):  # parse each header, holding the lock
            address = data if isinstance(data, bytes) else data.__array_interface__["data"][0]
            shape = None
            if lib.code_stream_from_host_mem(self._instance, stream_slots + i * _HANDLE, address, len(data),
                                             None) == 0:  # fmt: skip
                probe.struct_type, probe.struct_size, probe.struct_next = STRUCT_IMAGE_INFO, ctypes.sizeof(probe), None
                if lib.code_stream_image_info(streams[i], byref(probe)) == 0 and probe.num_planes <= MAX_NUM_PLANES:
                    plane = probe.plane_info[0]
                    shape = (plane.height, plane.width) if plane.height and plane.width else None
            shapes.append(shape)
            codecs.append(probe.codec_name if shape else b"")
        sizes = [0 if s is None else s[0] * s[1] * 3 for s in shapes]
        for i, fits in enumerate(decoded_within(sizes, max_bytes)):
            if not fits:  # left out, as one it could not read
                shapes[i], sizes[i] = None, 0
        widest = max((s[1] for s in shapes if s is not None), default=0)
        # Room for a row of the widest image after the last: `PackedImages`' contract, for the resize's gather.
        buffer = torch.empty(sum(sizes) + 3 * widest, dtype=torch.uint8, device=self.device)
        out, plane, base = self._out, self._plane, buffer.data_ptr()
        out.cuda_stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else None
        wanted, offsets, offset = [], [], 0
        for i, (shape, size) in enumerate(zip(shapes, sizes, strict=True)):
            offsets.append(offset)
            if shape is None:
                continue
            plane.height, plane.width, plane.row_stride = shape[0], shape[1], shape[1] * 3
            if out.codec_name != codecs[i]:  # as the package's binding does: the stream's description, re-laid out
                out.codec_name = codecs[i]
            out.buffer = base + offset
            if lib.image_create(self._instance, image_slots + i * _HANDLE, byref(out)) == 0:
                wanted.append(i)
            offset += size
        statuses = self._run([streams[i] for i in wanted], [images[i] for i in wanted])
        done = [i for i, ok in zip(wanted, statuses, strict=True) if ok]
        return PackedImages(buffer, tuple(offsets[i] for i in done), tuple(shapes[i] for i in done)), done

    def _run(self, streams: list[int], images: list[int]) -> list[bool]:
        """Decode `streams` into `images` (handles) in one call, releasing the interpreter lock; each one's success."""
        count = len(streams)
        if count == 0:
            return []
        lib, future = self._lib, c_void_p()
        _check(lib.decode(self._decoder, (c_void_p * count)(*streams), (c_void_p * count)(*images), count,
                          byref(self._params), byref(future)), "DecoderDecode")  # fmt: skip
        try:
            _check(lib.wait(future), "FutureWaitForAll")
            got, size = (c_uint32 * count)(), c_size_t(count)
            _check(lib.statuses(future, got, byref(size)), "FutureGetProcessingStatus")
        finally:
            lib.future_destroy(future)
        return [status == PROCESSING_STATUS_SUCCESS for status in got[: size.value]] + [False] * (count - size.value)

    def _reserve(self, n: int) -> None:
        """Handle arrays for `n` images: new entries are NULL (the library creates them), old ones are reused."""
        if len(self._streams) >= n:
            return
        streams, images = (c_void_p * n)(), (c_void_p * n)()
        streams[: len(self._streams)] = self._streams[:]
        images[: len(self._images)] = self._images[:]
        self._streams, self._images = streams, images

    def close(self) -> None:
        """Free the library's handles; the instance cannot decode after this."""
        lib = self._lib
        with self._lock:
            for handle in self._images:
                if handle:
                    lib.image_destroy(handle)
            for handle in self._streams:
                if handle:
                    lib.code_stream_destroy(handle)
            self._streams, self._images = (c_void_p * 0)(), (c_void_p * 0)()
            if self._decoder:
                lib.decoder_destroy(self._decoder)
                self._decoder = c_void_p()
            if self._instance:
                lib.instance_destroy(self._instance)
                self._instance = c_void_p()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: the library may be gone already
            pass


def _output_info(buffer_kind: int) -> ImageInfo:
    """The description every decoded image shares (interleaved 8-bit sRGB), less its size and address."""
    info = _header(ImageInfo, STRUCT_IMAGE_INFO)
    info.color_spec, info.chroma_subsampling, info.sample_format = COLORSPEC_SRGB, SAMPLING_NONE, SAMPLEFORMAT_I_RGB
    info.orientation = _header(Orientation, STRUCT_ORIENTATION)
    info.num_planes = 1
    plane = info.plane_info[0]
    plane.struct_type, plane.struct_size = STRUCT_IMAGE_PLANE_INFO, ctypes.sizeof(ImagePlaneInfo)
    plane.num_channels, plane.sample_type, plane.precision = 3, SAMPLE_DATA_TYPE_UINT8, 0
    info.buffer_kind = buffer_kind
    return info


def _backends(names: Sequence[str]) -> ctypes.Array:
    """The library's array of allowed backends for `names`, each taking a whole batch (load hint 1, as its
    package's default)."""
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown or not names:
        raise NvImageCodecError(f"nvImageCodec backends {list(names)}: name one or more of {sorted(BACKENDS)}")
    array = (Backend * len(names))()
    for backend, name in zip(array, names, strict=True):
        backend.struct_type, backend.struct_size, backend.kind = STRUCT_BACKEND, ctypes.sizeof(Backend), BACKENDS[name]
        backend.params = BackendParams(struct_type=STRUCT_BACKEND_PARAMS, struct_size=ctypes.sizeof(BackendParams),
                                       load_hint=1.0, load_hint_policy=LOAD_HINT_POLICY_FIXED)  # fmt: skip
    return array


def default_extensions(device: torch.device, extensions: Sequence[str] | str | None) -> Sequence[str] | None:
    """The extension modules an instance on `device` loads (None: every one shipped)."""
    if extensions == ALL_EXTENSIONS:
        return None
    if extensions is None:
        return CPU_EXTENSIONS if device.type == "cpu" else GPU_EXTENSIONS
    return extensions


@contextlib.contextmanager
def _extension_dir(shipped: Path, names: Sequence[str] | None) -> Iterator[Path]:
    """The directory to load extension modules from: the shipped one, or a temporary one linking only `names`
    (without the CUDA libraries the GPU extensions print errors as they load)."""
    if names is None:
        yield shipped
        return
    with tempfile.TemporaryDirectory(prefix="nvimgcodec-ext-") as chosen:
        for name in names:
            found = sorted(shipped.glob(f"{name}.so*"))
            if not found:
                raise NvImageCodecError(f"nvImageCodec extension {name} not found in {shipped}")
            os.symlink(found[0], Path(chosen) / found[0].name)
        yield Path(chosen)
