"""What is worked out from files once, remembered on disk for later processes on the machine, keyed by the files'
stamps: each one's size, modification and change times, and inode. A file rewritten in place changes its change
time, which no one can set, so what was worked out from it is worked out again. Files changed in the last
`settled_s` seconds are not remembered (a clock of coarse steps could give the next change the same times, as
git's racily clean files are). A record that is damaged, not what the caller expects, or cannot be written only
costs the work again; it never stands for a wrong value.

Used for a checkpoint's version (`encoder.model`: its weights hashed) and a snapshot's files checked against their
sha256 (`indexing.snapshot.verify_snapshot`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["Remembered", "file_stamps"]

log = logging.getLogger(__name__)


def file_stamps(files: Iterable[Path]) -> list[list]:
    """[name, size, modification time, change time, inode] of each file, in the order given."""
    stamps = []
    for path in files:
        st = path.stat()
        stamps.append([path.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return stamps


class Remembered:
    """A value remembered under `folder` for `key` (a JSON text that holds the files' stamps, and whatever else the
    value depends on), in a file named by the hash of `name` (default: the key; a name that stays when the stamps
    move keeps one file per name, each new value replacing the last)."""

    def __init__(self, folder: str | Path, key: str, name: str | None = None) -> None:
        self.key = key
        self.file = Path(folder) / f"{hashlib.sha256((key if name is None else name).encode()).hexdigest()[:32]}.json"

    def get(self, valid: Callable[[object], bool]):
        """The value remembered for the key, if `valid` takes it; else None."""
        try:
            stored = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return None
        value = stored.get("value") if isinstance(stored, dict) and stored.get("key") == self.key else None
        return value if value is not None and valid(value) else None

    def put(self, value, stamps: list[list], settled_s: float) -> None:
        """Remember `value`, unless a file in `stamps` changed in the last `settled_s` seconds. Written whole (a
        temporary file renamed into place), or left: a record that cannot be written costs a later process the work."""
        if any(time.time_ns() - stamp[3] <= settled_s * 1e9 for stamp in stamps):
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.file.with_name(f".{self.file.name}.{os.getpid()}.{threading.get_ident()}")
            temporary.write_text(json.dumps({"key": self.key, "value": value}))
            os.replace(temporary, self.file)
        except OSError as err:
            log.debug("not remembered in %s: %s", self.file, err)
