"""How an index build shares out `--memory-budget`: the process's anonymous memory.

The budget covers the whole build process (interpreter and libraries included), not
only the vectors, because that is what an orchestrator's memory limit kills on.
What the process already holds when the build starts, plus a fixed working allowance
(reading Parquet in small batches, ground truth), comes off the top; the rest is shared:

    training sample   ≤ 1/2   (k-means / PCA learn from it, with as much again for their
                               work; freed before any vector is added)
    one on-disk part  ≤ 1/2   (faiss inverted lists grow by doubling: rows × 2 × row bytes)

File-backed pages (memory-mapped parts, `index.ivfdata`, the page cache behind
`vectors.npy`) are not counted: the kernel can drop them under pressure.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import re
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["WORKING_ALLOWANCE", "BuildMemory", "arrow_system_pool", "release_freed_memory", "rss_anon_bytes"]

# What a build needs beyond what it holds at start, whatever the budget: streaming Parquet batches
# (Arrow peaks at ~30 MiB per 4 MiB batch), ground-truth score blocks, the merged index's quantizer
# and allocator slack. Measured on 1M × 256 (BENCHMARKS.md): peaks stay ~170 MiB over the start
# when the shares below are small.
WORKING_ALLOWANCE = 176 << 20
_MIN_PART_ROWS = 1_000


def rss_anon_bytes() -> int | None:
    """This process's resident anonymous memory (Linux), or None where /proc does not say."""
    try:
        with open("/proc/self/status") as status:
            match = re.search(r"^RssAnon:\s+(\d+) kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def release_freed_memory() -> None:
    """Hand memory freed by big arrays back to the OS (Arrow's pool and glibc's arenas keep it otherwise)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim
        pass


@contextlib.contextmanager
def arrow_system_pool() -> Iterator[None]:
    """Arrow allocates through malloc meanwhile: its default mimalloc pool keeps freed pages
    resident (measured: 301 vs 256 MiB peak for the same budgeted 1M × 256 build)."""
    import pyarrow as pa

    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


@dataclass(frozen=True)
class BuildMemory:
    """Rows for the training sample and for each on-disk part, from the budget."""

    budget: int
    held: int  # anonymous memory the process held when the build started
    row_bytes: int  # one vector as float32 plus its int64 id in an inverted list

    @classmethod
    def plan(cls, budget: int, dim: int, held: int | None = None) -> BuildMemory:
        held = rss_anon_bytes() if held is None else held
        return cls(budget, held if held is not None else 256 << 20, dim * 4 + 8)

    @property
    def spare(self) -> int:
        return self.budget - self.held - WORKING_ALLOWANCE

    def train_rows(self, wanted: int) -> int:
        return max(1, min(wanted, self.spare // 2 // self.row_bytes))

    @property
    def part_rows(self) -> int:
        return self.spare // 2 // (2 * self.row_bytes)

    def check(self) -> None:
        """Raises ValueError when the budget cannot hold a useful part."""
        if self.part_rows < _MIN_PART_ROWS:
            need = self.held + WORKING_ALLOWANCE + 2 * 2 * _MIN_PART_ROWS * self.row_bytes
            raise ValueError(
                f"--memory-budget {self.budget >> 20} MiB is too small: this process already holds "
                f"{self.held >> 20} MiB and a build works in {WORKING_ALLOWANCE >> 20} MiB more; give at least "
                f"{-(-need // (1 << 20))} MiB"
            )

    def describe(self) -> dict:
        return {"budget": self.budget, "held_at_start": self.held, "working_allowance": WORKING_ALLOWANCE,
                "part_rows": self.part_rows}  # fmt: skip
