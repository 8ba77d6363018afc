"""A fresh process's model load, and a whole `lookalike embed`, with transformers' SigLIP image tower and with the
project's own (`encoder.siglip_tower`), each in new interpreters, alternated.

    python benchmarks/tower_load.py [--shape smoke|base16-224] [--images 200] [--rounds 5]

What an import costs shows only in a new process, so each measurement starts one:
- `load`: import `encoder.model`, `load_encoder` a random SigLIP of the shape (CPU), embed 8 blank images; the
  process's wall time and each part's seconds, and whether transformers was imported;
- `embed`: `lookalike embed` of a glob of n 160-px photos: the command's wall time and its manifest's `model_load`.
Results go in BENCHMARKS.md.
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

WAYS = {"before: transformers' SiglipVisionModel": False, "now: the project's tower": True}  # OWN_TOWER
LOAD = """
import json, sys, time
started = time.perf_counter()
import numpy as np
import encoder.model as m
m.OWN_TOWER = {own}
imported = time.perf_counter()
encoder = m.load_encoder(m.EncoderConfig(model={model!r}, device="cpu"))
loaded = time.perf_counter()
encoder.embed_prepared(np.zeros((8, encoder.preprocess.height, encoder.preprocess.width, 3), np.uint8))
print(json.dumps(dict(import_s=imported - started, load_s=loaded - imported, batch_s=time.perf_counter() - loaded,
                      transformers="transformers" in sys.modules)))
"""
EMBED = """
import sys
import encoder.model as m
m.OWN_TOWER = {own}
from pipelines.cli import main
sys.argv = ["lookalike", "embed", "--catalog", {catalog!r}, "--model", {model!r}, "--out", {out!r}, "--device", "cpu"]
main()
"""


def _python(script: str) -> tuple[float, str]:
    """Run `script` in a new interpreter; its wall seconds and stdout."""
    return timed_process([sys.executable, "-c", script])


def main() -> None:
    args = shape_args(__doc__, SHAPES, "photos in the `lookalike embed` runs")
    work = Path(tempfile.mkdtemp(prefix="lookalike-tower-load-"))
    # per table (a process's load; the command), by (images, way): each run's seconds, and its parts'
    seconds: dict[str, dict[tuple[int, str], list[float]]] = {"load": {}, "embed": {}}
    parts: dict[str, dict[tuple[int, str], list[dict]]] = {"load": {}, "embed": {}}
    try:
        model = _checkpoint(work / "model", SHAPES[args.shape])
        realistic_jpegs(work / "photos", args.images, width=160)
        catalog = str(work / "photos" / "*.jpg")
        print(f"machine: {machine()}; SigLIP {args.shape} (random) on the CPU; {args.rounds} rounds, fresh processes")
        for way in WAYS:  # untimed: the page cache warm for both ways
            _python(LOAD.format(own=WAYS[way], model=str(model)))
        for r in range(args.rounds):
            for way, own in WAYS.items():
                took, out = _python(LOAD.format(own=own, model=str(model)))
                seconds["load"].setdefault((8, way), []).append(took)
                parts["load"].setdefault((8, way), []).append(json.loads(out.strip().splitlines()[-1]))
                dest = work / f"out-{r}-{own}"
                took, _ = _python(EMBED.format(own=own, catalog=catalog, model=str(model), out=str(dest)))
                manifest = json.loads(next(dest.glob("embeddings/*/_manifest.json")).read_text())
                assert manifest["counts"]["embedded"] == args.images, manifest["counts"]
                seconds["embed"].setdefault((args.images, way), []).append(took)
                parts["embed"].setdefault((args.images, way), []).append(
                    {"model_load_s": manifest["time_s"]["model_load"]}
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(table: str, n: int, way: str, key: str) -> str:
        return f"{float(np.median([p[key] for p in parts[table][n, way]])):.3f}"

    print("\nA new process: import encoder.model, load_encoder, embed 8 images (seconds of the whole process)")
    print_ways(seconds["load"], [8], WAYS, ("import, median", "load, median", "first batch, median",
                                            "transformers imported"),
               lambda n, way: [*(median("load", n, way, key) for key in ("import_s", "load_s", "batch_s")),
                               " / ".join(sorted({str(p["transformers"]) for p in parts["load"][n, way]}))])  # fmt: skip
    print(f"\n`lookalike embed` of {args.images} photos (seconds of the whole command)")
    print_ways(seconds["embed"], [args.images], WAYS, ("model_load, median",),
               lambda n, way: [median("embed", n, way, "model_load_s")])  # fmt: skip


if __name__ == "__main__":
    main()
