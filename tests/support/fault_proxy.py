"""An HTTP proxy that injects storage faults between lookalike and the GCS emulator.

Each request draws its fate from a seeded random generator: pass through, or one of
    429 / 500 / 503   answered by the proxy, the request never reaches storage
    403 / 404         the same, permanent: only when asked for (`kinds`)
    reset             the connection is cut (TCP RST) before any answer
    slow              forwarded after a delay (`slow_s`, or drawn around it with `slow_spread`)
    truncated         (GET only) forwarded, then the body is cut short with the full Content-Length
    lost-reply        (writes only) forwarded, so the write lands, then the connection is cut unanswered
    damaged           (GET only, when asked for) forwarded with one byte of the body changed, its length and
                      headers as they were: what a checksum catches and nothing else does
so a test can point STORAGE_EMULATOR_HOST at the proxy and check that nothing is lost, or, at rate 0,
count what a step fetches (`bytes_served`) and how many requests it has out at once (`most_in_flight`).

    with FaultProxy(upstream_port, rate=0.1) as proxy, through(proxy):
        ...
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler

from tests.support.http_stand_in import Server

# The default is the first seven; 403 and 404 (permanent) and damaged only when asked for.
KINDS = ("429", "500", "503", "reset", "slow", "truncated", "lost-reply", "403", "404", "damaged")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


class FaultProxy:
    """Forward HTTP to 127.0.0.1:`upstream_port`, failing about `rate` of the requests."""

    def __init__(self, upstream_port: int, *, rate: float = 0.1, kinds: tuple[str, ...] = KINDS[:7], seed: int = 0,
                 slow_s: float = 0.3, slow_spread: float = 0.0) -> None:  # fmt: skip
        unknown = set(kinds) - set(KINDS)
        if unknown or not 0 <= rate <= 1:
            raise ValueError(f"bad fault settings: rate={rate}, unknown kinds {sorted(unknown)}")
        self.upstream_port, self.rate, self.kinds, self.slow_s = upstream_port, rate, kinds, slow_s
        self.slow_spread = slow_spread  # sigma of a lognormal around slow_s: each slow request held its own time
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.seen: list[tuple[str, str]] = []  # (method, path) of every request, in arrival order
        self.bytes_served = 0  # response bodies sent back, in bytes
        self.in_flight = self.most_in_flight = 0  # requests being answered now; the most at once so far
        self._server = _QuietServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def upstream_host(self) -> str:
        return f"127.0.0.1:{self.upstream_port}"

    def fate(self, method: str, path: str = "") -> str:
        with self._lock:
            self.counts["requests"] += 1
            self.seen.append((method, path))
            if self._random.random() >= self.rate:
                return "pass"
            writes = method in ("POST", "PUT", "PATCH", "DELETE")
            choices = [k for k in self.kinds if (k not in ("truncated", "damaged") or method == "GET")
                       and (k != "lost-reply" or writes)]  # fmt: skip
            choices = choices or ["pass"]
            kind = self._random.choice(choices)
            self.counts[kind] += 1
            return kind

    def hold_s(self) -> float:
        """How long to hold a slow request: `slow_s`, or drawn around it (its median) with `slow_spread`."""
        if not self.slow_spread:
            return self.slow_s
        with self._lock:
            return self.slow_s * self._random.lognormvariate(0.0, self.slow_spread)

    @property
    def injected(self) -> int:
        """Faults injected so far."""
        return sum(n for kind, n in self.counts.items() if kind in KINDS)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def through(proxy: FaultProxy) -> Iterator[FaultProxy]:
    """Send every storage request of this process (and its Beam workers) through `proxy`."""
    direct = os.environ["STORAGE_EMULATOR_HOST"]
    os.environ["STORAGE_EMULATOR_HOST"] = proxy.url
    try:
        yield proxy
    finally:
        os.environ["STORAGE_EMULATOR_HOST"] = direct


class _QuietServer(Server):
    def handle_error(self, request, client_address) -> None:  # clients drop connections: that is the point
        pass


def _handler(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reset(self) -> None:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.connection.close()

        def _error(self, status: int) -> None:
            body = json.dumps({"error": {"code": status, "message": f"injected {status}"}}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle stalls

        def _handle(self) -> None:
            with proxy._lock:
                proxy.in_flight += 1
                proxy.most_in_flight = max(proxy.most_in_flight, proxy.in_flight)
            try:
                self._answer()
            finally:
                with proxy._lock:
                    proxy.in_flight -= 1

        def _answer(self) -> None:
            body = self._body()
            fate = proxy.fate(self.command, self.path)
            if fate in ("429", "500", "503", "403", "404"):
                self._error(int(fate))
                return
            if fate == "reset":
                self._reset()
                return
            if fate == "slow":
                time.sleep(proxy.hold_s())
            upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
            try:
                upstream.connect()
                upstream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body if body or self.command != "GET" else None,
                                 headers=headers)  # fmt: skip
                answer = upstream.getresponse()
                payload = answer.read()
                status, answer_headers = answer.status, answer.getheaders()
            finally:
                upstream.close()
            if fate == "lost-reply":
                self._reset()
                return
            # Download links in object metadata name the host that uploaded the object: point them here, so
            # objects uploaded around the proxy are read through it too (Beam's reader follows those links).
            if "json" in dict((k.lower(), v) for k, v in answer_headers).get("content-type", ""):
                payload = payload.replace(proxy.upstream_host.encode(), proxy.host.encode())
            self.send_response(status)
            for key, value in answer_headers:
                if key.lower() not in _HOP_BY_HOP:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if fate == "truncated" and len(payload) > 1 and self.command != "HEAD":
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self._reset()
                return
            if fate == "damaged" and payload:
                middle = len(payload) // 2
                payload = payload[:middle] + bytes([payload[middle] ^ 0x01]) + payload[middle + 1 :]
            if self.command != "HEAD":
                with proxy._lock:  # counted before the client can have it: a test reads the count once its call returns
                    proxy.bytes_served += len(payload)
                self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

    return Handler
