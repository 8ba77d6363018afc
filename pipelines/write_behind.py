"""Writes that run behind the thread that feeds the GPU: in order, on a thread of their own, a few at most waiting.

Parquet encoding of a batch of vectors costs ~6-12 µs per row of 768 floats (most of it the list's levels, not
compression) and pyarrow releases the interpreter lock while it encodes. A loop or a Beam runner thread that
wrote its shards itself stopped feeding reads and batches to the GPU for 100-200 ms per 16,384 rows; handed to
a `WriteBehind`, the write overlaps the next batches instead.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class WriteBehind:
    """Calls run in the order given, on one thread of their own; at most `pending` are queued or running, so
    `submit` blocks when the writes fall behind (what waits holds memory: a table each). An error is raised by
    the next `submit`, `drain` or `close`, and later calls are not run: the writes after a failed one would
    leave a shard with a gap.
    """

    def __init__(self, pending: int = 4, name: str = "write") -> None:
        if pending < 1:
            raise ValueError(f"pending must be at least 1, got {pending}")
        self._max_pending = pending
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=name)  # one thread: the calls stay in order
        self._pending: collections.deque[Future] = collections.deque()
        self._failed: BaseException | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._raise_failure()
        self._pending.append(self._thread.submit(self._guarded, fn, *args))
        while len(self._pending) > self._max_pending:
            self._wait(self._pending.popleft())

    def drain(self) -> None:
        """Wait for every call submitted; raise the first error."""
        while self._pending:
            self._wait(self._pending.popleft())
        self._raise_failure()

    def close(self, then: Callable[[], Any] | None = None) -> None:
        """`drain`, then run `then` on the thread (closing what the calls wrote to) even if a call failed, and stop
        the thread. The calls' error, if any, is raised; `then`'s only where they had none."""
        try:
            self.drain()
        except BaseException:
            self._finish(then, quiet=True)
            raise
        self._finish(then)

    def _finish(self, then: Callable[[], Any] | None, quiet: bool = False) -> None:
        try:
            if then is not None:
                error = self._thread.submit(then).exception()
                if error is not None and not quiet:
                    raise error
        finally:
            self._thread.shutdown()

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._failed is None:  # after a failure the rest are skipped, not run out of order
            try:
                fn(*args)
            except BaseException as err:
                self._failed = err
                raise

    @staticmethod
    def _wait(future: Future) -> None:
        future.exception()  # its error, if any, is in `_failed`, which `_raise_failure` raises

    def _raise_failure(self) -> None:
        if self._failed is not None:
            raise self._failed
