"""Wall time of each nightly step: a first night, then a night after 1% of the catalog changed.

    python benchmarks/nightly_bench.py [--items 10000 100000] [--width 256]

A synthetic catalog per size: JPEGs made from scikit-image's photos (`--width` px, so 100k
files stay small on disk), listing titles, and a click log (10% of items as queries,
1–3 clicks each). The demo's tiny model (32 px). Night 1 embeds everything, indexes with
`--index auto`, evaluates against `builtin:pixels` (which decodes every image itself) and
publishes; then 1% of the images are rewritten and 0.25% of the items delisted, and night
2 re-encodes only the changed images and evaluates against night 1. Each step's time is
read from the run's ledger. Results go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import machine, realistic_jpegs, scratch_dir  # noqa: E402
from encoder.tiny import TinyModelConfig, init_tiny_model  # noqa: E402

DEMO_SHAPE = TinyModelConfig(image_size=32, patch_size=4, width=64, layers=3, heads=2, max_text_tokens=16)


def _catalog(folder: Path, items: int, width: int) -> tuple[Path, Path]:
    images = realistic_jpegs(folder / "images", items, width=width, quality=85)
    rng = np.random.default_rng(0)
    ids = [f"item-{i:07d}" for i in range(items)]
    words = "red blue round square mug lamp chair vase striped dotted matte glossy".split()
    pq.write_table(pa.table({"item_id": ids, "image_uri": [f"images/{p.name}" for p in images],
                             "title": [" ".join(rng.choice(words, 4)) for _ in ids]}), folder / "manifest.parquet")  # fmt: skip
    queries = rng.choice(items, size=items // 10, replace=False)
    rows = [(ids[q], ids[int(c)]) for q in queries for c in rng.choice(items, size=int(rng.integers(1, 4))) if c != q]
    pq.write_table(pa.table({"query_item_id": [q for q, _ in rows], "clicked_item_id": [c for _, c in rows]}),
                   folder / "interactions.parquet")  # fmt: skip
    return folder / "manifest.parquet", folder / "interactions.parquet"


def _change(folder: Path, fraction: float = 0.01) -> tuple[int, int]:
    manifest = pq.read_table(folder / "manifest.parquet")
    n = manifest.num_rows
    rng = np.random.default_rng(1)
    chosen = rng.choice(n, size=int(n * fraction * 1.25), replace=False)
    rewrite, delist = chosen[: int(n * fraction)], chosen[int(n * fraction) :]
    uris = manifest.column("image_uri").to_pylist()
    for row in rewrite:  # a new photo: the same file, mirrored and re-encoded
        path = folder / uris[int(row)]
        Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path, "JPEG", quality=80)
    keep = np.ones(n, dtype=bool)
    keep[delist] = False
    pq.write_table(manifest.filter(pa.array(keep)), folder / "manifest.parquet")
    return len(rewrite), len(delist)


def _night(folder: Path, model: Path, catalog: Path, logs: Path, run_id: str) -> dict[str, float]:
    from pipelines.nightly import run_nightly
    from pipelines.nightly_config import EvaluateSettings, NightlyConfig

    cfg = NightlyConfig(catalog=str(catalog), model=str(model), out=str(folder / "out"), interactions=str(logs),
                        evaluate=EvaluateSettings(gates=("ndcg@5>=baseline-1",), since_days=None, min_queries=1))  # fmt: skip
    start = time.perf_counter()
    result = run_nightly(cfg, run_id)
    times = {row["step"]: row["seconds"] for row in result.steps}
    times["whole run"] = time.perf_counter() - start
    times["embedded / reused"] = f"{result.steps[0]['counts']['embedded']:,} / {result.steps[0]['counts']['reused']:,}"
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[10_000])
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args()
    work = scratch_dir("lookalike-nightly-bench-")
    columns: dict[str, dict] = {}
    for items in args.items:
        folder = work / f"n{items}"
        start = time.perf_counter()
        catalog, logs = _catalog(folder, items, args.width)
        print(f"{items:,} items: catalog made in {time.perf_counter() - start:.0f} s", flush=True)
        model = init_tiny_model(["red mug", "blue lamp"], folder / "model", DEMO_SHAPE)
        columns[f"{items:,} first night"] = _night(folder, model, catalog, logs, "night-1")
        changed, delisted = _change(folder)
        print(f"changed {changed:,} images, delisted {delisted:,}", flush=True)
        columns[f"{items:,} 1% changed"] = _night(folder, model, catalog, logs, "night-2")
    print(f"\nmachine: {machine()}; JPEGs {args.width} px; tiny model at 32 px; work dir {work} (removed at exit)\n")
    names = list(columns)
    print("| step | " + " | ".join(names) + " |\n| --- |" + " ---: |" * len(names))
    for step in ("embed", "index", "evaluate", "publish", "retention", "whole run", "embedded / reused"):
        cells = [columns[n].get(step, "-") for n in names]
        print(f"| {step} | " + " | ".join(f"{c:.1f} s" if isinstance(c, float) else str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
