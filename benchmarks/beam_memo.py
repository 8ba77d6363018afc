"""Local embed runs with what Beam works out again and again worked out once (`pipelines.beam_memo`): each DoFn's
state and timers remembered per DoFn, and the options' views each made once, against Beam's own ways.

    python benchmarks/beam_memo.py [--images 200,2000] [--rounds 5]

A glob of small photos (160 px, from `realistic_jpegs`) and a tiny random SigLIP on this machine's CPU, the
local runner in this process: what the runs differ by is Beam's fixed cost per run, not the model's work. Each round
runs the three ways on each catalog size, alternated; also how often Beam asked about DoFns per run and how long its
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
from apache_beam.transforms import userstate  # noqa: E402

import pipelines.embed as embed  # noqa: E402
from benchmarks.local_runs import photo_runs, size_args  # noqa: E402
from pipelines.beam_memo import remember_dofn_specs  # noqa: E402

WAYS = (
    "before: Beam's own ways",
    "each DoFn's state and timers remembered",
    "now: also each view of the options made once",
)


@contextlib.contextmanager
def counted(way: str, asked: list[float]):
    """The way's `get_dofn_specs` in Beam's place, each call's seconds appended to `asked`, and its options."""
    remember_dofn_specs()
    ours = userstate.get_dofn_specs
    specs = ours.__wrapped__ if way == WAYS[0] else ours
    made = embed._pipeline_options
    options = made if way == WAYS[2] else lambda cfg, args: PipelineOptions(made(cfg, args)._flags)

    def timed(dofn):
        started = time.perf_counter()
        try:
            return specs(dofn)
        finally:
            asked.append(time.perf_counter() - started)

    # `run_embed` puts ours in place (once per process): it stays, with the way's answers behind it
    with (mock.patch.object(userstate, "get_dofn_specs", timed), mock.patch.object(embed, "remember_dofn_specs"),
          mock.patch.object(embed, "_pipeline_options", options)):  # fmt: skip
        yield


def main() -> None:
    args, sizes = size_args(__doc__)
    work = Path(tempfile.mkdtemp(prefix="lookalike-beam-memo-"))
    seconds: dict[tuple[int, str], list[float]] = {}
    asks: dict[tuple[int, str], list[tuple[int, float]]] = {}
    try:
        run = photo_runs(work, sizes, args.rounds)
        run(sizes[0], work / "warm")  # imports, caches: untimed
        for r in range(args.rounds):
            for n in sizes:
                for way in WAYS:
                    asked: list[float] = []
                    with counted(way, asked):
                        seconds.setdefault((n, way), []).append(run(n, work / f"out-{r}-{n}-{WAYS.index(way)}")[0])
                    asks.setdefault((n, way), []).append((len(asked), sum(asked)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| images | way | seconds, each run | median | × before | Beam's asks per run | their seconds, median |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for n in sizes:
        base = float(np.median(seconds[n, WAYS[0]]))
        for way in WAYS:
            runs, median = seconds[n, way], float(np.median(seconds[n, way]))
            calls = sorted({c for c, _ in asks[n, way]})
            spent = float(np.median([s for _, s in asks[n, way]]))
            print(f"| {n:,} | {way} | {' / '.join(f'{s:.3f}' for s in runs)} | {median:.3f} | {median / base:.2f} | "
                  f"{'/'.join(map(str, calls))} | {spent:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
