"""What lookalike's Beam worker processes set up as they start (`pipelines.worker_plugin`): imported by Beam's own
plugin loader in a process that looks like an SDK worker, and scoped to a run in the launching process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from apache_beam.options.pipeline_options import SetupOptions
from apache_beam.runners.worker import statesampler
from apache_beam.utils.counters import CounterFactory
from apache_beam.utils.plugin import BeamPlugin

from pipelines import embed, worker_plugin
from pipelines.worker_plugin import STATE_SAMPLING_MS, brief_state_sampling

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "pipelines.worker_plugin.WorkerPlugin"
# Beam's SDK worker imports the job's plugins as it starts, then makes bundles (each with a state sampler).
WORKER_START = f"""
import json
from apache_beam.runners.worker import sdk_worker_main, statesampler
from apache_beam.transforms import core, userstate
from apache_beam.utils.counters import CounterFactory
sdk_worker_main._import_beam_plugins([{PLUGIN!r}])
remembered = [hasattr(f, "__wrapped__") for f in (userstate.get_dofn_specs, core.get_function_args_defaults)]
print(json.dumps([statesampler.StateSampler("bundle", CounterFactory()).sampling_period_ms, *remembered]))
"""


def _worker_start(as_a_worker: bool) -> list:
    """A new bundle's sampling period in a fresh process that starts as Beam's SDK worker does, with a worker's
    environment (its runner's control endpoint) or without; and whether Beam's DoFn specs and functions' arguments
    are remembered there (`pipelines.beam_memo`)."""
    env = {k: v for k, v in os.environ.items() if k != "CONTROL_API_SERVICE_DESCRIPTOR"}
    if as_a_worker:
        env["CONTROL_API_SERVICE_DESCRIPTOR"] = "url: 'localhost:1'"
    out = subprocess.run([sys.executable, "-c", WORKER_START], cwd=ROOT, env=env, check=True, capture_output=True,
                         text=True, timeout=120).stdout  # fmt: skip
    return json.loads(out.splitlines()[-1])


def test_a_worker_process_that_imports_the_plugin_samples_briefly_and_remembers_for_its_life():
    assert _worker_start(as_a_worker=True) == [STATE_SAMPLING_MS, True, True]


def test_importing_the_plugin_elsewhere_leaves_beams_sampler_as_it_is():
    assert _worker_start(as_a_worker=False) == [statesampler.DEFAULT_SAMPLING_PERIOD_MS, False, False]
    assert statesampler.DEFAULT_SAMPLING_PERIOD_MS == 200
    assert not worker_plugin.in_sdk_worker()  # nor here, in the tests' process


def test_every_job_names_the_plugin_for_its_workers():
    """Dataflow's runner also lists every imported `BeamPlugin` subclass; the local runner's worker processes read
    the job's options."""
    assert PLUGIN in BeamPlugin.get_all_plugin_paths()
    for beam_args in ([], ["--runner=DataflowRunner", "--beam_plugins=someone.Else"]):
        cfg = embed.EmbedConfig(catalog="unused", model="unused", out="unused")
        plugins = embed._pipeline_options(cfg, beam_args).view_as(SetupOptions).beam_plugins
        assert PLUGIN in plugins and ("someone.Else" in plugins) == bool(beam_args)


def test_state_samplers_sample_briefly_while_inside_and_as_before_after():
    """A bundle's end waits for its state sampler to wake: up to Beam's 200 ms, 20 ms inside, however runs in
    threads overlap."""
    beams = statesampler.StateSampler
    first, second = brief_state_sampling(), brief_state_sampling()
    first.__enter__()
    inside = statesampler.StateSampler("inside", CounterFactory())
    asked = statesampler.StateSampler("asked", CounterFactory(), sampling_period_ms=5)
    second.__enter__()
    first.__exit__(None, None, None)  # the first run ends while the second still runs
    still = statesampler.StateSampler("still", CounterFactory())
    second.__exit__(None, None, None)
    after = statesampler.StateSampler("after", CounterFactory())
    assert (inside.sampling_period_ms, asked.sampling_period_ms, still.sampling_period_ms) == (20, 5, 20)
    assert statesampler.StateSampler is beams and isinstance(inside, beams)
    assert after.sampling_period_ms == statesampler.DEFAULT_SAMPLING_PERIOD_MS == 200
