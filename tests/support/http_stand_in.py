"""A local HTTP/1.1 server for tests of HTTP clients: each GET answered by a function of the test's, every request
recorded as (path, headers, client port), the port telling one kept-alive connection from another; over TLS with a
server context (`kept_alive_store.server_context`)."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StandIn:
    """`answer(handler)` answers each GET; `url` is the server's root, without a trailing slash."""

    def __init__(self, answer: Callable[[BaseHTTPRequestHandler], None], context: ssl.SSLContext | None = None) -> None:
        self.seen: list[tuple[str, dict[str, str], int]] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, self.client_address[1]))
                answer(self)

        server = self
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
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
