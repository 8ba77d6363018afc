"""Object storage through Beam's FileSystems: local paths, gs:// and any scheme Beam knows.

Reads retry transient errors (throttling, 5xx, dropped connections) with
exponential backoff and jitter inside a bounded time; permanent ones (not
found, forbidden) raise at once.
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from apache_beam.io.filesystems import FileSystems

__all__ = [
    "NotFound",
    "configure_storage",
    "exists",
    "is_transient",
    "join",
    "match",
    "read_bytes",
    "with_retries",
    "write_bytes_atomic",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


class NotFound(FileNotFoundError):
    """The object or file does not exist (a permanent error)."""


def configure_storage(pipeline_options=None) -> None:
    """Point FileSystems at the pipeline's options; anonymous access against a GCS emulator.

    With `STORAGE_EMULATOR_HOST` set, Beam would otherwise spend ~28 s retrying a
    search for Google credentials the emulator does not need.
    """
    if pipeline_options is not None:
        FileSystems.set_options(pipeline_options)
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from apache_beam.internal.gcp import auth

        with auth._Credentials._credentials_lock:
            auth._Credentials._credentials_init = True
            auth._Credentials._credentials = None


def is_transient(err: BaseException) -> bool:
    """Whether retrying `err` may succeed: throttling, server errors, dropped connections."""
    try:
        from google.api_core import exceptions as gexc

        if isinstance(err, (gexc.TooManyRequests, gexc.InternalServerError, gexc.BadGateway,
                            gexc.ServiceUnavailable, gexc.GatewayTimeout)):  # fmt: skip
            return True
        if isinstance(err, gexc.GoogleAPICallError):
            return False
    except ImportError:  # pragma: no cover - the gcp extra is part of the install
        pass
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    import requests

    return isinstance(err, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout))


def with_retries(call: Callable[[], T], what: str, *, attempts: int = 5, base_delay_s: float = 0.2,
                 max_total_s: float = 60.0) -> T:  # fmt: skip
    """Run `call`, retrying transient errors with exponential backoff and full jitter."""
    start = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as err:
            elapsed = time.monotonic() - start
            if not is_transient(err) or attempt == attempts or elapsed >= max_total_s:
                raise
            delay = min(random.uniform(0, base_delay_s * 2**attempt), max(0.0, max_total_s - elapsed))
            log.warning("%s: %s (attempt %d/%d), retrying in %.2fs", what, err, attempt, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _is_not_found(err: BaseException) -> bool:
    if isinstance(err, FileNotFoundError):
        return True
    try:
        from google.api_core.exceptions import NotFound as GcsNotFound
    except ImportError:  # pragma: no cover
        return False
    return isinstance(err, GcsNotFound)


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The whole object, retrying transient errors.

    Raises:
        NotFound: no such object.
        ValueError: larger than `max_bytes`.
    """

    def read() -> bytes:
        with FileSystems.open(uri, compression_type="uncompressed") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise ValueError(f"object is larger than max_bytes={max_bytes}")
        return data

    try:
        return with_retries(read, f"read {uri}")
    except Exception as err:
        if _is_not_found(err):
            raise NotFound(f"no such object: {uri}") from err
        raise


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write a whole object so that readers see all of it or nothing.

    Local: a temp file in the same directory, then rename. Object stores: a single
    upload, which becomes visible only when complete.
    """
    if "://" not in uri:
        os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
        tmp = f"{uri}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, uri)
        return

    def write() -> None:
        with FileSystems.create(uri) as f:
            f.write(data)

    with_retries(write, f"write {uri}")


def exists(uri: str) -> bool:
    return with_retries(lambda: FileSystems.exists(uri), f"stat {uri}")


def match(pattern: str) -> list[str]:
    """Paths matching a glob, sorted; empty when nothing matches."""
    results = with_retries(lambda: FileSystems.match([pattern]), f"list {pattern}")
    return sorted(m.path for m in results[0].metadata_list)


def join(base: str, *parts: str) -> str:
    return FileSystems.join(base, *parts)
