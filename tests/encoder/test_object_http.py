"""Image reads over libcurl (`encoder.object_http`): kept-alive connections, the token, errors sorted for retries."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from google.oauth2.credentials import Credentials

from encoder import object_http, storage
from encoder.object_http import ObjectHttp
from tests.support.http_stand_in import StandIn, send
from tests.support.kept_alive_store import self_signed, server_context


@pytest.fixture
def serve():
    servers: list[StandIn] = []

    def start(answer, context: ssl.SSLContext | None = None, port: int = 0) -> StandIn:
        servers.append(StandIn(answer, context, port))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


class _Token:
    """Credentials whose refresh hands out the next token: t1, t2, ..."""

    def __init__(self) -> None:
        self.refreshes = 0
        self.credentials = Credentials(token="t0")
        self.credentials.refresh = self._refresh

    def _refresh(self, request) -> None:
        self.refreshes += 1
        self.credentials.token = f"t{self.refreshes}"


def _http(url: str, token: _Token | None = None, **timeouts) -> ObjectHttp:
    return ObjectHttp(url, (token or _Token()).credentials, refresh=None, **timeouts)


def _ports(server: StandIn) -> set[int]:
    return {port for *_, port in server.seen}


def test_connections_are_kept_from_one_read_to_the_next_and_shared_by_threads(serve):
    server = serve(lambda h: send(h, 206, b"jpeg" * 1000))
    http = _http(server.url)
    for _ in range(20):
        assert http.get(server.url + "/o?alt=media", {"Range": "bytes=0-100000"}) == (206, b"jpeg" * 1000)
    assert len(_ports(server)) == 1
    with ThreadPoolExecutor(16) as pool:  # at most a connection per thread reading at once
        list(pool.map(lambda _: http.get(server.url + "/o", {}), range(160)))
    kept = _ports(server)
    assert 2 <= len(kept) <= 17
    with ThreadPoolExecutor(16) as pool:  # threads new to reading take the connections left idle
        list(pool.map(lambda _: http.get(server.url + "/o", {}), range(160)))
    assert _ports(server) == kept
    path, headers, _ = server.seen[0]
    assert path == "/o?alt=media" and headers["range"] == "bytes=0-100000" and headers["authorization"] == "Bearer t0"


def test_a_handle_serves_one_read_at_a_time_and_connections_are_never_shared_between_threads(serve, monkeypatch):
    """libcurl does not support a connection cache shared by threads reading at once (CURLSHOPT_SHARE's
    CURL_LOCK_DATA_CONNECT: use-after-free and double-free crashes, its maintainers say). Handles go from thread to
    thread instead, each in one read at a time; the share holds TLS sessions and DNS answers only."""
    import pycurl

    shared, made = [], []

    class Share(pycurl.CurlShare):
        def setopt(self, option, value):
            shared.append((option, value))
            return super().setopt(option, value)

    monkeypatch.setattr(pycurl, "CurlShare", Share)
    http = _http("http://127.0.0.1")
    original = http._new_handle
    monkeypatch.setattr(http, "_new_handle", lambda share: made.append(original(share)) or made[-1])
    in_use, most, guard = set(), [0], threading.Lock()
    take, give_back = http._take, http._give_back

    def taken():
        pid, handle = take()
        with guard:
            assert id(handle) not in in_use, "a handle given to two reads at once"
            in_use.add(id(handle))
            most[0] = max(most[0], len(in_use))
        return pid, handle

    def given_back(pid, handle):
        with guard:
            in_use.discard(id(handle))
        give_back(pid, handle)

    monkeypatch.setattr(http, "_take", taken)
    monkeypatch.setattr(http, "_give_back", given_back)
    server = serve(lambda h: (time.sleep(0.002), send(h, 200, b"x" * 2000)))
    with ThreadPoolExecutor(8) as pool:
        assert all(r == (200, b"x" * 2000) for r in pool.map(lambda _: http.get(server.url, {}), range(200)))
    assert len(made) == most[0] <= 8 and len(http._idle) == len(made)  # a handle per read at once, all back
    assert [value for option, value in shared if option == pycurl.SH_SHARE] == [pycurl.LOCK_DATA_SSL_SESSION,
                                                                               pycurl.LOCK_DATA_DNS]  # fmt: skip


def test_a_forked_child_opens_connections_of_its_own(serve, monkeypatch):
    server = serve(lambda h: send(h, 200, b"x"))
    http = _http(server.url)
    http.get(server.url, {})
    parent = object_http.os.getpid()
    monkeypatch.setattr(object_http.os, "getpid", lambda: parent + 1)  # as a forked child sees it
    http.get(server.url, {})
    assert len(_ports(server)) == 2


def test_a_forked_child_leaves_its_parents_tls_connection_as_it_was(serve, tmp_path, monkeypatch):
    """The child reads on connections of its own and never closes those it inherited: closing one would send the
    server a TLS close_notify on the parent's connection."""
    import gc
    import os

    ca, key = self_signed(tmp_path)
    server = serve(lambda h: send(h, 200, b"x" * 5000), server_context(ca, key))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    http = _http(server.url)
    assert http.get(server.url, {}).status == 200
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's outcome is its exit status
        ok = http.get(server.url, {}) == (200, b"x" * 5000)
        http._idle.clear()  # its handle and share dropped, as a later run's would be
        http._share = None
        gc.collect()
        os._exit(0 if ok else 1)
    assert os.waitpid(child, 0)[1] == 0
    time.sleep(0.2)  # a close_notify, had the child sent one, reaches the server first
    assert http.get(server.url, {}) == (200, b"x" * 5000)
    parent_ports = [server.seen[0][2], server.seen[2][2]]
    assert parent_ports[0] == parent_ports[1] and server.seen[1][2] != parent_ports[0]


