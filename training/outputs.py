"""Where a training run's outputs go: a local folder, or gs:// through a local copy sent as its parts complete.

Training writes with local file operations: safetensors and `torch.save` files, and a rename that makes a checkpoint
whole at once. With `--out gs://...` it writes them under a staging folder of this machine
(`$LOOKALIKE_CACHE/train/<hash of OUT>`), and rank 0 copies that folder to OUT at every checkpoint, in a thread while
the next steps train, and at the end:

- new and changed files are uploaded, each folder's marks of completeness after its other files (a model folder's
  `config.json`, then a checkpoint's `trainer.json`, the encoder's `lookalike_encoder.json`), so that a copy cut
  short is never taken for a whole one;
- then what the folder no longer holds of what the run itself sent or brought (checkpoints past
  `--keep-checkpoints`) is deleted from OUT, marks first, with the files of a checkpoint whose copy was cut short.
  Nothing else under OUT is deleted: not another's `model/` in a shared prefix.

A copy that fails is retried by the next one, which sends what it missed; only the last one's failure stops the run.
`--resume` on a machine whose staging folder lacks them first downloads OUT's complete checkpoints, with the pairs and
the metrics, so a run stopped on one machine (a preempted VM) goes on from another.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from encoder import storage
from training.checkpoint import CHECKPOINT_PREFIX, ResumeError, latest_checkpoint
from training.export import ENCODER_INFO

__all__ = ["Outputs", "OutputsError"]

log = logging.getLogger(__name__)

# Sent after the other files of a copy, in this order: a model folder is taken for whole where its `config.json` is
# (`embed --model gs://.../encoder` a moment too early finds no model there, not one missing its weights or
# preprocessing), a checkpoint where its `trainer.json` is.
_MARKS = ("config.json", "trainer.json", ENCODER_INFO, "report.json")
_PULLED = ("pairs.parquet", "metrics.jsonl")  # what a resume needs besides the checkpoints
_READ_AHEAD = 1 << 20  # files up to this size are read when a copy starts: the loop goes on appending to metrics.jsonl
_CHECKPOINTS = "checkpoints"
SLOW_COPY_S = 10.0  # a checkpoint's wait for the copy before it past this is said (the copies fall behind)


class OutputsError(RuntimeError):
    """The run's outputs could not be copied to OUT; the message says where they are whole."""


