"""Which images a GPU worker had on its GPU decoder when it died, so that a rerun decodes them on the CPU.

A native decoder can crash the process on one image (segfaults in nvJPEG on single photos that other decoders read
have been reported against GPU image pipelines), or leave the device unusable (`encoder.failures.device_failed`).
No try/except isolates either, and a rerun meets the same image at the same point. So a GPU worker keeps a journal of
the image digests in flight, from their batch's GPU decode until its vectors are taken: a file of its own on local
disk, rewritten as batches start and end, locked (`flock`) for as long as the process holds it. The operating system
drops the lock however the process ends, so a journal whose lock can be taken belongs to a process that is gone, and
what it still lists went down with it. The next journal opened in the same directory (the same output root) adds
those digests to the directory's suspects, which `embed_stream` sends to the CPU decoder, where an image that cannot
be decoded is a dead letter. A few batches of innocent images go to the CPU with the culprit, once; they are decoded
there as any other image. Ending on an ordinary error forgets what was in flight (`DecodeJournal.forget`).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

__all__ = ["JOURNALS_ENV", "SUSPECT", "DecodeJournal", "journal_dir"]

log = logging.getLogger(__name__)

SUSPECT = "in flight on the GPU decoder when a worker stopped: decoded on the CPU"
_SUSPECTS = "suspects.txt"


JOURNALS_ENV = "LOOKALIKE_GPU_JOURNALS"


def journal_dir(out_root: str) -> Path:
    """The journals' directory for runs into `out_root`: on local disk whatever the root (it may be `gs://`), under
    `$LOOKALIKE_GPU_JOURNALS`, by default a directory of the user's in the temp directory."""
    digest = hashlib.sha256(out_root.rstrip("/").encode()).hexdigest()[:16]
    root = os.environ.get(JOURNALS_ENV) or Path(tempfile.gettempdir()) / f"lookalike-gpu-journal-{os.getuid()}"
    return Path(root) / digest


class DecodeJournal:
    """This process's journal in `directory`; `digest_of(key)`: the image digest of a batch key, for `embed_stream`.

    `suspects`: the digests that earlier processes' journals left behind, gathered when this one opens."""

    def __init__(self, directory: str | Path, digest_of: Callable[[Hashable], str]) -> None:
        self.directory, self.digest_of = Path(directory), digest_of
        self.directory.mkdir(parents=True, exist_ok=True)
        self._path = self.directory / f"journal-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # held until close, or until the process ends however it ends
        self._in_flight: dict[Hashable, bytes] = {}  # batch → its digests, a line each
        self._lock = threading.Lock()
        self.suspects = self._gather()

    def _gather(self) -> frozenset[str]:
        found: list[str] = []
        for path in sorted(self.directory.glob("journal-*")):
            if path == self._path:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:  # gathered by another process meanwhile
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # its process is alive
                    continue
                digests = os.read(fd, os.fstat(fd).st_size).decode(errors="replace").split()
                if digests:
                    with open(self.directory / _SUSPECTS, "a") as suspects:
                        suspects.write("".join(f"{d}\n" for d in digests))
                found += digests
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)
        if found:
            log.warning("%d images were on the GPU decoder when a worker stopped (a crash, or a failed GPU); "
                        "they are decoded on the CPU from now on (%s)", len(set(found)),
                        self.directory / _SUSPECTS)  # fmt: skip
        try:
            return frozenset((self.directory / _SUSPECTS).read_text().split())
        except FileNotFoundError:
            return frozenset()

    def reasons(self, digests: Sequence[str], reasons: Sequence[str | None]) -> list[str | None] | None:
        """`reasons` with `SUSPECT` for the suspects among `digests`; None where there are none (the common case)."""
        if not self.suspects:
            return None
        suspected = [digest in self.suspects for digest in digests]
        if not any(suspected):
            return None
        return [SUSPECT if suspect else reason for suspect, reason in zip(suspected, reasons, strict=True)]

    def begin(self, batch: Hashable, digests: Sequence[str]) -> None:
        """The batch's images (their digests) go to the GPU decoder now."""
        lines = "".join([f"{digest}\n" for digest in digests]).encode()
        with self._lock:
            self._in_flight[batch] = lines
            self._write()

    def end(self, batch: Hashable) -> None:
        """The batch's vectors are taken: nothing of it is on the GPU any more."""
        with self._lock:
            if self._in_flight.pop(batch, None) is not None:
                self._write()

    def forget(self, batches: Sequence[Hashable]) -> None:
        """End `batches` at once: a stream that stopped on an ordinary error, which no image caused on the GPU."""
        with self._lock:
            ended = [self._in_flight.pop(batch, None) for batch in batches]
            if any(digests is not None for digests in ended):
                self._write()

    def _write(self) -> None:
        # Rewritten whole (a few batches of 65 bytes per image): no fsync, as the page cache outlives a crashed process.
        data = b"".join(self._in_flight.values())
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))

    def close(self) -> None:
        """Release the journal: removed if nothing is in flight, else left for the next process to gather."""
        if self._fd < 0:
            return
        with self._lock:
            if not self._in_flight:
                self._path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = -1
