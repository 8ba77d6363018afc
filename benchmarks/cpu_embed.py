"""CPU throughput: `lookalike embed` end to end against a naive baseline, in one process, on the same JPEGs.

    python benchmarks/cpu_embed.py [--images 2000] [--image-size 96]

Baseline (what a user writes first): PIL full decode + the checkpoint's HF image
processor + the two-tower SiglipModel in fp32 with eager attention, one image at
a time. Then lookalike's stages alone (decode with and without JPEG draft,
encoder on pre-decoded batches) and the whole Beam pipeline (1 and 2 worker
processes). Results go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import machine, print_table, rate, realistic_jpegs, scratch_dir  # noqa: E402
from encoder import DecodeLimits, EncoderConfig, TinyModelConfig, decode_image, init_tiny_model, load_encoder  # noqa: E402
from pipelines.embed import EmbedConfig, run_embed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--baseline-images", type=int, default=300, help="the naive path is slow; time a subset")
    parser.add_argument("--image-size", type=int, default=96)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = scratch_dir("lookalike-bench-")
    paths = realistic_jpegs(work / "images", args.images)
    blobs = [p.read_bytes() for p in paths]
    pq.write_table(
        pa.table({"item_id": [p.stem for p in paths], "image_uri": [str(p) for p in paths]}), work / "manifest.parquet"
    )
    model_dir = init_tiny_model(
        ["a product photo of a mug", "a striped vase"] * 50, work / "model", TinyModelConfig(image_size=args.image_size)
    )
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    print(f"{len(paths)} JPEGs, 640 px wide, quality 90, mean {np.mean([len(b) for b in blobs]) / 1024:.0f} KiB")
    print(f"tiny SigLIP at {args.image_size} px\n")

    results: dict[str, float] = {}

    # (a) naive baseline
    from transformers import AutoImageProcessor, SiglipModel

    hf_model = SiglipModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    subset = paths[: args.baseline_images]

    def naive() -> None:
        with torch.no_grad():
            for path in subset:
                pixel_values = processor(images=Image.open(path), return_tensors="pt")["pixel_values"]
                hf_model.get_image_features(pixel_values=pixel_values)

    results["naive: PIL + HF processor + fp32 eager, 1 image at a time"] = rate(len(subset), naive)

    # lookalike's stages alone
    encoder = load_encoder(EncoderConfig(model=str(model_dir), device="cpu", batch_size=64))
    cfg = encoder.preprocess
    results["decode + resize, JPEG draft (1 thread)"] = rate(
        len(blobs), lambda: [decode_image(b, cfg, DecodeLimits(draft=True)) for b in blobs]
    )
    results["decode + resize, full decode (1 thread)"] = rate(
        len(blobs), lambda: [decode_image(b, cfg, DecodeLimits(draft=False)) for b in blobs]
    )
    prepared = np.stack([decode_image(b, cfg) for b in blobs])
    results["encoder alone on decoded batches of 64"] = rate(len(prepared), lambda: encoder.embed_prepared(prepared), 2)

    # the whole pipeline
    for workers in (1, 2):
        start = time.perf_counter()
        run = run_embed(
            EmbedConfig(
                catalog=str(work / "manifest.parquet"),
                model=str(model_dir),
                out=str(work / f"out{workers}"),
                workers=workers,
            )  # fmt: skip
        )
        wall = time.perf_counter() - start
        assert run.counts["embedded"] == len(paths), run.counts
        results[f"lookalike embed, Beam FnApiRunner, {workers} worker process(es), whole run"] = len(paths) / wall

    print_table(results, baseline="naive")


if __name__ == "__main__":
    main()
