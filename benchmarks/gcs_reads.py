"""What reading catalog images from gs:// costs the reading process, per image, against a local GCS emulator:
lookalike's read (`pipelines.storage.read_image`: the process's one client, one ranged request) against Beam's
FileSystems reader, which the embed step used before (a client, its pipeline options and a new connection per
object, a metadata request before the bytes), with google-cloud-storage's background bucket lookups on (the library's default, the
behaviour before) and off. Rounds alternate; each path's best round is reported.

    python benchmarks/gcs_reads.py                  # 400 photos, 1 and 16 threads (the embed step's fetch_threads)

The emulator is a Python server on the same machine over plain HTTP: reads/s are bounded by it and by the cores the
two processes share; the client's CPU per read and its requests per read carry over to real GCS, where TLS adds to
the first and each request also costs a round trip.
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


class Counter:
    """Counts the HTTP requests every client in the process sends (background threads' included) and the
    connections it opens (on GCS each one a TLS handshake)."""

    def __init__(self) -> None:
        import requests
        from urllib3.connectionpool import HTTPConnectionPool

        self.requests = self.connections = 0
        self._lock = threading.Lock()
        send, new_conn = requests.Session.send, HTTPConnectionPool._new_conn

        def counted_send(session, request, **kwargs):
            with self._lock:
                self.requests += 1
            return send(session, request, **kwargs)

        def counted_new_conn(pool):
            with self._lock:
                self.connections += 1
            return new_conn(pool)

        requests.Session.send, HTTPConnectionPool._new_conn = counted_send, counted_new_conn


def beam_read(uri: str) -> bytes:
    from pipelines.storage import _filesystems

    with _filesystems().open(uri, compression_type="uncompressed") as f:
        return f.read()


def lookalike_read(uri: str) -> bytes:
    from pipelines.storage import read_image

    data = read_image(uri, MAX_BYTES)
    assert isinstance(data, bytes), data
    return data


def measure(read, uris: list[str], threads: int, counter: Counter) -> dict:
    requests, connections = counter.requests, counter.connections
    cpu, start = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(lambda uri: len(read(uri)), uris))
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    time.sleep(0.5)  # background lookups still on their way are counted with this read
    assert all(sizes), "an empty read"
    return {"reads_per_s": len(uris) / wall, "cpu_us_per_read": 1e6 * cpu / len(uris),
            "requests_per_read": (counter.requests - requests) / len(uris),
            "connections_per_read": (counter.connections - connections) / len(uris)}  # fmt: skip


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
        counter = Counter()
        connections = storage.CONNECTIONS
        paths = {"beam_reader_lookups_on": (beam_read, "false", connections),
                 "beam_reader_lookups_off": (beam_read, "true", connections),
                 "lookalike_10_connections": (lookalike_read, "true", 10),  # requests' default pool
                 "lookalike": (lookalike_read, "true", connections)}  # fmt: skip
        results: dict[str, dict] = {}
        for _ in range(args.rounds):
            for threads in (int(t) for t in args.threads.split(",")):
                for name, (read, lookups_off, kept) in paths.items():
                    os.environ[LOOKUPS] = lookups_off  # read per request by the library
                    if storage.CONNECTIONS != kept:
                        storage.CONNECTIONS, storage._CLIENT = kept, None  # a client with that pool
                    got = measure(read, uris, threads, counter)
                    key = f"{name}_threads_{threads}"
                    if key not in results or got["reads_per_s"] > results[key]["reads_per_s"]:
                        results[key] = got
    finally:
        proc.kill()
        proc.wait()
    for threads in (int(t) for t in args.threads.split(",")):
        base = results[f"beam_reader_lookups_on_threads_{threads}"]
        for name in paths:
            got = results[f"{name}_threads_{threads}"]
            got["x_beam_reader_reads_per_s"] = round(got["reads_per_s"] / base["reads_per_s"], 2)
            got["x_beam_reader_cpu_per_read"] = round(got["cpu_us_per_read"] / base["cpu_us_per_read"], 2)
    rounded = {k: {m: round(v, 2) for m, v in r.items()} for k, r in results.items()}
    print(json.dumps({"machine": machine(), "images": args.images, "mean_kb": round(mean_kb, 1), **rounded}))


if __name__ == "__main__":
    main()
