"""GET requests over libcurl: what image reads from gs://, and from http(s) URLs, go through (`storage.read_bytes`).

A reader process's image reads are CPU-bound in its HTTP client. Against a local server that keeps connections
alive, over HTTP and TLS, urllib3 spent 440-890 µs of the process's CPU per 71 KB read, most of it Python:
http.client's header parsing, the pool's bookkeeping, google-auth's wrapper; libcurl 220-480 µs, 0.35-0.57x, its
checksum included (`benchmarks/gcs_reads.py`, 2-core Xeon), and it sends the request and takes the response
without the interpreter lock. A read takes a handle from the process's idle ones (its thread's last, if idle), with the
connection it kept alive, and gives it back after: a handle, and so a connection, serves one thread at a time. libcurl does not
support sharing a connection cache between threads that read at once (CURLSHOPT_SHARE; a known bug, "pure
chance" where it did not crash), so the handles share only TLS sessions and DNS answers (a forked child makes
handles of its own).

A whole object's body is checked against the crc32c GCS sends with it (`x-goog-hash`; a ranged read gets none,
so image reads ask for the whole object and refuse one too large at its Content-Length). The token comes from
google-auth's credentials (refreshed before it expires, and once more when the store answers
401) through the caller's `refresh` transport; the proxy and the CA bundle are taken from the environment as
requests would take them (`proxy_for`, `ca_bundle`). Errors come back as the exceptions `storage.is_transient`
sorts: a connection refused, reset or stalled, a body cut short or not matching its crc32c, as ConnectionError or
TimeoutError (retried);
anything else libcurl refuses (a certificate it cannot verify, say) as OSError (not retried).
"""

from __future__ import annotations

import base64
import os
import threading
import urllib.request
from collections.abc import Callable
from typing import NamedTuple
from urllib.parse import urlsplit

__all__ = ["ChecksumMismatch", "ObjectHttp", "Response", "ca_bundle", "proxy_for"]

# libcurl's error codes for what retrying may mend: the proxy or host not resolved, a connection not made, an
# HTTP/2 framing or stream error, a body shorter than its Content-Length, nothing answered, a send or receive that
# failed, a TLS handshake that failed; and 28, a connection or transfer that stalled (TimeoutError).
_UNREACHABLE = {5: "proxy not resolved", 6: "host not resolved", 7: "no connection", 16: "HTTP/2 error",
                18: "body cut short", 35: "TLS handshake failed", 52: "nothing answered", 55: "send failed",
                56: "receive failed", 92: "HTTP/2 stream error"}  # fmt: skip
_TIMED_OUT = 28

# Idle connections a handle keeps (libcurl's default): one per host it reads from, and a handle reads from one.
KEPT_CONNECTIONS = 5
MAX_REDIRECTS = 5  # a web image's redirects followed (a CDN's to its edge, http to https)


class Response(NamedTuple):
    status: int
    body: bytes


def proxy_for(url: str) -> str | None:
    """The proxy a request to `url` takes (`https_proxy`, `http_proxy`, `no_proxy`), as requests reads them."""
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    return proxy if proxy and not urllib.request.proxy_bypass(parts.hostname or "") else None


def ca_bundle() -> str | None:
    """The CA bundle requests would verify against: `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`, else certifi's."""
    try:
        import certifi  # requests' bundle, which the client's own reads used

        bundle = certifi.where()
    except ImportError:  # pragma: no cover - requests depends on it
        bundle = None
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or bundle


