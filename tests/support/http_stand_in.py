"""A local HTTP/1.1 server for tests of HTTP clients: each GET answered by a function of the test's, every request
recorded as (path, headers, client port), the port telling one kept-alive connection from another; over TLS with a
server context (`kept_alive_store.server_context`). `Server`: the threaded HTTP server every stand-in here runs.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Server(ThreadingHTTPServer):
    """A threaded HTTP server whose close also closes the connections it accepted. `ThreadingHTTPServer`'s leaves
    them to their handler threads, which go on answering a client's kept-alive connection with the closed server's
    answers; a later server given the same port then seemed to answer with them (a test's reads dead-lettered by
    another test's server, now and then, in a long-lived test process)."""

    daemon_threads = True
    request_queue_size = 1024  # the default backlog of 5 drops connections a burst of reads opens at once

    def __init__(self, address, handler) -> None:
        super().__init__(address, handler)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request, client_address) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # a client gone mid-request (a reset, as fault tests
            return  # make): nothing for the test to hear; socketserver printed each one's traceback
        super().handle_error(request, client_address)

    def server_close(self) -> None:
        super().server_close()
        with self._open_lock:
            still_open, self._open = self._open, set()
        for connection in still_open:
            try:
                connection.shutdown(socket.SHUT_RDWR)  # the handler thread's next read ends; it closes the socket
            except OSError:
                pass


class StandIn:
    """`answer(handler)` answers each GET; `url` is the server's root, without a trailing slash. `port`: 0 for a
    free one."""

    def __init__(self, answer: Callable[[BaseHTTPRequestHandler], None], context: ssl.SSLContext | None = None,
                 port: int = 0) -> None:  # fmt: skip
        self.seen: list[tuple[str, dict[str, str], int]] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, self.client_address[1]))
                answer(self)

        server = self
        self._server = Server(("127.0.0.1", port), Handler)
        if context is not None:
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"{'https' if context else 'http'}://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes, length: int | None = None,
         headers: dict[str, str] | None = None) -> None:  # fmt: skip
    """An answer: `status`, `headers`, a Content-Length (`length`, else the body's), the body."""
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    handler.wfile.write(body)
