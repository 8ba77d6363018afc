"""A new process's model load with the model's version hashed from its weights, against the version an earlier
process remembered on disk (`encoder.model._cached_version`), each in new interpreters, alternated.

    python benchmarks/version_cache.py [--shape smoke|base16-224|so400m14-384] [--rounds 5]

Each process imports `encoder.model` and calls `load_encoder` on a random SigLIP of the shape (CPU): what the
launcher of a run and each of its local worker processes do. "Before" never remembers (every process hashes the
tower's weights, as each did before); "now" finds the version an untimed earlier process remembered. Each row: the
process's wall seconds and `load_encoder`'s. Results go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import machine, print_ways, timed_process  # noqa: E402
from benchmarks.gpu_embed import SHAPES, _checkpoint  # noqa: E402

WAYS = {"before: hashed in every process": False, "now: remembered by an earlier process": True}
LOAD = """
import json, time
import encoder.model as m
if not {remember}:
    m._SETTLED_S = float("inf")  # never remembered on disk: every process hashes
started = time.perf_counter()
encoder = m.load_encoder(m.EncoderConfig(model={model!r}, device="cpu", cache_dir={cache!r}))
print(json.dumps(dict(load_s=time.perf_counter() - started, version=encoder.model_version)))
"""


def _python(script: str) -> tuple[float, dict]:
    """Run `script` in a new interpreter; its wall seconds and the JSON it printed last."""
    took, out = timed_process([sys.executable, "-c", script])
    return took, json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="base16-224", choices=sorted(SHAPES))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lookalike-version-cache-"))
    seconds: dict[tuple[int, str], list[float]] = {}
    loads: dict[str, list[float]] = {way: [] for way in WAYS}
    try:
        model = _checkpoint(work / "model", SHAPES[args.shape])
        time.sleep(2.1)  # its files settled (`_SETTLED_S`), as a model's are by the time a run loads it
        weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        print(f"machine: {machine()}; SigLIP {args.shape} (random, {weights / 1e6:.0f} MB of weights) on the CPU; "
              f"{args.rounds} rounds, new processes")  # fmt: skip
        scripts = {way: LOAD.format(remember=remember, model=str(model), cache=str(work / f"cache-{remember}"))
                   for way, remember in WAYS.items()}  # fmt: skip
        versions = {_python(script)[1]["version"] for script in scripts.values()}  # untimed: page cache, remembered
        for _ in range(args.rounds):
            for way, script in scripts.items():
                took, out = _python(script)
                versions.add(out["version"])
                seconds.setdefault((1, way), []).append(took)
                loads[way].append(out["load_s"])
        assert len(versions) == 1, versions  # the same version either way
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\nA new process's `load_encoder` (seconds of the whole process)")
    print_ways(
        seconds,
        [1],
        WAYS,
        ("load_encoder, median",),
        lambda n, way: [f"{float(np.median(loads[way])):.3f}"],
        size_header="processes",
    )


if __name__ == "__main__":
    main()
