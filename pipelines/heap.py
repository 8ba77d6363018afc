"""Keep the cyclic garbage collector's full passes short while a run moves images.

A full collection walks every object the interpreter tracks and holds the interpreter lock
while it does: with torch, transformers and Beam imported that is ~0.5 M objects and a
0.25-0.4 s stall of every thread (the GPU's feeders included), more once torch.compile has
built its graphs. Objects alive when a run starts (modules, the model, the pipeline) live
as long as it does, so `frozen_heap` moves them out of the collector's reach for the run
(`gc.freeze`) and back at the end (`gc.unfreeze`), where a later full pass finds whatever
of them has become garbage meanwhile. Reference counting frees everything else as before.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["frozen_heap"]

_lock = threading.Lock()
_depth = 0  # runs inside frozen_heap now; the heap is thawed when the last one ends
_froze = False  # whether the first of them froze it (not with the collector disabled)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Objects alive on entry are left out of collections until exit (or until the last of several runs
    that overlap exits). A caller that froze objects of its own beforehand finds them thawed afterwards;
    `gc.get_freeze_count` would tell, but it counts the whole frozen list (27 ms for 0.5 M objects)."""
    global _depth, _froze
    with _lock:
        if _depth == 0:
            _froze = gc.isenabled()
            if _froze:
                gc.freeze()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _froze:
                gc.unfreeze()
