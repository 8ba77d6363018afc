"""The GCS emulator for tests, with the object-generation preconditions real GCS enforces.

`gcp-storage-emulator` ignores `ifGenerationMatch` on uploads; real GCS answers 412
when the object's generation differs (0 means "must not exist"). lookalike's
LATEST pointer relies on exactly that, so the test emulator adds it.

    python -m tests.support.gcs_emulator --port 9023
    python -m tests.support.gcs_emulator --port 0     # a free port, printed once listening: "listening on PORT"

`start_emulator()` runs it in a process of its own on such a port (the tests' fixture, benchmarks/gcs_reads.py).
"""

from __future__ import annotations

import argparse
import http.server
import os
import select
import subprocess
import sys
import threading
import time
from http import HTTPStatus
from pathlib import Path

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_LOCK = threading.Lock()


def start_emulator() -> tuple[subprocess.Popen, int]:
    """The emulator in a process of its own, on a port it binds itself and reports once listening: a port picked here
    and bound there could be taken in between (another pytest worker's server), and another emulator would answer."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.gcs_emulator", "--port", "0"],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("listening on "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the GCS emulator did not start: {line.strip() or 'nothing in 30 s'}")
    return proc, int(line.split()[-1])


def _object_name(request) -> str | None:
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        return (data.get("meta") or {}).get("name") or data.get("name")
    return None


def insert_with_preconditions(request, response, storage, *args, **kwargs):
    expected = request.query.get("ifGenerationMatch")
    if expected is None:
        return objects.insert(request, response, storage, *args, **kwargs)
    with _LOCK:  # check and write as one step, like the real service
        try:
            current = int(storage.get_file_obj(request.params["bucket_name"], _object_name(request))["generation"])
        except NotFound:
            current = 0
        if current != int(expected[0]):
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json(
                {"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold."}}
            )
            return None
        return objects.insert(request, response, storage, *args, **kwargs)


def _patch_handlers() -> None:
    patched = []
    for regex, handlers in server.HANDLERS:
        if handlers.get(server.POST) is objects.insert:
            handlers = dict(handlers, **{server.POST: insert_with_preconditions})
        patched.append((regex, handlers))
    server.HANDLERS = tuple(patched)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    _patch_handlers()
    # The stock server answers one request at a time and closes each connection (HTTP/1.0), so every request
    # connects anew; with the default backlog of 5, a client's 16 threads connecting at once had SYNs dropped
    # and retried a second later (reads of ~20 ms taking 1 s). A deeper backlog queues them instead (1024: a
    # latency benchmark has ~500 reads out at once, and at 128 its bursts still lost connections for a second).
    http.server.HTTPServer.request_queue_size = 1024
    emulator = server.create_server(args.host, args.port, in_memory=True)
    emulator.start()  # bound once this returns: port 0 leaves no moment for another process to take the port
    print(f"listening on {emulator._api._httpd.server_address[1]}", flush=True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nobody reads the pipe after that line
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()


if __name__ == "__main__":
    main()
