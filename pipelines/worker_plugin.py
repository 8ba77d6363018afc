"""What lookalike's Beam worker processes set up as they start, and the same for a run whose workers are the launching
process.

Beam's SDK worker imports the job's plugins as it starts, before its first bundle: the Dataflow runner lists every
`BeamPlugin` subclass imported where the job is launched, and every job names this one in `--beam_plugins`
(`embed._pipeline_options`); so does the local runner's for its worker processes (`--workers 2`, one per GPU on a
host of several). Imported in a worker (its runner's control endpoint is in its environment), this module caps Beam's
state sampling there for the process's life, and puts in place what the launcher remembers of Beam's repeated work
(`pipelines.beam_memo`: each DoFn's state and timers, each function's arguments), which Beam works out again for
every DoFn a worker makes for its bundles. A local run whose workers are the launching process caps the sampling while
it runs (`brief_state_sampling`), and its launcher remembers for it.

Beam's state sampler: each bundle's sampler thread sleeps between samples, from 2 ms growing ×1.2 to 200 ms, and the
bundle's end waits for it to wake, up to 200 ms at the end of any bundle over a second, with the GPU's queue drained
(42–135 ms of a 5,000-image local run of 1.35 s with the GPU stood in, measured; BENCHMARKS.md). Beam has no option
for it. Waking every 20 ms costs nothing that shows: the sampler runs without the interpreter lock.
"""

from __future__ import annotations

import contextlib
import os
import threading

from apache_beam.utils.plugin import BeamPlugin

from pipelines.beam_memo import remember_dofn_specs, remember_function_args

__all__ = ["STATE_SAMPLING_MS", "WorkerPlugin", "brief_state_sampling", "in_sdk_worker", "start_worker"]

STATE_SAMPLING_MS = 20  # the longest wait of a bundle's end for Beam's state sampler (its own: 200 ms)
_BRIEF = {"runs": 0, "beams": None}  # who asked for brief sampling and has not let go, and Beam's own sampler
_BRIEF_LOCK = threading.Lock()


class WorkerPlugin(BeamPlugin):
    """Beam's handle on this module: its import path is what a worker imports as it starts."""


def in_sdk_worker() -> bool:
    """Whether this process is a Beam SDK worker (its runner's control endpoint is in its environment)."""
    return "CONTROL_API_SERVICE_DESCRIPTOR" in os.environ


def _brief() -> None:
    from apache_beam.runners.worker import statesampler

    with _BRIEF_LOCK:
        if _BRIEF["runs"] == 0:
            beams = _BRIEF["beams"] = statesampler.StateSampler

            class Brief(beams):
                def __init__(self, prefix, counter_factory, sampling_period_ms=STATE_SAMPLING_MS):
                    super().__init__(prefix, counter_factory, min(sampling_period_ms, STATE_SAMPLING_MS))

            statesampler.StateSampler = Brief
        _BRIEF["runs"] += 1


def _as_before() -> None:
    from apache_beam.runners.worker import statesampler

    with _BRIEF_LOCK:
        _BRIEF["runs"] -= 1
        if _BRIEF["runs"] == 0:
            statesampler.StateSampler = _BRIEF["beams"]


@contextlib.contextmanager
def brief_state_sampling():
    """While inside, Beam's bundles made in this process sample their state at most `STATE_SAMPLING_MS` apart. Runs
    that overlap in threads share it; Beam's own sampler is back when the last one ends."""
    _brief()
    try:
        yield
    finally:
        _as_before()


def start_worker() -> None:
    """Set up this process, a Beam worker, for its life: run once as it starts."""
    _brief()
    remember_dofn_specs()
    remember_function_args()


if in_sdk_worker():  # imported by Beam as the worker starts (a forked worker calls it: `pipelines.worker_fork`)
    start_worker()
