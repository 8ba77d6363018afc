"""How many gs:// reads the Beam GPU worker's fetch step keeps out at once, and the images/s that allows when
every read waits on the network: the local GCS emulator behind a proxy that holds each request `--latency-ms`
before answering it. Compared, in one process and alternating rounds:

    before     elements of 64 items, each read whole before the next; each reader process one chunk of 8 at a time
    elements   elements of a batch (256, `embed.fetch_chunk_size`), one chunk at a time
    chunks     elements of 64, up to 8 chunks at a time per process (`file_reader.CHUNKS_PER_PROCESS`)
    both       elements of a batch, 8 chunks at a time
    ahead      both, and the next element under way while one is handed on (`embed_steps.PrepareAhead`)
    hedged     ahead, and a second request for each read still out past the 95th percentile of recent reads
               (`pipelines.hedged_reads`)
    two_ahead  both, two elements under way past the one handed on, no second requests
    now        two_ahead with second requests: the step as it runs now (each element's reads sent to the reader
               processes as it comes, finished when due)
    threaded   now, each element's reads waited for on a thread of its own instead, as before they were sent ahead
               (`benchmarks/beam_before.reads_as_before`)

    python benchmarks/gcs_latency.py        # 2,048 small photos, 8 reader processes (a GPU host's), 200 ms
    python benchmarks/gcs_latency.py --spread 0.5    # each hold drawn around 200 ms: a tail, as real reads have
    python benchmarks/gcs_latency.py --spread 1.0 --paths ahead,hedged,two_ahead,now

Without reading ahead the step reads an element whole before it takes the next, so images/s ≈ reads out at once
/ latency, less the wait for each element's slowest read. Second requests are counted as the proxy saw them
(`requests_per_image`). Each reader is warmed with a pass over the photos first, so that its processes know the
latencies to hedge at. The held latency is far above GCS's (tens of ms) so
that the emulator, which answers one request at a time, and this machine's cores are less of what sets the pace;
the reads out at once carry over to GCS as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.update(NO_GCE_CHECK="true", GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9")

from benchmarks.beam_before import reads_as_before  # noqa: E402
from benchmarks.common import machine, realistic_jpegs  # noqa: E402
from benchmarks.gcs_reads import MAX_BYTES, gpu_worker_fetch  # noqa: E402
from pipelines.embed_steps import READ_AHEAD  # noqa: E402
from pipelines.file_reader import CHUNKS_PER_PROCESS  # noqa: E402

# (element, chunks at once per process, elements under way past the one handed on, second requests for stragglers,
# each element's reads waited for on a thread as before)
PATHS = {"before": (64, 1, 0, False, False), "elements": (256, 1, 0, False, False),
         "chunks": (64, CHUNKS_PER_PROCESS, 0, False, False), "both": (256, CHUNKS_PER_PROCESS, 0, False, False),
         "ahead": (256, CHUNKS_PER_PROCESS, 1, False, False), "hedged": (256, CHUNKS_PER_PROCESS, 1, True, False),
         "two_ahead": (256, CHUNKS_PER_PROCESS, READ_AHEAD, False, False),
         "now": (256, CHUNKS_PER_PROCESS, READ_AHEAD, True, False),
         "threaded": (256, CHUNKS_PER_PROCESS, READ_AHEAD, True, True)}  # fmt: skip


def _drained(proxy, timeout_s: float = 10.0) -> None:
    """Wait until the proxy has no request out."""
    deadline = time.monotonic() + timeout_s
    while proxy.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=200)
    parser.add_argument("--spread", type=float, default=0.0, help="sigma of the holds' lognormal spread")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--paths", default=",".join(PATHS), help="which of " + ", ".join(PATHS) + "; the first is "
                        "the baseline")  # fmt: skip
    args = parser.parse_args()

    from tests.support.fault_proxy import FaultProxy, through
    from tests.support.gcs_emulator import start_emulator

    proc, port = start_emulator()
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    results: dict[str, dict] = {}
    try:
        from encoder import DecodeLimits, storage
        from pipelines.file_reader import ProcessReader, ReadLimits
        from pipelines.storage import configure_storage

        configure_storage()
        storage.gcs_client().create_bucket("photos")
        with tempfile.TemporaryDirectory() as work:
            photos = realistic_jpegs(Path(work), min(args.images, 64), width=160)
            uris = [f"gs://photos/{n}.jpg" for n in range(args.images)]  # the photos again and again
            for n, uri in enumerate(uris):
                storage.write_bytes(uri, photos[n % len(photos)].read_bytes())
        limits = ReadLimits.of(DecodeLimits(max_bytes=MAX_BYTES))
        upstream = urlparse(os.environ["STORAGE_EMULATOR_HOST"]).port
        held = {"slow_s": args.latency_ms / 1000, "slow_spread": args.spread}
        with FaultProxy(upstream, rate=1.0, kinds=("slow",), **held) as proxy, through(proxy):
            paths = {name: PATHS[name] for name in args.paths.split(",")}
            readers = {(at_once, hedge): ProcessReader(dataclasses.replace(limits, hedge=hedge), args.processes,
                                                       chunk=8, chunks_at_once=at_once)
                       for at_once, hedge in {(at_once, hedge) for _, at_once, _, hedge, _ in paths.values()}}  # fmt: skip
            try:
                for reader in readers.values():  # processes started, clients made, latencies to hedge at seen
                    gpu_worker_fetch(uris, reader, 256, 1)
                for _ in range(args.rounds):
                    for name, (element, at_once, ahead, hedge, threaded) in paths.items():
                        _drained(
                            proxy
                        )  # a second request the last path left out (held, not cancelled) is not this one's
                        proxy.most_in_flight, requests = 0, proxy.counts["requests"]
                        with reads_as_before() if threaded else contextlib.nullcontext():
                            got = gpu_worker_fetch(uris, readers[at_once, hedge], element, ahead)
                        got["most_reads_in_flight"] = proxy.most_in_flight
                        got["requests_per_image"] = (proxy.counts["requests"] - requests) / len(uris)
                        if name not in results or got["images_per_s"] > results[name]["images_per_s"]:
                            results[name] = got
            finally:
                for reader in readers.values():
                    reader.close()
    finally:
        proc.kill()
        proc.wait()
    baseline = next(iter(results))
    for got in results.values():
        got[f"x_{baseline}"] = got["images_per_s"] / results[baseline]["images_per_s"]
        got.pop("embedding_process_cpu_us_per_image")  # gcs_reads.py's measure; here the network's wait
    rounded = {name: {k: round(v, 2) for k, v in got.items()} for name, got in results.items()}
    print(json.dumps({"machine": machine(), "images": args.images, "processes": args.processes,
                      "latency_ms": args.latency_ms, "spread": args.spread, **rounded}))  # fmt: skip


if __name__ == "__main__":
    main()
