"""Which GPU a process embeds on, when a machine has several and several processes embed.

Each worker process that asks for "cuda" claims one GPU for its life: the least-held one on
this machine, found by taking an exclusive lock on a file per GPU and holding-slot
(`<lock dir>/<gpu id>.<slot>.lock`), trying slot 0 of every GPU before slot 1 of any. So N
processes on k GPUs hold ⌈N/k⌉ or ⌊N/k⌋ models per GPU, exactly one each when N ≤ k, whatever
starts them (Beam's local runner with `--workers`, several runs at once). The operating system
drops a lock when its process ends, however it ends, so a crashed worker's GPU is free for the
next one and no lock file needs cleaning up. GPUs are named by their UUID, so processes that
see the GPUs in different orders (`CUDA_VISIBLE_DEVICES`) still agree on which is which.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["GpuClaim", "claim_gpu", "gpu_for_process", "lock_dir", "spread_note"]

log = logging.getLogger(__name__)

LOCK_DIR_ENV = "LOOKALIKE_GPU_LOCKS"


@dataclass
class GpuClaim:
    """One process's hold on a GPU: `index` among the GPUs it sees, `slot` how many processes held it before."""

    index: int
    slot: int
    path: Path
    _fd: int | None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the lock
            self._fd = None


def lock_dir() -> Path:
    """Where the claims live: `$LOOKALIKE_GPU_LOCKS`, else a directory of this user's in the temp directory."""
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / f"lookalike-gpus-{os.getuid()}")


def claim_gpu(ids: Sequence[str], where: Path | None = None) -> GpuClaim:
    """Hold the least-held of the GPUs named `ids` (in the order this process sees them) until `release` or exit.

    Raises:
        OSError: the lock directory cannot be made or written.
    """
    if not ids:
        raise ValueError("no GPUs to claim")
    where = where or lock_dir()
    where.mkdir(parents=True, exist_ok=True)
    for slot in itertools.count():
        for index, gpu in enumerate(ids):
            path = where / f"{_safe(gpu)}.{slot}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person looking
            return GpuClaim(index, slot, path, fd)
    raise AssertionError("unreachable")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


_CLAIM: GpuClaim | None = None
_CLAIM_LOCK = threading.Lock()


def gpu_for_process() -> torch.device:
    """This process's GPU: the only one, or the one it claimed (`claim_gpu`) the first time it asked, made the
    current device so that what follows without an index lands there too. Never fails a run over the claim: a lock
    directory it cannot use leaves the process on the current device, with a warning."""
    import torch  # here, not at the top: a claim itself needs no torch

    global _CLAIM
    count = torch.cuda.device_count()
    if count <= 1:
        return torch.device("cuda", torch.cuda.current_device())
    with _CLAIM_LOCK:
        if _CLAIM is None:
            try:
                _CLAIM = claim_gpu(_gpu_ids(count))
            except OSError as err:
                log.warning("could not claim a GPU in %s (%s); using cuda:%d, which other processes may share",
                            lock_dir(), err, torch.cuda.current_device())  # fmt: skip
                return torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(_CLAIM.index)
            if _CLAIM.slot:
                log.warning("process %d shares cuda:%d with %d other process(es) on this machine, each with its own "
                            "model copy: more worker processes than GPUs", os.getpid(), _CLAIM.index, _CLAIM.slot)  # fmt: skip
            else:
                log.info("process %d embeds on cuda:%d of %d", os.getpid(), _CLAIM.index, count)
        return torch.device("cuda", _CLAIM.index)


def _gpu_ids(count: int) -> list[str]:
    """Each visible GPU's UUID; its index where the driver gives none."""
    import torch

    ids = []
    for index in range(count):
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        ids.append(f"gpu-{uuid}" if uuid else f"cuda{index}")
    return ids


def spread_note(gpus: int, processes: int) -> str | None:
    """What to tell a person whose run on this machine puts `processes` models on `gpus` GPUs; None when one each."""
    if processes == gpus or gpus < 1:
        return None
    if processes < gpus:
        return (f"this machine has {gpus} GPUs and the run starts {processes} worker process(es), one GPU each: "
                f"{gpus - processes} stay idle (--workers {gpus} uses them all)")  # fmt: skip
    most = -(-processes // gpus)
    return (f"{processes} worker processes on {gpus} GPU{'s' if gpus > 1 else ''}: up to {most} model copies per "
            f"GPU (--workers {gpus} keeps one each)")  # fmt: skip
