"""Local embed runs with what Beam works out again and again worked out once (`pipelines.beam_memo`): each DoFn's
state and timers remembered per DoFn, the options' views each made once, and each function's arguments read once,
against Beam's own ways.

    python benchmarks/beam_memo.py [--images 200,2000] [--rounds 5]

A glob of small photos (160 px, from `realistic_jpegs`) and a tiny random SigLIP on this machine's CPU, the
local runner in this process: what the runs differ by is Beam's fixed cost per run, not the model's work. Each round
runs the four ways on each catalog size, alternated; also how often Beam asked about DoFns per run and how long its
answers took.
Results go in BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402
from apache_beam.transforms import core, userstate  # noqa: E402

import pipelines.embed as embed  # noqa: E402
from benchmarks.common import print_ways  # noqa: E402
from benchmarks.local_runs import photo_runs, size_args  # noqa: E402
from pipelines.beam_memo import remember_dofn_specs, remember_function_args  # noqa: E402

WAYS = (
    "before: Beam's own ways",
    "each DoFn's state and timers remembered",
    "also each view of the options made once",
    "now: also each function's arguments read once",
)


@contextlib.contextmanager
def counted(way: str, asked: list[float], read: list[float]):
    """The way's `get_dofn_specs` and `get_function_args_defaults` in Beam's place, each call's seconds appended to
    `asked` and `read`, and its options."""
    remember_dofn_specs()
    remember_function_args()
    ours = userstate.get_dofn_specs
    specs = ours.__wrapped__ if way == WAYS[0] else ours
    made = embed._pipeline_options
    options = made if WAYS.index(way) >= 2 else lambda cfg, args: PipelineOptions(made(cfg, args)._flags)
    read_args = core.get_function_args_defaults
    args = read_args if way == WAYS[3] else read_args.__wrapped__

    def timed(answer, seconds: list[float]):
        def call(subject):
            started = time.perf_counter()
            try:
                return answer(subject)
            finally:
                seconds.append(time.perf_counter() - started)

        return call

    # `run_embed` puts ours in place (once per process): it stays, with the way's answers behind it
    with (mock.patch.object(userstate, "get_dofn_specs", timed(specs, asked)), mock.patch.object(embed, "remember_dofn_specs"),
          mock.patch.object(embed, "_pipeline_options", options), mock.patch.object(embed, "remember_function_args"),
          mock.patch.object(core, "get_function_args_defaults", timed(args, read))):  # fmt: skip
        yield


def main() -> None:
    args, sizes = size_args(__doc__)
    work = Path(tempfile.mkdtemp(prefix="lookalike-beam-memo-"))
    seconds: dict[tuple[int, str], list[float]] = {}
    asks: dict[tuple[int, str], list[tuple[int, float, int, float, float]]] = {}
    try:
        run = photo_runs(work, sizes, args.rounds)
        run(sizes[0], work / "warm")  # imports, caches: untimed
        for r in range(args.rounds):
            for n in sizes:
                for way in WAYS:
                    asked: list[float] = []
                    read: list[float] = []
                    with counted(way, asked, read):
                        seconds.setdefault((n, way), []).append(run(n, work / f"out-{r}-{n}-{WAYS.index(way)}")[0])
                    asks.setdefault((n, way), []).append((len(asked), sum(asked), len(read), sum(read),
                                                          float(np.median(read))))  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def ask_cells(n: int, way: str) -> list[str]:  # per kind of ask: the counts seen, the median of their seconds
        cells = [cell for i in (0, 2) for cell in (" / ".join(map(str, sorted({a[i] for a in asks[n, way]}))),
                                                    f"{float(np.median([a[i + 1] for a in asks[n, way]])):.3f}")]  # fmt: skip
        # a read's own time, the median call's: what a preempted call or two cannot move, as they move the sum
        return [*cells, f"{1e6 * float(np.median([a[4] for a in asks[n, way]])):.1f}"]

    headers = ("Beam's asks about DoFns per run", "their seconds, median", "functions' arguments read per run",
               "their seconds, median", "µs per read, median call")  # fmt: skip
    print_ways(seconds, sizes, WAYS, headers, ask_cells)


if __name__ == "__main__":
    main()
