"""Beam's look at a DoFn for user state and timers, remembered per DoFn.

`apache_beam.transforms.userstate.get_dofn_specs` inspects the signature of every method of a DoFn (`dir(dofn)`: Beam's
own few dozen and the DoFn's) each time it is asked, and Beam asks about eight times per ParDo as it builds, translates
and runs a pipeline: an embed run asks 258 times, 0.135 s of a 200-image local run of ~0.55 s on this project's 2-core
CPU (BENCHMARKS.md, "Beam's look at each DoFn, remembered"), a fixed cost of every run. The answer depends only on
the DoFn's methods, which do not change, so it is kept per DoFn instance: weakly, so a DoFn that goes is forgotten
with its answer. A DoFn that cannot be a weak key is asked about each time, as before.
"""

from __future__ import annotations

import threading
import weakref

__all__ = ["remember_dofn_specs"]

_LOCK = threading.Lock()
_INSTALLED: list = []  # Beam's own `get_dofn_specs`, once ours is in its place


def remember_dofn_specs() -> None:
    """Put the remembering `get_dofn_specs` in Beam's place, for this process's life (once; later calls do nothing).
    Beam's functions that ask (`is_stateful_dofn`, `validate_stateful_dofn`) look it up in their module as they run."""
    from apache_beam.transforms import userstate

    with _LOCK:
        if _INSTALLED:
            return
        beams = userstate.get_dofn_specs
        known: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

        def get_dofn_specs(dofn):
            try:
                with _LOCK:
                    specs = known.get(dofn)
            except TypeError:  # not hashable: asked each time
                specs = None
            if specs is None:
                specs = beams(dofn)  # raises as Beam's does for a DoFn with a parameter twice
                try:
                    with _LOCK:
                        known[dofn] = specs
                except TypeError:  # no weak reference to it: asked each time
                    pass
            state, timers = specs
            return set(state), set(timers)  # the caller's own sets, as Beam's are

        get_dofn_specs.__wrapped__ = beams
        userstate.get_dofn_specs = get_dofn_specs
        _INSTALLED.append(beams)
