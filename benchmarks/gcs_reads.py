"""What reading catalog images from gs:// costs the reading process, per image, against a local GCS emulator:
lookalike's read (`pipelines.storage.read_image`: one ranged request over urllib3 with the process's one client's
credentials) against the same request through that client's own download (requests; lookalike's read before) and
Beam's FileSystems reader, which the embed step used before that (a client and its pipeline options per object, a
metadata request before the bytes), with google-cloud-storage's background bucket lookups on (the library's
default, the behaviour before) and off. Then the Beam GPU worker's fetch step over the same photos: on its own 16
threads (before) against its reader processes (`pipelines.file_reader`), with the embedding process's CPU per
image, which the GPU threads share under one interpreter lock. Rounds alternate; each path's best round is reported.

    python benchmarks/gcs_reads.py                  # 400 photos, 1 and 16 threads (the embed step's fetch_threads)

The emulator is a Python server on the same machine over plain HTTP that answers one request at a time and closes
every connection: reads/s are bounded by it and by the cores the two processes share, and connection reuse cannot
show. The client's CPU per read and its requests per read carry over to real GCS, where TLS adds to the first and
each request also costs a round trip.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.update(NO_GCE_CHECK="true", GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9")

from benchmarks.common import machine, realistic_jpegs  # noqa: E402

LOOKUPS = "DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA"
MAX_BYTES = 50 << 20  # the embed step's default --max-image-bytes


class RequestCounter:
    """Counts the HTTP requests every client in the process sends, background threads' included."""

    def __init__(self) -> None:
        from urllib3.connectionpool import HTTPConnectionPool  # under requests too, and under lookalike's reads

        self.count, self._lock, urlopen = 0, threading.Lock(), HTTPConnectionPool.urlopen

        def counted(pool, method, url, *args, **kwargs):
            with self._lock:
                self.count += 1
            return urlopen(pool, method, url, *args, **kwargs)

        HTTPConnectionPool.urlopen = counted


def beam_read(uri: str) -> bytes:
    from pipelines.storage import _filesystems

    with _filesystems().open(uri, compression_type="uncompressed") as f:
        return f.read()


def client_download_read(uri: str) -> bytes:
    """lookalike's read before it went over urllib3: the storage client's own ranged download (requests)."""
    from encoder.storage import _blob

    return _blob(uri).download_as_bytes(start=0, end=MAX_BYTES, checksum=None, raw_download=True, retry=None)


def lookalike_read(uri: str) -> bytes:
    from pipelines.storage import read_image

    data = read_image(uri, MAX_BYTES)
    assert isinstance(data, bytes), data
    return data


def measure(read, uris: list[str], threads: int, counter: RequestCounter) -> dict:
    requests, cpu, start = counter.count, time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(lambda uri: len(read(uri)), uris))
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    time.sleep(0.5)  # background lookups still on their way are counted with this read
    assert all(sizes), "an empty read"
    return {"reads_per_s": len(uris) / wall, "cpu_us_per_read": 1e6 * cpu / len(uris),
            "requests_per_read": (counter.count - requests) / len(uris)}  # fmt: skip


