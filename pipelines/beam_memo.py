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

from apache_beam.options.pipeline_options import PipelineOptions

__all__ = ["RememberedViews", "remember_dofn_specs", "remember_function_args"]

_LOCK = threading.Lock()
_INSTALLED: list = []  # Beam's own `get_dofn_specs`, once ours is in its place
_ARGS_INSTALLED: list = []  # Beam's own `get_function_args_defaults`, once ours is in its place


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


def remember_function_args() -> None:
    """Put the remembering `get_function_args_defaults` in Beam's place, for this process's life (once; later calls do
    nothing). Beam's callers (`get_function_arguments`, `Map`, `FlatMap`, `CallableWrapperDoFn`) look it up in its
    module as they run."""
    from apache_beam.transforms import core

    with _LOCK:
        if _ARGS_INSTALLED:
            return
        beams = core.get_function_args_defaults
        functions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a function → its arguments
        methods: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a method's function → bound, without self

        def get_function_args_defaults(f):
            known, key = (methods, f.__func__) if isinstance(f, types.MethodType) else (functions, f)
            try:
                with _LOCK:
                    found = known.get(key)
            except TypeError:  # not hashable: read each time
                found = None
            if found is None:
                found = beams(f)
                try:
                    with _LOCK:
                        known[key] = found
                except TypeError:  # no weak reference to it: read each time
                    pass
            args, defaults = found
            return list(args), list(defaults)  # the caller's own lists, as Beam's are

        get_function_args_defaults.__wrapped__ = beams
        core.get_function_args_defaults = get_function_args_defaults
        _ARGS_INSTALLED.append(beams)


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
