"""Page-locking the file readers' ring for the GPU: the driver calls, run on the CPU against a stand-in driver,
and on a GPU for real (`gpu`)."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import pytest
import torch

import encoder.page_lock as page_lock_module
from encoder.page_lock import CU_MEMHOSTREGISTER_PORTABLE, PageLockError, page_lock, page_locker

CONTEXT = 0xC0
INVALID_VALUE = 1


class FakeDriver:
    """The driver calls `page_lock` makes, logged; `register` answers `registered` (0: success)."""

    def __init__(self, registered: int = 0) -> None:
        self.log: list[tuple] = []
        self.current: list[int] = []  # the calling thread's context stack
        self.registered = registered

    def init(self, flags):
        return 0

    def device_get(self, device, ordinal):
        device._obj.value = ordinal
        return 0

    def primary_retain(self, context, device):
        self.log.append(("retain", device.value))
        context._obj.value = CONTEXT
        return 0

    def primary_release(self, device):
        self.log.append(("release", device.value))
        return 0

    def push(self, context):
        self.current.append(context.value)
        return 0

    def pop(self, context):
        self.current.pop()
        return 0

    def register(self, address, size, flags):
        self.log.append(("register", address, size, flags, self.current[-1]))
        return self.registered

    def unregister(self, address):
        self.log.append(("unregister", address, self.current[-1]))
        return 0

    def error_name(self, status, name):
        if status != INVALID_VALUE:
            return INVALID_VALUE
        name._obj.value = b"CUDA_ERROR_INVALID_VALUE"
        return 0


def test_memory_is_locked_in_the_devices_primary_context_for_every_context_and_unlocked_once():
    driver = FakeDriver()
    unlock = page_lock(0x1000, 640 << 20, 1, driver)
    assert driver.log == [("retain", 1), ("register", 0x1000, 640 << 20, CU_MEMHOSTREGISTER_PORTABLE, CONTEXT)]
    assert driver.current == []  # the thread's own context is back
    unlock()
    unlock()
    assert driver.log[2:] == [("unregister", 0x1000, CONTEXT), ("release", 1)]
    assert driver.current == []


def test_the_pages_are_faulted_in_before_the_driver_is_called(monkeypatch):
    """Else the registration faults them in itself, holding the driver's lock that other CUDA calls wait on."""
    driver = FakeDriver()
    monkeypatch.setattr(
        page_lock_module, "populate", lambda address, size: driver.log.append(("populate", address, size))
    )
    page_lock(0x1000, 64 << 20, 0, driver)
    assert [entry[:3] for entry in driver.log] == [
        ("populate", 0x1000, 64 << 20),
        ("retain", 0),
        ("register", 0x1000, 64 << 20),
    ]


def _resident_pages(address: int, size: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec)


def test_populate_faults_shared_pages_in_and_leaves_their_contents():
    """The readers' ring, as it is made (a memfd mapped shared): populated pages are resident and what a reader wrote
    before stays. Kernels before 5.14 cannot, and say so."""
    import os

    size = 4 << 20
    fd = os.memfd_create("populate-test", 0)
    try:
        os.ftruncate(fd, size)
        ring = mmap.mmap(fd, size)
        ring[5 : 5 + 4] = b"jpeg"
        ring[size - 3 :] = b"end"
        anchor = ctypes.c_char.from_buffer(ring)
        address = ctypes.addressof(anchor)
        del anchor
        before = _resident_pages(address, size)
        kernel = tuple(int(part) for part in os.uname().release.split(".")[:2])
        assert page_lock_module.populate(address, size) is (kernel >= (5, 14))
        if kernel >= (5, 14):
            assert before < size // mmap.PAGESIZE == _resident_pages(address, size)
        assert ring[5:9] == b"jpeg" and ring[size - 3 :] == b"end" and ring[4096:4100] == bytes(4)
        ring.close()
    finally:
        os.close(fd)


def test_populate_of_memory_not_mapped_is_false_not_an_error():
    assert page_lock_module.populate(0x1000, 4096) is False  # the first pages of the address space are never mapped


def test_a_refusal_names_the_drivers_error_and_leaves_nothing_behind():
    driver = FakeDriver(registered=INVALID_VALUE)
    with pytest.raises(PageLockError, match="cuMemHostRegister failed: CUDA_ERROR_INVALID_VALUE"):
        page_lock(0x1000, 4096, 0, driver)
    assert driver.log[-1] == ("release", 0) and driver.current == []
    driver.registered = 999  # a status the driver has no name for
    with pytest.raises(PageLockError, match="cuMemHostRegister failed: CUresult 999"):
        page_lock(0x1000, 4096, 0, driver)


def test_without_a_cuda_driver_it_is_a_clear_error(monkeypatch):
    def missing(name, *args, **kwargs):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(page_lock_module, "_DRIVER", None)
    monkeypatch.setattr(ctypes, "CDLL", missing)
    with pytest.raises(PageLockError, match=r"no CUDA driver here \(libcuda.so.1: cannot open"):
        page_lock(0x1000, 4096, 0)


def test_a_locker_is_only_for_a_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(page_lock_module, "page_lock", lambda *args: calls.append(args) or (lambda: None))
    assert page_locker(torch.device("cpu")) is None and page_locker(None) is None
    page_locker(torch.device("cuda", 1))(0x2000, 8192)
    assert calls == [(0x2000, 8192, 1)]


def test_host_copies_are_views_of_one_buffer_of_their_own():
    ring = np.arange(30, dtype=np.uint8)
    datas = [ring[0:10], b"bytes", ring[20:30]]
    copies = page_lock_module.host_copies(datas, page_locked=False)
    assert [bytes(c) for c in copies] == [bytes(d) for d in datas]
    assert copies[0].base is copies[1].base is copies[2].base
    assert not any(np.shares_memory(c, ring) for c in copies)


@pytest.mark.gpu
def test_on_a_gpu_host_copies_are_page_locked():
    copies = page_lock_module.host_copies([b"abc", b"defg"], page_locked=True)
    assert all(torch.from_numpy(c).is_pinned() for c in copies) and bytes(copies[1]) == b"defg"


@pytest.mark.gpu
def test_on_a_gpu_locked_memory_is_pinned_for_torch_and_copies_as_it_is():
    import mmap

    ring = mmap.mmap(-1, 8 << 20)
    data = torch.frombuffer(ring, dtype=torch.uint8)
    assert not data.is_pinned()
    anchor = ctypes.c_char.from_buffer(ring)
    unlock = page_locker(torch.device("cuda", torch.cuda.current_device()))(ctypes.addressof(anchor), len(ring))
    del anchor
    try:
        assert data.is_pinned()
        data[:] = torch.arange(len(ring), dtype=torch.int64).to(torch.uint8)
        assert torch.equal(data.to("cuda", non_blocking=True).cpu(), data)
    finally:
        unlock()
    assert not data.is_pinned()
