"""What reading catalog images from gs:// costs the reading process, per image, against a local GCS emulator:
lookalike's read (`pipelines.storage.read_image`: one ranged request over libcurl with the process's one client's
credentials) against the same request over urllib3 (the read before), through that client's own download
(requests; the read before that) and Beam's FileSystems reader, which the embed step used first (a client and its
pipeline options per object, a metadata request before the bytes), with google-cloud-storage's background bucket
lookups on (the library's default, the behaviour before) and off. Then the Beam GPU worker's fetch step over the
same photos: on its own 16 threads (before) against its reader processes (`pipelines.file_reader`), with the
embedding process's CPU per image, which the GPU threads share under one interpreter lock. Rounds alternate; each
path's best round is reported.

    python benchmarks/gcs_reads.py                  # 400 photos, 1 and 16 threads (the embed step's fetch_threads)

The emulator is a Python server on the same machine over plain HTTP that answers one request at a time and closes
every connection: reads/s are bounded by it and by the cores the two processes share, and connection reuse cannot
show. The client's CPU per read and its requests per read carry over to real GCS, where TLS adds to the first and
each request also costs a round trip. So libcurl and urllib3 also read the same photos from a stand-in that keeps
connections alive, over plain HTTP and over TLS (`tests.support.kept_alive_store`): the client's CPU per read as
GCS would see it, less the network.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.update(NO_GCE_CHECK="true", GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9")

from benchmarks.common import machine, photos_on_gcs  # noqa: E402

LOOKUPS = "DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA"
MAX_BYTES = 50 << 20  # the embed step's default --max-image-bytes


class RequestCounter:
    """Counts the HTTP requests every client in the process sends, background threads' included: urllib3's (under
    requests too) and libcurl's (`encoder.object_http`, lookalike's image reads)."""

    def __init__(self) -> None:
        from urllib3.connectionpool import HTTPConnectionPool

        from encoder.object_http import ObjectHttp

        self.count, self._lock = 0, threading.Lock()
        HTTPConnectionPool.urlopen = self._counted(HTTPConnectionPool.urlopen)
        ObjectHttp._get = self._counted(ObjectHttp._get)

    def _counted(self, send):
        def counted(*args, **kwargs):
            with self._lock:
                self.count += 1
            return send(*args, **kwargs)

        return counted


def beam_read(uri: str) -> bytes:
    from pipelines.storage import _filesystems

    with _filesystems().open(uri, compression_type="uncompressed") as f:
        return f.read()


def client_download_read(uri: str) -> bytes:
    """lookalike's read before it went over urllib3: the storage client's own ranged download (requests)."""
    from encoder.storage import _blob

    return _blob(uri).download_as_bytes(start=0, end=MAX_BYTES, checksum=None, raw_download=True, retry=None)


def urllib3_read(uri: str) -> bytes:
    """lookalike's read before it went over libcurl: the same ranged request over urllib3 (google-auth's
    `AuthorizedHttp` over a pool of 64 connections), the client's credentials."""
    from google.auth.transport.urllib3 import AuthorizedHttp
    from google.cloud.storage.blob import _get_host_name

    from encoder.storage import _object, gcs_client

    global _URLLIB3
    if _URLLIB3 is None:
        client = gcs_client()
        base = f"{_get_host_name(client._connection)}/download/storage/v1/b/"
        _URLLIB3 = (AuthorizedHttp(client._credentials, http=_urllib3_pool()), base)
    http, base = _URLLIB3
    bucket, name = _object(uri)
    return _urllib3_get(http, f"{base}{bucket}/o/{quote(name, safe='~')}?alt=media")


_URLLIB3 = None


def _urllib3_pool():
    """The pool the read before went over: 64 connections kept, no retries of its own, the environment's CA bundle."""
    import urllib3

    from encoder.object_http import ca_bundle

    return urllib3.PoolManager(maxsize=64, retries=False, timeout=urllib3.Timeout(connect=60, read=60),
                               ca_certs=ca_bundle())  # fmt: skip


def _urllib3_get(http, url: str) -> bytes:
    response = http.request("GET", url, decode_content=False,
                            headers={"Range": f"bytes=0-{MAX_BYTES}", "Accept-Encoding": "gzip"})  # fmt: skip
    assert response.status in (200, 206), response.status
    return response.data


