"""An embed run's launch, from `run_embed` to the pipeline's construction: the model loaded before the catalog is
read, as before, against loaded in a thread of its own while the catalog is listed and read (`embed._start_loading`).

    python benchmarks/launch_overlap.py [--files 20000] [--shape base16-224] [--rounds 4]

A glob of `--files` photos as the catalog (copies of one small JPEG: listing them is the catalog's work here) and a
random SigLIP of `--shape`, on this machine's CPU (no GPU decoder: the launch up to the pipeline is the same code).
Each run is a fresh interpreter, as a command-line run is: its first load hashes the weights for the model's
version. The same interpreter then launches a second run, as the benchmarks' repeated runs do, the version known.
Each time is from `run_embed`'s call to `build_pipeline`'s, where the run is stopped. Both ways alternated, `--rounds`
each. Results go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
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

from benchmarks.common import machine, realistic_jpegs  # noqa: E402

WAYS = ("before: the model, then the catalog", "now: the model loaded while the catalog is read")
_CHILD = "--child"


class _Built(Exception):
    """Raised where the pipeline would be built: the launch is over."""


def _launch(catalog: str, model: str, out: Path, before: bool) -> dict[str, float]:
    """In this interpreter: two launches of a run, the first and one after it; each launch's seconds, and the model's
    load (`time_s.model_load`, as the launcher measured it) of each."""
    from concurrent.futures import Future

    import pipelines.embed as embed
    from pipelines.embed import EmbedConfig, run_embed

    if before:

        def at_once(cfg, options) -> Future:
            started, done = time.monotonic(), Future()
            done.set_result((*embed._launcher_encoder(cfg, options), time.monotonic() - started))
            return done

        embed._start_loading = at_once
    loads: list[float] = []
    real_start = embed._start_loading

    def recording(cfg, options):
        loading = real_start(cfg, options)
        loading.add_done_callback(lambda f: loads.append(f.result()[2]))
        return loading

    embed._start_loading = recording
    embed.build_pipeline = lambda *a, **k: (_ for _ in ()).throw(_Built())
    times = {}
    for name in ("first", "again"):
        started = time.monotonic()
        try:
            run_embed(EmbedConfig(catalog=catalog, model=model, out=str(out / name), device="cpu"))
        except _Built:
            times[name] = time.monotonic() - started
    return {**times, "load_first": loads[0], "load_again": loads[1]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == _CHILD:  # one fresh interpreter's two launches, as JSON
        _, _, catalog, model, out, way = sys.argv
        print(json.dumps(_launch(catalog, model, Path(out), way == "before")))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--shape", default="base16-224", help="a shape of gpu_embed.py's SHAPES")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    from benchmarks.gpu_embed import SHAPES, _checkpoint

    work = Path(tempfile.mkdtemp(prefix="lookalike-launch-"))
    runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    try:
        photo = realistic_jpegs(work / "one", 1, width=64)[0].read_bytes()
        for i in range(args.files):
            folder = work / "photos" / f"{i // 1000:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"p{i:06d}.jpg").write_bytes(photo)
        model = _checkpoint(work / "model", SHAPES[args.shape])
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        print(f"machine: {machine()}; {args.files:,} files, SigLIP {args.shape}; {args.rounds} rounds")
        for r in range(args.rounds):
            for way in WAYS:
                out = work / f"out-{r}-{WAYS.index(way)}"
                child = subprocess.run([sys.executable, __file__, _CHILD, str(work / "photos" / "*" / "*.jpg"),
                                        str(model), str(out), "before" if way == WAYS[0] else "now"],
                                       env=env, capture_output=True, text=True, check=True)  # fmt: skip
                runs[way].append(json.loads(child.stdout.strip().splitlines()[-1]))
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| launch | way | seconds, each run | median | × before | the model's load, median s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for launch, what in (("first", "a fresh interpreter's first"), ("again", "the same interpreter's second")):
        base = float(np.median([run[launch] for run in runs[WAYS[0]]]))
        for way in WAYS:
            seconds = [run[launch] for run in runs[way]]
            median = float(np.median(seconds))
            load = float(np.median([run[f"load_{launch}"] for run in runs[way]]))
            print(f"| {what} | {way} | {' / '.join(f'{s:.3f}' for s in seconds)} | {median:.3f} | "
                  f"{median / base:.2f} | {load:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