class Outputs:
    """A run's output folder: `local` is where the loop writes; `uri_of` names where a file of it is kept."""

    def __init__(self, out: str) -> None:
        self.remote = storage.is_gcs(out)  # another scheme: refused by TrainConfig
        self.uri = out.rstrip("/") if self.remote else out
        if self.remote:
            storage.split_gcs_uri(self.uri)  # names a bucket
            key = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
            self.local = Path(storage.cache_dir("train")) / key
        else:
            self.local = Path(out)
        self._sent: dict[str, tuple[int, int]] = {}  # relative path → (size, mtime_ns) as OUT holds it
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="train-copy") if self.remote else None
        self._pending: Future | None = None

    def uri_of(self, path: str | Path) -> str:
        """The local folder's `path` as OUT keeps it (itself for a local OUT)."""
        if not self.remote:
            return str(path)
        relative = Path(path).relative_to(self.local).as_posix()
        return self.uri if relative == "." else storage.join(self.uri, relative)

    # -- before the run -------------------------------------------------------------------------

    def prepare(self, resume: bool | None, main: bool) -> bool:
        """Every rank, before the local folder is read; returns whether the run resumes (`resume` None: whether OUT
        holds a complete checkpoint). For a gs:// OUT: an OUT holding checkpoints is refused without --resume (and
        rank 0 clears what an earlier attempt left in the staging folder); with it, rank 0 brings the complete
        checkpoints this machine lacks, and the pairs and metrics that go with them."""
        if not self.remote:
            return resume if resume is not None else latest_checkpoint(self.local) is not None
        remote = self._remote_files()
        complete = sorted({r.split("/")[1] for r in remote if _is_checkpoint_mark(r)})
        if resume is None:
            resume = bool(complete)
        if not resume and complete:
            raise ResumeError(f"{self.uri} already holds checkpoints (latest: {complete[-1]}); pass --resume to "
                              "continue that run, or choose an empty --out")  # fmt: skip
        if not main:
            return resume
        if not resume:
            shutil.rmtree(self.local, ignore_errors=True)
        here = self.local / _CHECKPOINTS
        have = (
            {p.name for p in here.glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer.json").is_file()}
            if here.is_dir()
            else set()
        )
        fetched = [name for name in complete if name not in have]
        for name in fetched:
            self._fetch_checkpoint(name)
        newer = bool(fetched) and fetched[-1] > max(have, default="")
        for name in _PULLED:
            if name in remote and (newer or not (self.local / name).is_file()):
                self._fetch(name)
        self.local.mkdir(parents=True, exist_ok=True)
        for relative, path in self._local_files().items():  # this machine's copies OUT holds already: not sent again
            if relative not in self._sent and relative in remote and _same(path, *remote[relative]):
                self._mark_sent(relative)
        return resume

    def _fetch_checkpoint(self, name: str) -> None:
        final = self.local / _CHECKPOINTS / name
        shutil.rmtree(final, ignore_errors=True)  # an incomplete one of this machine's
        storage.download_tree(storage.join(self.uri, _CHECKPOINTS, name), final)
        for path in final.rglob("*"):
            if path.is_file():
                self._mark_sent(path.relative_to(self.local).as_posix())
        log.info("brought checkpoint %s from %s", name, self.uri)

    def _fetch(self, relative: str) -> None:
        storage.download_file(storage.join(self.uri, relative), self.local / relative)
        self._mark_sent(relative)

    def _mark_sent(self, relative: str) -> None:
        stat = (self.local / relative).stat()
        self._sent[relative] = (stat.st_size, stat.st_mtime_ns)

    # -- during and after it --------------------------------------------------------------------

    def sync(self) -> None:
        """Rank 0, at a checkpoint: start copying the local folder to a gs:// OUT, after the copy before it."""
        if not self.remote:
            return
        self.wait()
        files = self._local_files()
        changed = []
        for relative, path in files.items():
            stat = path.stat()
            stamp = (stat.st_size, stat.st_mtime_ns)
            if self._sent.get(relative) != stamp:
                data = path.read_bytes() if stat.st_size <= _READ_AHEAD else None
                changed.append((relative, path, stamp, data))
        changed.sort(key=lambda c: _mark_order(c[0]))
        self._pending = self._pool.submit(self._copy, changed, set(files))
        sending = sum(stamp[0] for _, _, stamp, _ in changed)
        log.info("copying %d file(s), %.1f MB, to %s", len(changed), sending / 1e6, self.uri)

    def finish(self) -> None:
        """Rank 0, at the end: the last copy, waited for; its failure raises `OutputsError`."""
        if self.remote:
            self.sync()
            started = time.monotonic()
            self.wait(final=True)
            log.info("outputs copied to %s (the last copy waited for %.1f s)", self.uri, time.monotonic() - started)

    def wait(self, *, final: bool = False) -> None:
        """Until the copy under way is done. Its failure is logged (the next copy sends what it missed) unless
        `final`."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        started = time.monotonic()
        try:
            pending.result()
        except Exception as err:  # noqa: BLE001 - storage.with_retries has retried what is worth retrying
            if final:
                raise OutputsError(f"could not copy the run's outputs to {self.uri} "
                                   f"({storage.describe_error(err)}); they are whole in {self.local}") from err  # fmt: skip
            log.warning("copying to %s failed (%s); the next checkpoint's copy sends what this one missed",
                        self.uri, storage.describe_error(err))  # fmt: skip
        waited = time.monotonic() - started
        if not final and waited > SLOW_COPY_S:  # training stood still for it
            log.warning("training waited %.0f s for the last checkpoint's copy to %s: copies take longer than "
                        "--checkpoint-every's steps; checkpoint less often", waited, self.uri)  # fmt: skip

    def close(self) -> None:
        """Whatever happened: the copy under way finished (a run stopped by an error leaves OUT as whole as its last
        copy), the thread ended."""
        if self._pool is not None:
            self.wait()
            self._pool.shutdown()

    def _copy(self, changed: list[tuple[str, Path, tuple[int, int], bytes | None]], kept: set[str]) -> None:
        for relative, path, stamp, data in changed:
            uri = storage.join(self.uri, relative)
            if data is None:
                storage.upload_file(path, uri)
            else:
                storage.write_bytes(uri, data)
            self._sent[relative] = stamp
        remote = self._remote_files()
        whole = {r.split("/")[1] for r in remote if _is_checkpoint_mark(r)}
        gone = [r for r in remote if r not in kept and (r in self._sent or _cut_short(r, whole))]
        for relative in sorted(gone, key=_mark_order, reverse=True):  # marks first: never a whole-looking part
            storage.delete(storage.join(self.uri, relative))
            self._sent.pop(relative, None)

    def _local_files(self) -> dict[str, Path]:
        """The folder's files, without those being written (a `.partial` folder, a temporary file)."""
        files = {}
        for path in sorted(self.local.rglob("*")):
            relative = path.relative_to(self.local).as_posix()
            if path.is_file() and ".partial" not in relative and ".tmp-" not in path.name:
                files[relative] = path
        return files

    def _remote_files(self) -> dict[str, tuple[int, str | None]]:
        """OUT's files: relative path → (size, base64 MD5 where the store keeps one)."""
        prefix, blobs = storage.objects_under(self.uri)
        return {b.name[len(prefix) :]: (b.size, b.md5_hash) for b in blobs}


def _mark_order(relative: str) -> int:
    name = Path(relative).name
    return _MARKS.index(name) + 1 if name in _MARKS else 0


def _same(path: Path, size: int, md5: str | None) -> bool:
    if md5 is None or path.stat().st_size != size:
        return False
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode() == md5


def _cut_short(relative: str, whole: set[str]) -> bool:
    """A file of a checkpoint whose copy was cut short (no `trainer.json`): never resumed from, so deleted."""
    parts = relative.split("/")
    return (
        len(parts) > 2 and parts[0] == _CHECKPOINTS and parts[1].startswith(CHECKPOINT_PREFIX) and parts[1] not in whole
    )


def _is_checkpoint_mark(relative: str) -> bool:
    """`checkpoints/step-00000300/trainer.json`: the file a whole checkpoint's copy ends with."""
    return re.fullmatch(rf"{_CHECKPOINTS}/{re.escape(CHECKPOINT_PREFIX)}\d+/trainer\.json", relative) is not None
