"""Page-locking host memory that other code allocated, so the GPU copies from it by DMA.

The GPU decoders copy each JPEG's bytes to the device themselves (nvImageCodec's hardware decoder, one
`cudaMemcpyAsync` per image). From pageable memory the driver first copies them into a staging buffer of its
own, on the CPU inside the decode call, and waits for room in it: run D's timeline (BENCHMARKS.md) put that
copy at 21 µs of nvImageCodec's ~65 µs of CUDA calls per image. The bytes already lie in one block of shared
memory, the file readers' ring (`pipelines.file_reader.ProcessReader`); page-locked once, each copy is queued
and done by the copy engines, beside the model.

This goes through the CUDA driver (`libcuda.so.1`, through ctypes), not torch's runtime binding: a runtime
call that fails leaves its error for the next kernel launch's check on the same thread, which would raise it
there. A copy from page-locked memory runs after the call that queued it returns, so memory handed to a GPU
decoder must stay unchanged until the GPU has read it (`encoder.gpu_stream` holds a batch's inputs until then).

Registering memory holds a lock in the driver that the process's other CUDA calls (the model's launches, the
decoders' copies) wait on, and a registration that finds its pages not yet in memory faults them in meanwhile:
for a fresh ring of 896 MiB, zeroing every page (0.4-3 GB/s on this project's 2-core VM). `page_lock` faults the
pages in first, outside the driver (`populate`), and the ring is locked a piece at a time
(`pipelines.file_reader.PAGE_LOCK_PIECE`), so no call holds that lock for long.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Sequence
from ctypes import POINTER, byref, c_char_p, c_int, c_size_t, c_uint, c_void_p

import numpy as np
import torch

__all__ = ["PageLockError", "host_copies", "page_lock", "page_locker", "populate"]

CU_MEMHOSTREGISTER_PORTABLE = 0x01  # page-locked for every CUDA context, not only the one current here
MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in, writable, leaving their contents as they are


class PageLockError(RuntimeError):
    """The memory could not be page-locked: no CUDA driver, or the driver refused."""


class _Driver:
    """The few CUDA driver calls this needs; each returns a CUresult (0: success)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        def bind(name: str, *args):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = list(args), c_int
            return fn

        self.init = bind("cuInit", c_uint)
        self.device_get = bind("cuDeviceGet", POINTER(c_int), c_int)
        self.primary_retain = bind("cuDevicePrimaryCtxRetain", POINTER(c_void_p), c_int)
        self.primary_release = bind("cuDevicePrimaryCtxRelease_v2", c_int)
        self.push = bind("cuCtxPushCurrent_v2", c_void_p)
        self.pop = bind("cuCtxPopCurrent_v2", POINTER(c_void_p))
        self.register = bind("cuMemHostRegister_v2", c_void_p, c_size_t, c_uint)
        self.unregister = bind("cuMemHostUnregister", c_void_p)
        self.error_name = bind("cuGetErrorName", c_int, POINTER(c_char_p))


_DRIVER: _Driver | None = None
_DRIVER_LOCK = threading.Lock()


def _driver() -> _Driver:
    global _DRIVER
    with _DRIVER_LOCK:
        if _DRIVER is None:
            try:
                _DRIVER = _Driver(ctypes.CDLL("libcuda.so.1"))
            except (OSError, AttributeError) as err:
                raise PageLockError(f"no CUDA driver here ({err})") from None
        return _DRIVER


_LIBC: ctypes.CDLL | None = None


def populate(address: int, size: int) -> bool:
    """Fault in `size` bytes at `address` (page-aligned) for writing, their contents as they are: memory that
    other processes write meanwhile (the file readers' ring) is safe. Through ctypes, so the interpreter lock is
    free while the kernel zeroes pages. False where the kernel cannot (before Linux 5.14, other systems, memory
    not mapped writable): the pages then fault where they are first used."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.madvise.argtypes, _LIBC.madvise.restype = [c_void_p, c_size_t, c_int], c_int
        return _LIBC.madvise(address, size, MADV_POPULATE_WRITE) == 0
    except (OSError, AttributeError):
        return False


def page_lock(address: int, size: int, device_index: int, driver: _Driver | None = None) -> Callable[[], None]:
    """Page-lock `size` bytes at `address` for the GPU `device_index` (as torch numbers them), in its primary
    context, the one torch uses; the pages are faulted in first, outside the driver (`populate`). Returns the
    call that unlocks them, which must come before the memory is unmapped (it ignores a driver that is already
    shut down).

    Raises:
        PageLockError: no CUDA driver, or the driver refused (its error's name in the message).
    """
    cuda = driver or _driver()
    populate(address, size)  # else the registration faults them in, holding the driver's lock meanwhile
    device, context = c_int(), c_void_p()
    _check(cuda, cuda.init(0), "cuInit")
    _check(cuda, cuda.device_get(byref(device), device_index), "cuDeviceGet")
    _check(cuda, cuda.primary_retain(byref(context), device), "cuDevicePrimaryCtxRetain")
    try:
        _in_context(cuda, context, lambda: cuda.register(address, size, CU_MEMHOSTREGISTER_PORTABLE),
                    "cuMemHostRegister")  # fmt: skip
    except PageLockError:
        cuda.primary_release(device)
        raise
    done = threading.Lock()

    def unlock() -> None:
        if not done.acquire(blocking=False):  # once only
            return
        try:
            _in_context(cuda, context, lambda: cuda.unregister(address), "cuMemHostUnregister")
        except PageLockError:
            pass  # the driver is shut down (interpreter exit) or the context is gone: nothing is locked any more
        finally:
            cuda.primary_release(device)

    return unlock


def page_locker(device: torch.device | None) -> Callable[[int, int], Callable[[], None]] | None:
    """`page_lock` for `device`, as `ProcessReader(page_lock=...)` takes it; None where `device` is not a GPU."""
    if device is None or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return lambda address, size: page_lock(address, size, index)


def host_copies(datas: Sequence[bytes | np.ndarray], page_locked: bool) -> list[np.ndarray]:
    """Each of `datas` copied into one buffer of host memory, as 1-D uint8 views of it: page-locked (from torch's cache
    of pinned memory) with `page_locked`, so a GPU decoder copies them by DMA. The buffer lives while a view does."""
    total = sum(len(data) for data in datas)
    buffer = (
        torch.empty(total, dtype=torch.uint8, pin_memory=True).numpy() if page_locked else np.empty(total, np.uint8)
    )
    views, offset = [], 0
    for data in datas:
        views.append(buffer[offset : offset + len(data)])
        views[-1][:] = np.frombuffer(data, dtype=np.uint8)
        offset += len(data)
    return views


def _in_context(cuda: _Driver, context: c_void_p, call: Callable[[], int], what: str) -> None:
    """`call` with `context` current on this thread, then the thread's own context back."""
    _check(cuda, cuda.push(context), "cuCtxPushCurrent")
    try:
        _check(cuda, call(), what)
    finally:
        cuda.pop(byref(c_void_p()))


def _check(cuda: _Driver, status: int, what: str) -> None:
    if status == 0:
        return
    name = c_char_p()
    known = cuda.error_name(status, byref(name)) == 0 and name.value
    raise PageLockError(f"{what} failed: {name.value.decode() if known else f'CUresult {status}'}")
