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

import argparse
import contextlib
import logging
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
from benchmarks.common import machine, realistic_jpegs  # noqa: E402
from benchmarks.gpu_embed import SHAPES, _checkpoint  # noqa: E402
from pipelines.beam_memo import remember_dofn_specs  # noqa: E402
from pipelines.embed import EmbedConfig, run_embed  # noqa: E402

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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="200,2000", help="catalog sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sizes = [int(n) for n in args.images.split(",")]
    work = Path(tempfile.mkdtemp(prefix="lookalike-beam-memo-"))
    seconds: dict[tuple[int, str], list[float]] = {}
    asks: dict[tuple[int, str], list[tuple[int, float]]] = {}
    try:
        photos = realistic_jpegs(work / "photos", max(sizes), width=160)
        for n in sizes:
            (work / str(n)).mkdir()
            for photo in photos[:n]:
                shutil.copy(photo, work / str(n))
        model = _checkpoint(work / "model", SHAPES["smoke"])
        print(f"machine: {machine()}; tiny SigLIP on the CPU; {args.rounds} rounds")

        def run(n: int, out: Path) -> float:
            cfg = EmbedConfig(catalog=str(work / str(n) / "*.jpg"), model=str(model), out=str(out), device="cpu",
                              batch_size=64)  # fmt: skip
            started = time.monotonic()
            done = run_embed(cfg).counts["embedded"]
            assert done == n, (done, n)
            return time.monotonic() - started

        run(sizes[0], work / "warm")  # imports, caches: untimed
        for r in range(args.rounds):
            for n in sizes:
                for way in WAYS:
                    asked: list[float] = []
                    with counted(way, asked):
                        seconds.setdefault((n, way), []).append(run(n, work / f"out-{r}-{n}-{WAYS.index(way)}"))
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
