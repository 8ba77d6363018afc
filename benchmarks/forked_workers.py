"""`lookalike embed --workers 2` with its worker processes started by Beam (each a fresh interpreter) and forked warm
(`pipelines.worker_fork`), and `--workers 1` (the workers in the launcher) beside them; each command a new process,
the ways alternated.

    python benchmarks/forked_workers.py [--shape smoke|base16-224] [--images 200] [--rounds 5]

A random SigLIP of the shape (tiny by default) on the CPU and a glob of n 160-px photos: what the ways differ by is the
worker processes' start. Each row: the command's wall seconds, its manifest's `pipeline` (the workers' start is in it), and how many
processes embedded, forked. Results go in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import machine, print_ways, realistic_jpegs, shape_args  # noqa: E402
from benchmarks.gpu_embed import SHAPES, _checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WAYS = {  # the command's flags
    "before: 2 worker processes started by Beam": ["--workers", "2", "--no-fork-workers"],
    "now: 2 worker processes forked warm": ["--workers", "2"],
    "1 worker: the launcher's own process": ["--workers", "1"],
}


def _embed(catalog: str, model: Path, out: Path, flags: list[str]) -> tuple[float, dict]:
    """One `lookalike embed` in a new process: its wall seconds and its manifest."""
    command = [str(Path(sys.executable).with_name("lookalike")), "embed", "--catalog", catalog, "--model", str(model),
               "--out", str(out), "--device", "cpu", *flags]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    took = time.monotonic() - started
    if done.returncode:
        raise SystemExit(f"error: a measured command failed:\n{done.stderr[-2000:]}")
    return took, json.loads(next(out.glob("embeddings/*/_manifest.json")).read_text())


def main() -> None:
    args = shape_args(__doc__, SHAPES, "photos per run")
    work = Path(tempfile.mkdtemp(prefix="lookalike-forked-workers-"))
    seconds: dict[tuple[int, str], list[float]] = {}
    manifests: dict[str, list[dict]] = {way: [] for way in WAYS}
    try:
        model = _checkpoint(work / "model", SHAPES[args.shape])
        realistic_jpegs(work / "photos", args.images, width=160)
        catalog = str(work / "photos" / "*.jpg")
        print(f"machine: {machine()}; SigLIP {args.shape} (random) on the CPU; {args.images} photos; {args.rounds} "
              "rounds, new processes")  # fmt: skip
        _embed(catalog, model, work / "warm-up", WAYS["now: 2 worker processes forked warm"])  # the page cache
        for r in range(args.rounds):
            for k, (way, flags) in enumerate(WAYS.items()):
                took, manifest = _embed(catalog, model, work / f"out-{r}-{k}", flags)
                assert manifest["counts"]["embedded"] == args.images, manifest["counts"]
                seconds.setdefault((args.images, way), []).append(took)
                manifests[way].append(manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def cells(n: int, way: str) -> list[str]:
        pipeline = float(np.median([m["time_s"]["pipeline"] for m in manifests[way]]))
        processes = sorted({(m["worker_processes"]["embedding"], m["worker_processes"]["forked"])
                            for m in manifests[way]})  # fmt: skip
        return [f"{pipeline:.3f}", " / ".join(f"{e}, {f}" for e, f in processes)]

    print(f"\n`lookalike embed` of {args.images} photos (seconds of the whole command)")
    print_ways(seconds, [args.images], WAYS, ("pipeline, median", "processes embedding, forked"), cells)


if __name__ == "__main__":
    main()