def gpu_worker_fetch(uris: list[str], reader, element: int = 64, ahead: int = 0) -> dict:
    """The Beam GPU worker's fetch step (`prepare_items`, nothing decoded) over elements of `element` items, with
    `reader`'s processes or (None) the step's own 16 threads, one element at a time or (`ahead` > 0) that many
    under way past the one handed on (`PrepareAhead`); CPU: the embedding process's own, which the GPU threads
    share."""
    from encoder import DecodeLimits, PreprocessConfig
    from pipelines.catalog import CatalogItem
    from pipelines.embed_steps import PrepareAhead, prepare_items

    items = [CatalogItem(f"i{n}", uri) for n, uri in enumerate(uris)]
    cpu, start, got = time.process_time(), time.perf_counter(), 0
    limits = DecodeLimits(max_bytes=MAX_BYTES)
    with ThreadPoolExecutor(16) as pool:
        background = PrepareAhead(ahead) if ahead else None
        for first in range(0, len(items), element):
            args = (items[first : first + element], pool, PreprocessConfig(), limits)
            kwargs = {"defer_decode": True, "reader": reader}
            done = background.submit(*args, **kwargs) if background else [prepare_items(*args, **kwargs)]
            got += sum(len(prepared.decoded) for prepared in done)
        if background:
            got += sum(len(prepared.decoded) for prepared in background.drain())
            background.close()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert got == len(items), f"{len(items) - got} images not read"
    return {"images_per_s": len(items) / wall, "embedding_process_cpu_us_per_image": 1e6 * cpu / len(items)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--threads", default="1,16")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from tests.support.gcs_emulator import start_emulator

    proc, port = start_emulator()
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    try:
        from encoder import storage
        from pipelines.storage import configure_storage

        configure_storage()
        storage.gcs_client().create_bucket("photos")
        with tempfile.TemporaryDirectory() as work:
            photos = realistic_jpegs(Path(work), args.images)
            uris = [f"gs://photos/{p.name}" for p in photos]
            for path, uri in zip(photos, uris, strict=True):
                storage.write_bytes(uri, path.read_bytes())
            mean_kb = sum(p.stat().st_size for p in photos) / len(photos) / 1000
        counter = RequestCounter()
        paths = {"beam_reader_lookups_on": (beam_read, "false"), "beam_reader_lookups_off": (beam_read, "true"),
                 "client_download": (client_download_read, "true"), "lookalike": (lookalike_read, "true")}  # fmt: skip
        results: dict[str, dict] = {}
        for _ in range(args.rounds):
            for threads in (int(t) for t in args.threads.split(",")):
                for name, (read, lookups_off) in paths.items():
                    os.environ[LOOKUPS] = lookups_off  # read per request by the library
                    got = measure(read, uris, threads, counter)
                    key = f"{name}_threads_{threads}"
                    if key not in results or got["reads_per_s"] > results[key]["reads_per_s"]:
                        results[key] = got
        from encoder import DecodeLimits
        from pipelines.embed_dofns import reader_processes
        from pipelines.file_reader import ProcessReader, ReadLimits

        processes = reader_processes(os.cpu_count() or 1, 1)
        with ProcessReader(ReadLimits.of(DecodeLimits(max_bytes=MAX_BYTES)), processes, chunk=8) as reader:
            gpu_worker_fetch(uris[:64], reader)  # the reader processes start and import what they read with
            for _ in range(args.rounds):
                for name, with_reader in (("gpu_worker_fetch_threads", None), ("gpu_worker_fetch_reader_processes",
                                                                                reader)):  # fmt: skip
                    got = gpu_worker_fetch(uris, with_reader)
                    if name not in results or got["images_per_s"] > results[name]["images_per_s"]:
                        results[name] = got
        results["gpu_worker_fetch_reader_processes"]["processes"] = processes
    finally:
        proc.kill()
        proc.wait()
    for threads in (int(t) for t in args.threads.split(",")):
        base = results[f"beam_reader_lookups_on_threads_{threads}"]
        for name in paths:
            got = results[f"{name}_threads_{threads}"]
            got["x_beam_reader_reads_per_s"] = round(got["reads_per_s"] / base["reads_per_s"], 2)
            got["x_beam_reader_cpu_per_read"] = round(got["cpu_us_per_read"] / base["cpu_us_per_read"], 2)
    threads, processes = results["gpu_worker_fetch_threads"], results["gpu_worker_fetch_reader_processes"]
    processes["x_threads_embedding_process_cpu"] = round(
        processes["embedding_process_cpu_us_per_image"] / threads["embedding_process_cpu_us_per_image"], 3
    )
    rounded = {k: {m: round(v, 2) for m, v in r.items()} for k, r in results.items()}
    print(json.dumps({"machine": machine(), "images": args.images, "mean_kb": round(mean_kb, 1), **rounded}))


if __name__ == "__main__":
    main()
