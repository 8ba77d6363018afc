"""One job at a time per output root: a lock object taken with compare-and-swap (local or gs://).

`OUT/runs/LOCK` holds who took it and until when. A second job finds it held and stops
with a clear message; a lock whose holder died is taken over once it expires, or at once
when its holder was on this machine and its process is gone. A live holder moves its
expiry on every quarter of the time to live, so a job longer than `lock_ttl_h` (a
backfill of a large catalog) keeps its lock, and the time to live bounds only how long a
dead job's lock outlives it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from encoder import storage

__all__ = ["LockHeld", "run_lock"]

log = logging.getLogger(__name__)


class LockHeld(RuntimeError):
    """Another job holds the output root; the message says which and until when."""


def _holder_is_dead(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError):
        return False
    return False


@contextlib.contextmanager
def run_lock(out: str, run_id: str, ttl_h: float, *, name: str = "runs/LOCK") -> Iterator[None]:
    """Hold `OUT/<name>` for the duration of the block (the nightly's `runs/LOCK`; a training run's `LOCK`).

    Raises:
        LockHeld: a live job holds it.
    """
    uri = storage.join(out, *name.split("/"))
    now = datetime.now(UTC)
    mine = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "acquired_at": now.isoformat(),
            "expires_at": (now + timedelta(hours=ttl_h)).isoformat()}  # fmt: skip
    with _guard(uri):
        data, version = storage.read_versioned(uri)
        if data is not None:
            holder = json.loads(data)
            expired = datetime.fromisoformat(holder["expires_at"]) < now
            if not (expired or _holder_is_dead(holder)):
                raise LockHeld(
                    f"{out} is locked by run {holder['run_id']} ({holder['host']} pid {holder['pid']}, since "
                    f"{holder['acquired_at']}, until {holder['expires_at']}); wait for it, or delete {uri} "
                    "if that job is gone"
                )
            log.warning("taking over the lock of run %s (%s)", holder["run_id"], "expired" if expired else "dead")
        try:
            storage.write_if_version(uri, json.dumps(mine).encode(), version)
        except storage.ConcurrentUpdate as err:
            raise LockHeld(f"{out}: another job took the lock at the same moment; try again") from err
    stop = threading.Event()
    renewal = threading.Thread(target=_renew, args=(uri, mine, ttl_h, stop), name="lock-renewal", daemon=True)
    renewal.start()
    try:
        yield
    finally:
        stop.set()
        renewal.join()
        with contextlib.suppress(Exception):  # a failed release leaves a lock that expires; never mask the error
            data, _ = storage.read_versioned(uri)
            held = json.loads(data) if data else {}
            if _is_mine(held, mine):
                storage.delete(uri)


def _guard(uri: str):
    """Locally, compare-and-swap on mtimes needs the read-modify-write serialised; gs:// generations need nothing."""
    return contextlib.nullcontext() if storage.is_gcs(uri) else storage.local_lock(uri + ".guard")


def _is_mine(holder: dict, mine: dict) -> bool:
    return all(holder.get(k) == mine[k] for k in ("run_id", "host", "pid"))


def _renew(uri: str, mine: dict, ttl_h: float, stop: threading.Event) -> None:
    """Every quarter of the time to live, move the lock's expiry to a whole time to live from now, while it is ours.
    A failed write is tried again at the next turn (three more before the lock could expire); a lock taken over
    (this process stalled past its expiry) is reported, and left to its new holder."""
    while not stop.wait(ttl_h * 3600 / 4):
        try:
            with _guard(uri):
                data, version = storage.read_versioned(uri)
                holder = json.loads(data) if data else {}
                if not _is_mine(holder, mine):
                    log.error("run %s lost its lock on %s to run %s: another job may run beside it", mine["run_id"],
                              uri, holder.get("run_id"))  # fmt: skip
                    return
                expires = (datetime.now(UTC) + timedelta(hours=ttl_h)).isoformat()
                storage.write_if_version(uri, json.dumps({**holder, "expires_at": expires}).encode(), version)
        except Exception as err:  # noqa: BLE001 - storage hiccups: the next turn tries again
            log.warning("run %s could not renew its lock on %s (%s); trying again", mine["run_id"], uri, err)
