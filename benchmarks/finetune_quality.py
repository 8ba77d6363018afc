"""Does fine-tuning help? demo catalog → tiny model → train → embed → index → evaluate, as a user runs it.

    python benchmarks/finetune_quality.py [--items 3000] [--epochs 20] [--out DIR]

Runs the `lookalike` command line end to end on the CPU and compares the fine-tuned
encoder's snapshot with (a) the untrained tiny model's snapshot and (b) the built-in
pixel baseline: nDCG@5 on the catalog's interaction logs, paired bootstrap 95% intervals
of the difference. Prints a Markdown table (results in README "Fine-tuning" and
BENCHMARKS.md) and each command's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, scratch_dir  # noqa: E402

# The demo's tiny model: small enough to learn colours, patterns and some shape in minutes on 2 cores
# (README "Fine-tuning" has the search that chose it).
DEMO_MODEL = ["--image-size", "32", "--patch-size", "4", "--width", "64", "--layers", "3", "--heads", "2"]
DEMO_TRAINING = ["--batch-size", "64", "--lr", "2e-3", "--max-text-tokens", "16", "--workers", "1"]


def _lookalike(*args: str, cwd: Path, timings: dict[str, float], label: str) -> str:
    exe = Path(sys.executable).with_name("lookalike")
    start = time.perf_counter()
    done = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    timings[label] = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"lookalike {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def _comparison(metrics: Path) -> dict:
    doc = json.loads(metrics.read_text())
    ndcg = next(c for c in doc["comparisons"] if c["metric"] == "ndcg@5")
    return {"queries": doc["counts"]["evaluated_queries"], **ndcg}


def _neighbour_agreement(work: Path, embeddings: str) -> dict[str, float]:
    """How often an item's 5 nearest neighbours share each of its true attributes (attributes.parquet)."""
    import numpy as np
    import pyarrow.parquet as pq

    from indexing.embeddings import open_embeddings

    ids, vectors = [], []
    for batch_ids, batch in open_embeddings([str(work / embeddings)]).batches():
        ids += batch_ids
        vectors.append(batch)
    x = np.concatenate(vectors)
    truth = pq.read_table(work / "catalog" / "attributes.parquet").to_pydict()
    row = {item_id: i for i, item_id in enumerate(truth["item_id"])}
    neighbours = np.argsort(-(x @ x.T), axis=1)[:, 1:6]
    agreement = {}
    for name in ("category", "shape", "colour", "pattern", "material"):
        values = np.array([truth[name][row[i]] for i in ids])
        agreement[name] = float((values[neighbours] == values[:, None]).mean())
    return agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=3, help="demo catalog seed")
    parser.add_argument(
        "--out", type=Path, default=None, help="work directory, kept (default: a new temporary one, removed at exit)"
    )
    args = parser.parse_args()
    work = args.out or scratch_dir("lookalike-finetune-")
    work.mkdir(parents=True, exist_ok=True)
    t: dict[str, float] = {}
    catalog, logs = "catalog/manifest.parquet", "catalog/interactions.parquet"
    _lookalike("demo-catalog", "--out", "catalog", "--items", str(args.items), "--seed", str(args.seed),
               cwd=work, timings=t, label="demo-catalog")  # fmt: skip
    _lookalike("init-model", "--catalog", catalog, "--out", "untrained", *DEMO_MODEL, cwd=work, timings=t,
               label="init-model")  # fmt: skip
    _lookalike("train", "--catalog", catalog, "--model", "untrained", "--out", "trained", "--epochs", str(args.epochs),
               "--interactions", logs, *DEMO_TRAINING, cwd=work, timings=t, label="train")  # fmt: skip
    for name, model in (("untrained", "untrained"), ("trained", "trained/encoder")):
        _lookalike("embed", "--catalog", catalog, "--model", model, "--out", f"emb-{name}", cwd=work, timings=t,
                   label=f"embed ({name})")  # fmt: skip
        _lookalike("index", "--embeddings", f"emb-{name}", "--out", f"snap-{name}", "--index", "flat", cwd=work,
                   timings=t, label=f"index ({name})")  # fmt: skip
        _lookalike("publish", "--root", f"snap-{name}", cwd=work, timings=t, label=f"publish ({name})")
    rows = {}
    for baseline, label in (("snap-untrained", "untrained tiny model"), ("builtin:pixels", "builtin:pixels")):
        out = f"eval-vs-{label.split()[0].replace(':', '-')}"
        _lookalike("evaluate", "--snapshot", "snap-trained", "--interactions", logs, "--baseline", baseline,
                   "--catalog", catalog, "--out", out, cwd=work, timings=t, label=f"evaluate vs {label}")  # fmt: skip
        rows[label] = _comparison(work / out / "metrics.json")

    report = json.loads((work / "trained" / "report.json").read_text())
    print(f"machine: {machine()}; {args.items} items (seed {args.seed}); {args.epochs} epochs; work dir {work}")
    print(f"training: {report['steps']} steps, {report['images_per_s']:.0f} images/s, {report['seconds']:.0f} s\n")
    print("| baseline | queries | nDCG@5 fine-tuned | nDCG@5 baseline | Δ | Δ 95% CI | relative |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for label, c in rows.items():
        relative = f"{c['relative']:+.0%}" if c["relative"] is not None else "-"
        print(f"| {label} | {c['queries']:,} | {c['candidate']:.4f} | {c['baseline']:.4f} | {c['delta']:+.4f} | "
              f"[{c['delta_ci'][0]:+.4f}, {c['delta_ci'][1]:+.4f}] | {relative} |")  # fmt: skip
    print("\nshare of the 5 nearest neighbours with the same true attribute:\n")
    print("| encoder | category | shape | colour | pattern | material |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in ("untrained", "trained"):
        agreement = _neighbour_agreement(work, f"emb-{name}")
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in agreement.values()) + " |")
    print("\n| step | wall s |\n| --- | ---: |")
    for label, seconds in t.items():
        print(f"| {label} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
