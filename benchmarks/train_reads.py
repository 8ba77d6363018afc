"""What feeding training from gs:// costs: a data-loading process's images/s over an epoch of catalog photos on a
local GCS emulator, behind a proxy that holds every request `--latency-ms` (an object store's first byte: tens of
milliseconds), two ways, alternated, best round of each:

    one_at_a_time   each item's image read, then decoded and augmented, one after the other (the loader before):
                    the client's own download, no size cap
    batch_at_once   `training.data.PairDataset.__getitems__`: the batch's reads in flight together on
                    `READ_THREADS` threads (capped by `--max-image-bytes`), then decoded in order

    python benchmarks/train_reads.py                      # 256 photos, 40 ms, batches of 32, 2 loader processes

The emulator answers one request at a time: with the latency held in the (threaded) proxy, reads overlap until
the emulator's own rate, which real GCS does not have. Decoding and augmenting are the same both ways; they bound
a loader process once reads stop waiting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.update(NO_GCE_CHECK="true", GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9")

from benchmarks.common import machine, photos_on_gcs  # noqa: E402


def one_at_a_time(dataset_class):
    """The loader before: no batched fetch, each image read by the client's download, whole."""

    class OneAtATime(dataset_class):
        __getitems__ = None  # the DataLoader then fetches item by item

        def _read(self, row: int) -> bytes:
            from encoder import storage

            return storage.read_bytes(self.image_uri(row))

    return OneAtATime


def epoch(dataset, batch: int, workers: int) -> float:
    """Seconds for one pass over `dataset` in batches of `batch` (augmented), on `workers` loader processes."""
    import torch

    from training.data import EpochBatches

    batches = EpochBatches(len(dataset), batch, seed=0, epoch=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         prefetch_factor=2 if workers else None)  # fmt: skip
    start = time.perf_counter()
    for _, _, replaced in loader:
        assert not replaced.any(), "an image could not be read"
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--latency-ms", type=float, default=40.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=224, help="the model's input side (SigLIP base/16-224)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import numpy as np

    from encoder import DecodeLimits, PreprocessConfig, storage
    from tests.support.fault_proxy import FaultProxy, through
    from tests.support.gcs_emulator import start_emulator
    from training.data import PairDataset
    from training.pairs import READ_THREADS

    proc, port = start_emulator()
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    storage.no_background_bucket_lookups()
    seconds: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as work:
            _, uris, mean_kb = photos_on_gcs(Path(work), args.images)
        ids = np.zeros((len(uris), 4), dtype=np.int64)
        preprocess = PreprocessConfig(height=args.size, width=args.size)
        ways = {"one_at_a_time": one_at_a_time(PairDataset), "batch_at_once": PairDataset}
        proxy = FaultProxy(port, rate=1.0, kinds=("slow",), slow_s=args.latency_ms / 1000)
        with proxy, through(proxy):
            for _ in range(args.rounds):
                for name, dataset_class in ways.items():
                    dataset = dataset_class(uris, ids, preprocess, limits=DecodeLimits())
                    took = epoch(dataset, args.batch, args.workers)
                    seconds[name] = min(seconds.get(name, took), took)
    finally:
        proc.kill()
        proc.wait()
    base = args.images / seconds["one_at_a_time"]
    results = {name: {"images_per_s": round(args.images / s, 1), "x_one_at_a_time": round(args.images / s / base, 2)}
               for name, s in seconds.items()}  # fmt: skip
    print(json.dumps({"machine": machine(), "images": args.images, "mean_kb": round(mean_kb, 1),
                      "latency_ms": args.latency_ms, "batch": args.batch, "workers": args.workers,
                      "read_threads": READ_THREADS, **results}))  # fmt: skip


if __name__ == "__main__":
    main()