class ObjectHttp:
    """GETs under `base` (a store's download URL prefix) with `credentials`' token; or, with no `base` and no
    `credentials`, of any http(s) URL (images on a web server or CDN), following up to `MAX_REDIRECTS` redirects, to
    http(s) only, each URL through its own proxy settings.

    `refresh`: the google-auth transport request the token is refreshed through (`google.auth.transport.requests`).
    `connect_s`: the most a connection may take; `stall_s`: the longest a response may send nothing (a read timeout).
    """

    def __init__(self, base: str, credentials, refresh, *, connect_s: float = 60.0, stall_s: float = 60.0) -> None:
        self.base, self._credentials, self._refresh = base, credentials, refresh
        self._proxy, self._ca = (proxy_for(base) if base else None), ca_bundle()
        self._connect_s, self._stall_s = connect_s, stall_s
        # Guarded by `_lock`: the process these handles belong to, its `_share`, and its handles not in use (each
        # with its kept-alive connection), by id, in the order given back.
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._share = None
        self._idle: dict[int, object] = {}
        self._last = threading.local()  # the handle this thread read with last (a reference only: the pool owns it)

    def get(self, url: str, headers: dict[str, str], max_bytes: int | None = None,
            sink: Callable[[bytes], object] | None = None) -> Response:  # fmt: skip
        """The response to a GET of `url` with `headers` and the token. `max_bytes`: a successful response whose
        Content-Length says more is refused before its body, and a body that grows past it as it arrives (no
        Content-Length) is stopped. A whole object's body (200) is checked against the crc32c its store sends
        (`x-goog-hash`, as GCS and its emulator send for a read without a range). `sink`: a ranged read's body
        (206) goes to it as it arrives, not into the response, and its 0 stops the read (OSError); a read answered
        whole (200: a server that ignored the range) is stopped at its first bytes (OSError); an error's text still
        comes back in the response.

        Raises:
            ConnectionError, TimeoutError: retrying may succeed (`ChecksumMismatch` among them).
            ValueError: the object is larger than `max_bytes`.
            OSError: libcurl refused the request otherwise.
        """
        response = self._get(url, headers, max_bytes, sink)
        if response.status == 401 and self._credentials is not None:  # a token revoked or expired early: a fresh one
            self._credentials.refresh(self._refresh)
            response = self._get(url, headers, max_bytes, sink)
        return response

    def _get(self, url: str, headers: dict[str, str], max_bytes: int | None, sink) -> Response:
        import pycurl

        headers = dict(headers)
        if self._credentials is not None:
            self._credentials.before_request(self._refresh, "GET", url, headers)  # adds the token, refreshed if due
        pid, handle = self._take()
        body = _Body(max_bytes, sink)
        try:
            handle.setopt(pycurl.URL, url)
            if not self.base:
                handle.setopt(pycurl.PROXY, proxy_for(url) or "")
            handle.setopt(pycurl.HTTPHEADER, [f"{name}: {value}" for name, value in headers.items()])
            handle.setopt(pycurl.HEADERFUNCTION, body.header)
            handle.setopt(pycurl.WRITEFUNCTION, body.write)
            try:
                handle.perform()
            except pycurl.error as err:
                if body.too_large:
                    raise ValueError(f"object is larger than max_bytes={max_bytes}") from None
                if body.unranged:
                    raise OSError(f"GET {urlsplit(url).netloc}: a ranged read answered whole (HTTP 200)") from None
                raise _mapped(err, url) from None
            status = handle.getinfo(pycurl.RESPONSE_CODE)
        finally:
            self._give_back(pid, handle)
        data = b"".join(body.chunks)
        body.chunks.clear()  # the handle's callbacks keep `body` until its next read: not the image's bytes too
        if status == 200 and body.crc32c is not None:
            _check(data, body.crc32c, url)
        return Response(status, data)

    def _take(self):
        """A handle not in use, and the process it belongs to: the one this thread read with last if it is idle (its
        connection stays with one thread, as a server sees it), else the last given back (its connection the likeliest
        still open), else a new one. A forked child never uses its parent's handles or share."""
        pid, mine = os.getpid(), getattr(self._last, "handle", None)
        with self._lock:
            if self._pid != pid:
                _INHERITED.extend(self._idle.values() if self._share is None else [*self._idle.values(), self._share])
                self._pid, self._share, self._idle = pid, _share(), {}
            handle = self._idle.pop(id(mine), None) if mine is not None else None
            if handle is None and self._idle:
                handle = self._idle.popitem()[1]
            share = self._share
        if handle is None:
            handle = self._new_handle(share)
        self._last.handle = handle
        return pid, handle

    def _give_back(self, pid: int, handle) -> None:
        with self._lock:
            if self._pid == pid:  # not a parent's handle in a child that forked while it was out
                self._idle[id(handle)] = handle

    def _new_handle(self, share):
        import pycurl

        handle = pycurl.Curl()
        handle.setopt(pycurl.SHARE, share)
        handle.setopt(pycurl.MAXCONNECTS, KEPT_CONNECTIONS)
        handle.setopt(pycurl.NOSIGNAL, 1)  # threads: timeouts without SIGALRM
        handle.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        handle.setopt(pycurl.CONNECTTIMEOUT_MS, int(self._connect_s * 1000))
        handle.setopt(pycurl.LOW_SPEED_LIMIT, 1)  # under a byte a second for `stall_s`: timed out
        handle.setopt(pycurl.LOW_SPEED_TIME, max(1, round(self._stall_s)))
        handle.setopt(pycurl.PROXY, self._proxy or "")  # "": none, whatever libcurl's own reading of the env
        handle.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)  # never file://, ftp://, ...
        if not self.base:
            handle.setopt(pycurl.FOLLOWLOCATION, 1)
            handle.setopt(pycurl.MAXREDIRS, MAX_REDIRECTS)
            handle.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        if self._ca:
            handle.setopt(pycurl.CAINFO, self._ca)
        return handle