def test_a_401_gets_a_fresh_token_once(serve):
    server = serve(lambda h: send(h, 401 if h.headers["Authorization"] == "Bearer t0" else 200, b"ok"))
    token = _Token()
    assert _http(server.url, token).get(server.url, {}) == (200, b"ok")
    assert token.refreshes == 1 and [h["authorization"] for _, h, _ in server.seen] == ["Bearer t0", "Bearer t1"]
    server = serve(lambda h: send(h, 401, b"revoked"))
    assert _http(server.url).get(server.url, {}).status == 401 and len(server.seen) == 2  # once, not forever


def test_an_object_past_the_cap_is_refused_at_its_headers_or_as_it_arrives(serve):
    """Content-Length past the cap: refused before the body comes (here it would take 3 s); no Content-Length (a
    chunked body): stopped once past the cap, not held whole."""

    def announced(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(4 << 20))
        handler.end_headers()
        handler.wfile.flush()
        time.sleep(3)

    server = serve(announced)
    started = time.monotonic()
    with pytest.raises(ValueError, match="larger than max_bytes=1000"):
        _http(server.url).get(server.url, {}, max_bytes=1000)
    assert time.monotonic() - started < 2

    def chunked(handler):
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for _ in range(64):
            handler.wfile.write(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
        handler.wfile.write(b"0\r\n\r\n")

    server = serve(chunked)
    with pytest.raises(ValueError, match="larger than max_bytes=1000"):
        _http(server.url).get(server.url, {}, max_bytes=1000)
    assert _http(server.url).get(server.url, {}).body == b"x" * (64 << 16)  # no cap: all of it
    server = serve(lambda h: send(h, 416, b"requested range not satisfiable"))
    assert _http(server.url).get(server.url, {}, max_bytes=0).status == 416  # an error's text is not an object


def test_what_retrying_may_mend_is_transient_and_what_it_cannot_is_not(serve, tmp_path, monkeypatch):
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{closed.getsockname()[1]}/"
    with pytest.raises(ConnectionError, match="no connection") as err:
        _http(refused).get(refused, {})
    assert storage.is_transient(err.value)

    def cut(handler):
        send(handler, 200, b"x" * 10, length=1000)
        handler.close_connection = True

    server = serve(cut)
    with pytest.raises(ConnectionError, match="cut short") as err:
        _http(server.url).get(server.url, {})
    assert storage.is_transient(err.value)

    server = serve(lambda h: time.sleep(3))  # answers nothing
    started = time.monotonic()
    with pytest.raises(TimeoutError) as err:
        _http(server.url, stall_s=1).get(server.url, {})
    assert storage.is_transient(err.value) and time.monotonic() - started < 2.9

    ca, key = self_signed(tmp_path)
    server = serve(lambda h: send(h, 200, b"secret"), server_context(ca, key))
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    with pytest.raises(OSError, match="curl 60") as err:  # a certificate nothing vouches for
        _http(server.url).get(server.url, {})
    assert not storage.is_transient(err.value)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))  # the environment's bundle, as requests reads it
    assert _http(server.url).get(server.url, {}) == (200, b"secret")


