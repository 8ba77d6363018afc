"""`lookalike embed --workers 2` with its worker processes started by Beam (each a fresh interpreter) and forked warm
(`pipelines.worker_fork`), and `--workers 1` (the workers in the launcher) beside them; each command a new process,
the ways alternated. With `--command nightly`, the same as a nightly run's embed step (`lookalike nightly --step embed`,
`embed: {workers: 2}` in its config), with one way more: the forker started with the step, as a caller of the Python
API (`run_nightly`) gets it, instead of before the command's imports.

    python benchmarks/forked_workers.py [--command embed|nightly] [--shape smoke|base16-224] [--images 200] [--rounds 5]

A random SigLIP of the shape (tiny by default) on the CPU and a glob of n 160-px photos: what the ways differ by is the
worker processes' start. Each row: the command's wall seconds, its manifest's `pipeline` (the workers' start is in it), and how many
processes embedded, forked. Results go in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import machine, print_ways, realistic_jpegs, shape_args, timed_process  # noqa: E402
from benchmarks.gpu_embed import SHAPES, _checkpoint  # noqa: E402

EMBED_WAYS = {  # the command's flags
    "before: 2 worker processes started by Beam": ["--workers", "2", "--no-fork-workers"],
    "now: 2 worker processes forked warm": ["--workers", "2"],
    "1 worker: the launcher's own process": ["--workers", "1"],
}
NIGHTLY_WAYS = {  # the config's embed settings, and whether the Python API runs it instead of the command line
    "before: 2 worker processes started by Beam": ({"workers": 2, "fork_workers": False}, False),
    "forked, the forker started with the step (the API)": ({"workers": 2}, True),
    "now: forked, the forker started before the command's imports": ({"workers": 2}, False),
    "1 worker: the launcher's own process": ({"workers": 1}, False),
}
_API = ("from pipelines.nightly_config import load_nightly_config; from pipelines.nightly import run_nightly; "
        "import sys; run_nightly(load_nightly_config(sys.argv[1]), 'bench', until='embed')")  # fmt: skip


def _timed(command: list[str], out: Path) -> tuple[float, dict]:
    """One command in a new process: its wall seconds and the manifest of the embeddings it wrote under `out`."""
    took, _ = timed_process(command)
    return took, json.loads(next(out.glob("embeddings/*/_manifest.json")).read_text())


def _embed(catalog: str, model: Path, out: Path, flags: list[str]) -> tuple[float, dict]:
    """One `lookalike embed`."""
    return _timed([str(Path(sys.executable).with_name("lookalike")), "embed", "--catalog", catalog, "--model",
                   str(model), "--out", str(out), "--device", "cpu", *flags], out)  # fmt: skip


def _nightly(catalog: str, model: Path, out: Path, way: tuple[dict, bool]) -> tuple[float, dict]:
    """One nightly run's embed step, from the command line or through the API."""
    settings, api = way
    config = out.with_suffix(".json")  # JSON is YAML
    config.write_text(json.dumps({"catalog": catalog, "model": str(model), "out": str(out), "interactions": "-",
                                  "embed": {**settings, "device": "cpu"}}))  # fmt: skip
    if api:
        return _timed([sys.executable, "-c", _API, str(config)], out)
    return _timed([str(Path(sys.executable).with_name("lookalike")), "nightly", "--config", str(config), "--step",
                   "embed", "--run-id", "bench"], out)  # fmt: skip


def main() -> None:
    args = shape_args(__doc__, SHAPES, "photos per run", commands=("embed", "nightly"))
    ways, run = (NIGHTLY_WAYS, _nightly) if args.command == "nightly" else (EMBED_WAYS, _embed)
    work = Path(tempfile.mkdtemp(prefix="lookalike-forked-workers-"))
    seconds: dict[tuple[int, str], list[float]] = {}
    manifests: dict[str, list[dict]] = {way: [] for way in ways}
    try:
        model = _checkpoint(work / "model", SHAPES[args.shape])
        realistic_jpegs(work / "photos", args.images, width=160)
        catalog = str(work / "photos" / "*.jpg")
        print(f"machine: {machine()}; SigLIP {args.shape} (random) on the CPU; {args.images} photos; {args.rounds} "
              f"rounds, new processes; `lookalike {args.command}`")  # fmt: skip
        run(catalog, model, work / "warm-up", list(ways.values())[1])  # the page cache
        for r in range(args.rounds):
            for k, (way, how) in enumerate(ways.items()):
                took, manifest = run(catalog, model, work / f"out-{r}-{k}", how)
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

    print(f"\n`lookalike {args.command}` of {args.images} photos (seconds of the whole command)")
    print_ways(seconds, [args.images], ways, ("pipeline, median", "processes embedding, forked"), cells)


if __name__ == "__main__":
    main()