# A forked child's inherited handles and shares, never freed there: freeing one closes its connections, and closing
# a TLS connection sends the server a close_notify over a socket the parent still reads responses from.
_INHERITED: list = []


def _share():
    """What the process's handles share: TLS sessions (a new handle's first connection resumes one instead of a full
    handshake) and DNS answers, under pycurl's locks. Not connections: libcurl does not support a connection cache
    shared by threads that read at once; a handle keeps its own, and handles go from thread to thread instead."""
    import pycurl

    share = pycurl.CurlShare()
    for data in (pycurl.LOCK_DATA_SSL_SESSION, pycurl.LOCK_DATA_DNS):
        share.setopt(pycurl.SH_SHARE, data)
    return share


class ChecksumMismatch(ConnectionError):
    """A body whose crc32c is not the object's: cut or damaged on its way (retried as a dropped connection is)."""


def _check(data: bytes, expected: int, url: str) -> None:
    import google_crc32c  # the storage client's own checksum library: C, ~8 GB/s here (4-10 µs per photo)

    got = google_crc32c.value(data)
    if got != expected:
        raise ChecksumMismatch(f"GET {urlsplit(url).netloc}: crc32c of the {len(data)} bytes read is {got:08x}, the "
                               f"object's is {expected:08x}")  # fmt: skip


class _Body:
    """A response as it arrives: its status, the object's crc32c (`x-goog-hash`), its body. A successful response
    whose Content-Length is past `max_bytes` is stopped at its headers; a body past `max_bytes` + 1 (at least 64
    KiB, room for an error's text) as it arrives (a callback's 0: libcurl's write error)."""

    def __init__(self, max_bytes: int | None, sink: Callable[[bytes], object] | None = None) -> None:
        self.max_bytes, self.sink = max_bytes, sink
        self.chunks: list[bytes] = []
        self.room = None if max_bytes is None else max(max_bytes + 1, 1 << 16)
        self.status, self.length, self.crc32c = 0, None, None
        self.too_large = self.unranged = False

    def header(self, line: bytes) -> int | None:
        if line.startswith(b"HTTP/"):  # a new response (after a 100 Continue, say): its own headers
            parts = line.split(None, 2)
            self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            self.length = self.crc32c = None
            return None
        name, colon, value = line.partition(b":")
        if colon:
            name = name.strip().lower()
            if name == b"content-length" and value.strip().isdigit():
                self.length = int(value)
            elif name == b"x-goog-hash":  # "crc32c=<base64>, md5=<base64>", in one header or two
                for item in value.split(b","):
                    kind, _, digest = item.strip().partition(b"=")
                    if kind == b"crc32c":
                        try:
                            self.crc32c = int.from_bytes(base64.b64decode(digest, validate=True), "big")
                        except ValueError:  # not base64 (binascii.Error): no checksum to hold the body to
                            self.crc32c = None
        elif line.strip() == b"" and 200 <= self.status < 300 and self.length is not None:  # the headers' end
            if self.max_bytes is not None and self.length > self.max_bytes and not self._to_sink():
                self.too_large = True
                return 0
        return None

    def _to_sink(self) -> bool:
        """Whether the body goes to the sink: a ranged read's (206), however large; `max_bytes` bounds the rest."""
        return self.sink is not None and self.status == 206

    def write(self, chunk: bytes) -> int | None:
        if self._to_sink():
            return self.sink(chunk)  # 0: stop the read (libcurl's write error)
        if self.sink is not None and 200 <= self.status < 300:
            self.unranged = True
            return 0
        if self.room is not None:
            self.room -= len(chunk)
            if self.room < 0:
                self.too_large = True
                return 0
        self.chunks.append(chunk)
        return None


def _mapped(err, url: str) -> Exception:
    """A libcurl error as the exception `storage.is_transient` sorts (see the module's docstring)."""
    code, message = err.args[0], err.args[1] if len(err.args) > 1 else ""
    where = f"GET {urlsplit(url).netloc}"
    if code == _TIMED_OUT:
        return TimeoutError(f"{where}: timed out (curl {code}: {message})")
    if code in _UNREACHABLE:
        return ConnectionError(f"{where}: {_UNREACHABLE[code]} (curl {code}: {message})")
    return OSError(f"{where}: curl {code}: {message}")
