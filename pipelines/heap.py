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
import logging
from collections.abc import Iterator

__all__ = ["frozen_heap"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Objects alive on entry are left out of collections until exit; nested or beside a caller's own
    `gc.freeze`, it leaves things as they are (unfreezing would release the caller's objects too)."""
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    gc.freeze()
    log.debug("froze %d objects for the run", gc.get_freeze_count())
    try:
        yield
    finally:
        gc.unfreeze()
