"""Local embed runs of small photo globs with a tiny random SigLIP on this machine's CPU, the local runner in the
benchmark's process: what the runs of Beam's fixed cost per run (`beam_memo.py`, `shard_sink.py`) differ by is Beam's
work, not the model's."""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import machine, realistic_jpegs
from benchmarks.gpu_embed import SHAPES, _checkpoint
from pipelines.embed import EmbedConfig, EmbedResult, run_embed


def size_args(doc: str) -> tuple[argparse.Namespace, list[int]]:
    """The command line of such a benchmark (`--images` sizes, `--rounds`) and its sizes; warnings only logged."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="200,2000", help="catalog sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    return args, [int(n) for n in args.images.split(",")]


def photo_runs(work: Path, sizes: list[int], rounds: int) -> Callable[[int, Path], tuple[float, EmbedResult]]:
    """A glob `work/<n>/*.jpg` of the first n 160-px photos for each size, and a tiny SigLIP; what runs n of them into
    `out` and gives its seconds and result (every photo embedded, checked)."""
    photos = realistic_jpegs(work / "photos", max(sizes), width=160)
    for n in sizes:
        (work / str(n)).mkdir()
        for photo in photos[:n]:
            shutil.copy(photo, work / str(n))
    model = _checkpoint(work / "model", SHAPES["smoke"])
    print(f"machine: {machine()}; tiny SigLIP on the CPU; {rounds} rounds")

    def run(n: int, out: Path) -> tuple[float, EmbedResult]:
        cfg = EmbedConfig(catalog=str(work / str(n) / "*.jpg"), model=str(model), out=str(out), device="cpu",
                          batch_size=64)  # fmt: skip
        started = time.monotonic()
        result = run_embed(cfg)
        took = time.monotonic() - started
        assert result.counts["embedded"] == n, (result.counts, n)
        return took, result

    return run
