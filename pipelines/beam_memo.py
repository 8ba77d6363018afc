"""What Beam works out again and again as it builds, translates and runs a pipeline, worked out once: a fixed cost
of every run (BENCHMARKS.md, "Beam's look at each DoFn and its options' views, remembered").

- **Each DoFn's state and timers.** `apache_beam.transforms.userstate.get_dofn_specs` inspects the signature of every
  method of a DoFn (`dir(dofn)`: Beam's own few dozen and the DoFn's) each time it is asked, and Beam asks about eight
  times per ParDo: 258 times per embed run, ~0.12 s of a 200-image local run of ~0.55 s on this project's 2-core CPU.
  The answer depends only on the DoFn's methods, so `remember_dofn_specs` keeps it per DoFn instance: weakly, so a
  DoFn that goes is forgotten with its answer. A DoFn that cannot be a weak key is asked about each time, as before.
- **Each function's arguments.** `apache_beam.transforms.core.get_function_args_defaults` reads a function's
  signature (`inspect.signature`) each time it is asked: for every method of every DoFn the runner makes for its
  bundles, every `Map`'s and `FlatMap`'s function, as Beam builds and runs the graph, ~2,000 times per embed run,
  ~20 ms of a 200-image local run here. The answer depends only on the function (for a bound method, on its
  class's function: the instance is not among the arguments), so `remember_function_args` keeps it per function,
  weakly. A function that cannot be a weak key is read each time, as before.
- **The options' views.** `PipelineOptions.view_as(cls)` parses the run's flags again into a new view each time, and
  Beam asks for views ~230 times per embed run (twice per transform applied), ~0.05 s of such a run.
  `RememberedViews` makes each view once. Views share the options' values either way (a value set through one is
  seen through every other, Beam's design), so a view made earlier answers as a new one would.
"""

from __future__ import annotations

import threading
import types
import weakref
from collections.abc import Callable
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions

__all__ = ["RememberedViews", "remember_dofn_specs", "remember_function_args"]

_LOCK = threading.Lock()
_INSTALLED: dict[str, Callable] = {}  # "module.name" → Beam's own function, once ours is in its place


class _Remembered:
    """Answers kept per key, weakly: a key that goes takes its answer with it. A key that cannot be a weak key (not
    hashable, or no weak reference to it) is answered afresh each time, as without this."""

    def __init__(self) -> None:
        self._known: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, key, answer: Callable[[], Any]) -> Any:
        try:
            with _LOCK:
                found = self._known.get(key)
        except TypeError:
            found = None
        if found is None:
            found = answer()  # raises as Beam's own does
            try:
                with _LOCK:
                    self._known[key] = found
            except TypeError:
                pass
        return found


def _in_beams_place(module, name: str, remembering: Callable[[Callable], Callable]) -> None:
    """`remembering(beams)` in the place of Beam's `module.name`, for this process's life (once; later calls do
    nothing). Beam's callers look it up in its module as they run."""
    with _LOCK:
        if f"{module.__name__}.{name}" in _INSTALLED:
            return
        beams = getattr(module, name)
        ours = remembering(beams)
        ours.__wrapped__ = beams
        setattr(module, name, ours)
        _INSTALLED[f"{module.__name__}.{name}"] = beams


def remember_dofn_specs() -> None:
    """Put the remembering `get_dofn_specs` in Beam's place (`is_stateful_dofn`, `validate_stateful_dofn` ask it)."""
    from apache_beam.transforms import userstate

    def remembering(beams):
        known = _Remembered()

        def get_dofn_specs(dofn):
            state, timers = known.get(dofn, lambda: beams(dofn))
            return set(state), set(timers)  # the caller's own sets, as Beam's are

        return get_dofn_specs

    _in_beams_place(userstate, "get_dofn_specs", remembering)


def remember_function_args() -> None:
    """Put the remembering `get_function_args_defaults` in Beam's place (`get_function_arguments`, `Map`, `FlatMap`
    and `CallableWrapperDoFn` ask it)."""
    from apache_beam.transforms import core

    def remembering(beams):
        functions, methods = _Remembered(), _Remembered()  # a method's answer leaves out its instance

        def get_function_args_defaults(f):
            known, key = (methods, f.__func__) if isinstance(f, types.MethodType) else (functions, f)
            args, defaults = known.get(key, lambda: beams(f))
            return list(args), list(defaults)  # the caller's own lists, as Beam's are

        return get_function_args_defaults

    _in_beams_place(core, "get_function_args_defaults", remembering)


class RememberedViews(PipelineOptions):
    """Pipeline options whose views (`view_as`) are each made once."""

    def view_as(self, cls):
        views = self.__dict__.get("_views")
        if views is None:
            views = {}
            object.__setattr__(self, "_views", views)  # past `PipelineOptions.__setattr__`, which takes options only
        if cls not in views:
            views[cls] = super().view_as(cls)
        return views[cls]
