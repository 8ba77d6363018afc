"""How long an embed run holds its worker when every image read fails: storage answering 503 to every request
(each read retried, with backoff, up to 5 times), with the workers' dead-letter watch (`--max-dead-letters 0.5`,
`pipelines.dead_letters`) against without it (`--max-dead-letters 1`). The local GCS emulator behind the test
suite's fault proxy, the Beam pipeline on the local runner, a tiny model (nothing reaches it).

    python benchmarks/outage_stop.py                      # 3,000 items, a window of 1,000, 64 fetch threads
    python benchmarks/outage_stop.py --items 10000 --window 5000 [--gpu-worker]   # RELIABILITY.md's runs

Seconds until the run ends (stopped, or complete with every item dead-lettered) and the requests storage saw.
The stop comes after about `window` items; without it, after every item. Results go in RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.update(NO_GCE_CHECK="true", GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9",
                  HF_HUB_OFFLINE="1")  # fmt: skip

from benchmarks.common import machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--window", type=int, default=1000, help="the watch's window (the product's: 5,000)")
    parser.add_argument("--fetch-threads", type=int, default=64)
    parser.add_argument("--gpu-worker", action="store_true", help="read as a GPU worker does: in reader processes "
                        "(8 chunks of 8 at once each), the GPU decoder stood in by Pillow on the CPU")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    import pyarrow as pa
    import pyarrow.parquet as pq

    from encoder.tiny import TinyModelConfig, init_tiny_model
    from pipelines import dead_letters
    from pipelines.embed import EmbedConfig, run_embed
    from tests.support.fault_proxy import FaultProxy, through
    from tests.support.gcs_emulator import start_emulator

    dead_letters.WINDOW_ITEMS = args.window  # the local runner's workers run in this process
    if args.gpu_worker:
        import encoder.gpu_images as gpu_images
        from pipelines import embed_dofns

        embed_dofns.gpu_decoding = lambda cfg, preprocess: True
        gpu_images.DECODERS["nvjpeg"] = lambda device: gpu_images.pil_decoder()
    proc, port = start_emulator()
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    print(f"machine: {machine()}; {args.items:,} items, every read answered 503, window {args.window:,}, "
          + ("a GPU worker's reader processes" if args.gpu_worker else f"{args.fetch_threads} fetch threads"),
          flush=True)  # fmt: skip
    try:
        with tempfile.TemporaryDirectory() as work:
            model = init_tiny_model(["a red shoe", "a blue bag"] * 20, Path(work) / "model", TinyModelConfig())
            catalog = Path(work) / "catalog.parquet"
            pq.write_table(pa.table({"item_id": [f"item-{i}" for i in range(args.items)],
                                     "image_uri": [f"gs://photos/{i}.jpg" for i in range(args.items)]}), catalog)  # fmt: skip
            print(
                "| `--max-dead-letters` | how the run ended | seconds | requests to storage |\n| --- | --- | ---: | ---: |"
            )
            message = "none"
            # One proxy for both runs: a GPU worker's reader processes, started by the first, keep its address.
            with FaultProxy(port, rate=1.0, kinds=("503",)) as proxy, through(proxy):
                for share in (0.5, 1.0):
                    cfg = EmbedConfig(catalog=str(catalog), model=str(model), out=str(Path(work) / f"out-{share}"),
                                      fetch_threads=args.fetch_threads, max_dead_letters=share, hedge_reads=False,
                                      batch_size=256 if args.gpu_worker else 64, gpu_decoder="nvjpeg")  # fmt: skip
                    before, started = proxy.counts["requests"], time.perf_counter()
                    try:
                        result = run_embed(cfg)
                        ended = f"complete: {result.counts['dead_lettered']:,} dead letters"
                    except dead_letters.TooManyDeadLetters as err:
                        message = str(err)
                        ended = message.split(" were dead-lettered")[0].split(" stopped: ", 1)[-1] + " failed: stopped"
                    seconds, requests = time.perf_counter() - started, proxy.counts["requests"] - before
                    print(f"| {share:g} | {ended} | {seconds:,.1f} | {requests:,} |", flush=True)
            print(f"\nthe stop: {message}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
