"""Image reads over libcurl from threads that come and go: does the process survive?

    python benchmarks/read_threads.py [--seconds 40] [--rounds 3]

Each round is a process of its own, so a crash ends that round only: 4 threads start 6 short-lived readers at a
time, each reading 3 times from a local server that keeps connections alive, then ending, for `--seconds`; the
round reports how many reads it made, or how it died. Two ways of holding libcurl's handles, rounds alternated:

- `pooled` (the product's, `encoder.object_http`): a read takes an idle handle from the process's pool and gives
  it back; handles share TLS sessions and DNS answers, not connections.
- `shared-cache` (before): a handle per thread, all sharing one connection cache (CURLSHOPT_SHARE with
  CURL_LOCK_DATA_CONNECT), freed as its thread ends. libcurl does not support a connection cache shared by threads
  that read at once.

Results in RELIABILITY.md ("Crashes").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIGNALS = {-6: "SIGABRT", -11: "SIGSEGV", -7: "SIGBUS", -4: "SIGILL"}


class SharedCache:
    """The reads as they were before the pool: a handle per thread on one share of connections, TLS sessions and
    DNS answers."""

    def __init__(self) -> None:
        import pycurl

        self._local = threading.local()
        self._share = pycurl.CurlShare()
        for data in (pycurl.LOCK_DATA_CONNECT, pycurl.LOCK_DATA_SSL_SESSION, pycurl.LOCK_DATA_DNS):
            self._share.setopt(pycurl.SH_SHARE, data)

    def get(self, url: str) -> int:
        import pycurl

        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle = self._local.handle = pycurl.Curl()
            handle.setopt(pycurl.SHARE, self._share)
            handle.setopt(pycurl.MAXCONNECTS, 128)
            handle.setopt(pycurl.NOSIGNAL, 1)
        chunks: list[bytes] = []
        handle.setopt(pycurl.URL, url)
        handle.setopt(pycurl.WRITEFUNCTION, chunks.append)
        handle.perform()
        return handle.getinfo(pycurl.RESPONSE_CODE)


def one_round(way: str, seconds: float) -> None:
    """Runs in a process of its own; prints its reads as JSON."""
    from google.oauth2.credentials import Credentials

    from encoder.object_http import ObjectHttp
    from tests.support.http_stand_in import StandIn, send

    server = StandIn(lambda handler: send(handler, 200, b"x" * 3000))
    if way == "pooled":
        http = ObjectHttp(server.url, Credentials(token="t"), refresh=None)

        def get() -> int:
            return http.get(server.url, {}).status
    else:
        shared = SharedCache()

        def get() -> int:
            return shared.get(server.url)

    stop, reads, lock = time.monotonic() + seconds, [0], threading.Lock()

    def short_lived() -> None:
        for _ in range(3):
            if get() != 200:
                raise RuntimeError("a read failed")
            with lock:
                reads[0] += 1

    def spawner() -> None:
        while time.monotonic() < stop:
            threads = [threading.Thread(target=short_lived) for _ in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

    spawners = [threading.Thread(target=spawner) for _ in range(4)]
    for thread in spawners:
        thread.start()
    for thread in spawners:
        thread.join()
    server.close()
    print(json.dumps({"reads": reads[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round", choices=["pooled", "shared-cache"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.round:
        one_round(args.round, args.seconds)
        return
    from benchmarks.common import machine

    results: dict[str, list] = {"pooled": [], "shared-cache": []}
    for _ in range(args.rounds):
        for way in ("shared-cache", "pooled"):
            done = subprocess.run([sys.executable, __file__, "--round", way, "--seconds", str(args.seconds)],
                                  capture_output=True, text=True, timeout=args.seconds * 4 + 60)  # fmt: skip
            if done.returncode == 0:
                results[way].append(json.loads(done.stdout.splitlines()[-1])["reads"])
            else:
                results[way].append(SIGNALS.get(done.returncode, f"exit {done.returncode}"))
            print(way, results[way][-1], flush=True)
    summary = {way: {"rounds": len(got), "crashed": sum(isinstance(r, str) for r in got), "each": got}
               for way, got in results.items()}  # fmt: skip
    print(json.dumps({"machine": machine(), "seconds_per_round": args.seconds, **summary}))


if __name__ == "__main__":
    main()