def lookalike_read(uri: str) -> bytes:
    from pipelines.storage import read_image

    data = read_image(uri, MAX_BYTES)
    assert isinstance(data, bytes), data
    return data


def measure(read, uris: list[str], threads: int, counter: RequestCounter | None) -> dict:
    requests, cpu, start = counter.count if counter else 0, time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(lambda uri: len(read(uri)), uris))
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    assert all(sizes), "an empty read"
    got = {"reads_per_s": len(uris) / wall, "cpu_us_per_read": 1e6 * cpu / len(uris)}
    if counter:
        time.sleep(0.5)  # background lookups still on their way are counted with this read
        got["requests_per_read"] = (counter.count - requests) / len(uris)
    return got


def _kept_alive_clients(base: str) -> dict:
    """url → bytes, with the same token: urllib3 (the read before: a range, no checksum) and libcurl (the read now:
    the whole object, checked against its crc32c)."""
    from google.auth.transport.urllib3 import AuthorizedHttp
    from google.oauth2.credentials import Credentials

    from encoder.object_http import ObjectHttp

    token = Credentials(token="t0k3n")
    curl = ObjectHttp(base, token, refresh=None)
    return {"urllib3": functools.partial(_urllib3_get, AuthorizedHttp(token, http=_urllib3_pool())),
            "libcurl": lambda url: curl.get(url, {"Accept-Encoding": "gzip"}, MAX_BYTES).body}  # fmt: skip


def kept_alive(photos: list[Path], threads: list[int], rounds: int) -> dict:
    """Reads of `photos` from a stand-in that keeps connections alive (`tests.support.kept_alive_store`), as GCS does,
    over plain HTTP and over TLS: urllib3 (the read before) against libcurl (`encoder.object_http`, the read now),
    each path's best round by reads/s; CPU: this process's own, the stand-in's (a process of its own) not counted."""
    from tests.support.kept_alive_store import self_signed

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as work:
        cert, key_file = self_signed(Path(work))
        os.environ["REQUESTS_CA_BUNDLE"] = str(cert)  # both clients verify the stand-in's certificate
        for scheme in ("http", "https"):
            tls = ["--tls", str(cert), str(key_file)] if scheme == "https" else []
            store = subprocess.Popen([sys.executable, "-m", "tests.support.kept_alive_store", str(photos[0].parent),
                                      *tls], stdout=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
            try:
                port = int(store.stdout.readline().split()[-1])
                base = f"{scheme}://127.0.0.1:{port}/download/storage/v1/b/"
                urls = [f"{base}photos/o/{p.name}?alt=media" for p in photos]
                paths = _kept_alive_clients(base)
                for _ in range(rounds):
                    for count in threads:
                        for name, read in paths.items():
                            got = measure(read, urls, count, None)
                            label = f"{scheme}_{name}_threads_{count}"
                            if label not in results or got["reads_per_s"] > results[label]["reads_per_s"]:
                                results[label] = got
            finally:
                store.kill()
                store.wait()
        del os.environ["REQUESTS_CA_BUNDLE"]
    for label, got in results.items():
        if "_libcurl_" in label:
            before = results[label.replace("_libcurl_", "_urllib3_")]
            got["x_urllib3_cpu_per_read"] = got["cpu_us_per_read"] / before["cpu_us_per_read"]
            got["x_urllib3_reads_per_s"] = got["reads_per_s"] / before["reads_per_s"]
    return results


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
        from pipelines.storage import configure_storage

        configure_storage()
        with tempfile.TemporaryDirectory() as work:
            photos, uris, mean_kb = photos_on_gcs(Path(work), args.images)
            kept = kept_alive(photos, [int(t) for t in args.threads.split(",")], args.rounds)
        counter = RequestCounter()
        paths = {"beam_reader_lookups_on": (beam_read, "false"), "beam_reader_lookups_off": (beam_read, "true"),
                 "client_download": (client_download_read, "true"), "urllib3": (urllib3_read, "true"),
                 "lookalike": (lookalike_read, "true")}  # fmt: skip
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
    rounded = {k: {m: round(v, 2) for m, v in r.items()} for k, r in {**results, **kept}.items()}
    print(json.dumps({"machine": machine(), "images": args.images, "mean_kb": round(mean_kb, 1), **rounded}))


if __name__ == "__main__":
    main()