def test_reads_take_the_proxy_the_environment_names(serve, monkeypatch):
    """Through the proxy (the stand-in server sees the whole URL, as a proxy does); `no_proxy` goes around it."""
    proxy = serve(lambda h: send(h, 200, b"via proxy"))
    monkeypatch.setenv("http_proxy", proxy.url)
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    url = "http://storage.example.com/download/storage/v1/b/"
    assert _http(url).get(url + "b/o/x.jpg", {}) == (200, b"via proxy")
    assert proxy.seen[0][0] == url + "b/o/x.jpg"
    assert object_http.proxy_for(url) == proxy.url
    monkeypatch.setenv("no_proxy", "example.com")
    assert object_http.proxy_for(url) is None
    monkeypatch.setenv("https_proxy", "http://proxy.internal:3128")
    assert object_http.proxy_for("https://storage.googleapis.com/") == "http://proxy.internal:3128"


def test_a_closed_stand_in_takes_its_kept_alive_connections_with_it(serve):
    """The process's web reader kept its connection to a closed stand-in, whose handler thread went on answering
    it; a later stand-in on the same port then seemed to answer with the closed one's bytes (a test's images
    dead-lettered by another test's server, now and then, in a long-lived test process)."""
    first = serve(lambda h: send(h, 200, b"first"))
    assert storage.read_bytes(first.url + "/x.jpg") == b"first"
    first.close()
    second = serve(lambda h: send(h, 200, b"second"), port=int(first.url.rsplit(":", 1)[1]))
    assert storage.read_bytes(second.url + "/x.jpg") == b"second"


def test_a_ranged_reads_body_goes_to_its_sink_and_one_answered_whole_is_stopped(serve):
    """Into the file where the range belongs as it arrives (`storage._read_range`), never an error's text, nor a
    whole object from a server that ignored the range (its bytes would land past the range, over the next)."""
    chunks: list[bytes] = []
    ranged = serve(lambda h: send(h, 206, b"r" * 300_000))
    got = _http(ranged.url).get(ranged.url + "/o", {"Range": "bytes=0-299999"}, 1 << 16, chunks.append)
    assert got == (206, b"")  # `max_bytes` bounds what comes back in the response (an error's text), not the sink
    assert b"".join(chunks) == b"r" * 300_000
    chunks.clear()
    missing = serve(lambda h: send(h, 404, b"no such object"))
    assert _http(missing.url).get(missing.url + "/o", {}, 1 << 16, chunks.append) == (404, b"no such object")
    whole = serve(lambda h: send(h, 200, b"w" * 300_000))
    with pytest.raises(OSError, match="a ranged read answered whole"):
        _http(whole.url).get(whole.url + "/o", {"Range": "bytes=0-9"}, sink=chunks.append)
    assert chunks == []
    stop = serve(lambda h: send(h, 206, b"s" * 300_000))
    with pytest.raises(OSError) as err:
        _http(stop.url).get(stop.url + "/o", {"Range": "bytes=0-299999"}, sink=lambda chunk: 0)
    assert not storage.is_transient(err.value)
