"""Object-store helpers that are not about a particular store."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from encoder import storage
from tests.support.http_stand_in import StandIn, send

# Read a table through the library's reader, then exit at once: the moment when Arrow may still be
# releasing the reader on its own threads while the interpreter shuts down.
_READ_THEN_EXIT = "import sys; from evaluation.catalog import read_table; read_table(sys.argv[1]); sys.exit(2)"


def test_the_caches_go_where_lookalike_cache_says_when_asked(monkeypatch, tmp_path):
    """`$LOOKALIKE_CACHE`, else `~/.cache/lookalike`; read at each config's making, not at import."""
    from encoder import EncoderConfig
    from training.config import TrainConfig

    monkeypatch.delenv("LOOKALIKE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert storage.cache_dir("models") == str(tmp_path / "home" / ".cache" / "lookalike" / "models")
    monkeypatch.setenv("LOOKALIKE_CACHE", str(tmp_path / "elsewhere"))
    assert storage.cache_dir("snapshots") == str(tmp_path / "elsewhere" / "snapshots")
    assert EncoderConfig(model="m").cache_dir == str(tmp_path / "elsewhere" / "models")
    assert TrainConfig(catalog="c", model="m", out="o").cache_dir == str(tmp_path / "elsewhere" / "models")


def test_arrow_input_reads_the_bytes_it_was_given():
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"item_id": ["a", "b"], "n": [1, 2]}), sink)
    table = pq.read_table(storage.arrow_input(sink.getvalue().to_pybytes()))
    assert table.to_pydict() == {"item_id": ["a", "b"], "n": [1, 2]}


def test_exiting_right_after_a_parquet_read_never_aborts(tmp_path):
    # Over io.BytesIO about 1 exit in 8 ended in SIGABRT (exit 134 / -6), so 32 clean exits in a
    # row would happen by chance with probability < 2%.
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"item_id": [f"i{n}" for n in range(2000)], "title": ["x"] * 2000}), path)

    def exit_code(_):
        return subprocess.run([sys.executable, "-c", _READ_THEN_EXIT, str(path)], capture_output=True).returncode

    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(exit_code, range(32)))
    assert codes == [2] * 32


def test_a_local_read_over_its_cap_is_refused_and_one_at_the_cap_is_not(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"1234")
    assert storage.read_bytes(str(path), max_bytes=4) == b"1234"
    with pytest.raises(ValueError, match="larger than max_bytes=3"):
        storage.read_bytes(str(path), max_bytes=3)


def _store(answers: list[tuple]) -> StandIn:
    """A stand-in for GCS's download endpoint that answers each request with the next (status, body[, headers]) of
    `answers`, the last one over and over; a gzip body is marked as stored gzip-encoded, and served as stored."""

    def answer(handler) -> None:
        status, body, *extra = answers[min(len(store.seen), len(answers)) - 1]
        headers = dict(extra[0]) if extra else {}
        if body.startswith(b"\x1f\x8b"):
            headers["Content-Encoding"] = "gzip"
        send(handler, status, body, headers=headers)

    store = StandIn(answer)
    return store


@pytest.fixture
def store_client(monkeypatch):
    """`store_client(answers)`: the storage client's image reads go to a `_store`, with a token of "t0k3n"."""
    from types import SimpleNamespace

    from google.oauth2.credentials import Credentials

    stores: list[StandIn] = []

    def make(answers: list[tuple[int, bytes]], credentials=None, api: str | None = None) -> StandIn:
        """`api`: the store's URL as the client names it (default: the stand-in's own)."""
        store = _store(answers)
        stores.append(store)
        client = SimpleNamespace(_credentials=credentials or Credentials(token="t0k3n"),
                                 _connection=SimpleNamespace(API_BASE_URL=api or store.url))  # fmt: skip
        monkeypatch.setattr(storage, "gcs_client", lambda: client)
        monkeypatch.setattr(storage, "_IMAGE_HTTP", None)
        return store

    yield make
    for store in stores:
        store.close()


def _hash(data: bytes) -> dict[str, str]:
    """The `x-goog-hash` GCS sends with a whole object."""
    import base64

    import google_crc32c

    return {"x-goog-hash": f"crc32c={base64.b64encode(google_crc32c.value(data).to_bytes(4, 'big')).decode()}"}


def test_an_image_read_is_one_request_for_the_whole_object_with_the_clients_credentials(store_client):
    """Asked for raw, with the client's token, at the object's download URL (its name quoted as the library quotes
    it), no range (a ranged read gets no checksum); the bytes as served, never inflated, checked against their
    crc32c."""
    import gzip

    body = gzip.compress(b"not inflated")
    store = store_client([(200, body, _hash(body))])
    assert storage.read_bytes("gs://b/photos/a b~é.jpg", max_bytes=100) == body
    ((path, headers, _),) = store.seen
    assert path == "/download/storage/v1/b/b/o/photos%2Fa%20b~%C3%A9.jpg?alt=media"
    assert "range" not in headers and headers["authorization"] == "Bearer t0k3n"
    assert headers["accept-encoding"] == "gzip"
    store_client([(200, b"")])  # an empty object
    assert storage.read_bytes("gs://b/empty", max_bytes=10) == b""


def test_a_body_that_does_not_match_its_crc32c_is_read_again(store_client, monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)  # the backoff's waits
    good = b"jpeg bytes"
    store = store_client([(200, b"jpeg bytez", _hash(good)), (200, good, _hash(good))])
    assert storage.read_bytes("gs://b/x.jpg", max_bytes=100) == good and len(store.seen) == 2
    store_client([(200, b"jpeg bytez", _hash(good))])
    with pytest.raises(ConnectionError, match="crc32c of the 10 bytes read is [0-9a-f]{8}, the object's is"):
        storage.read_bytes("gs://b/x.jpg", max_bytes=100)  # every attempt damaged: the dead letter says so
    store_client([(200, good, {"x-goog-hash": "crc32c=not base64!, md5=x"})])
    assert storage.read_bytes("gs://b/x.jpg", max_bytes=100) == good  # a hash it cannot read holds nothing


def test_an_object_past_the_cap_is_refused_at_its_headers(store_client):
    store_client([(200, b"x" * 101)])
    with pytest.raises(ValueError, match="larger than max_bytes=100"):
        storage.read_bytes("gs://b/big.jpg", max_bytes=100)
    store_client([(200, b"x" * 100, _hash(b"x" * 100))])
    assert storage.read_bytes("gs://b/big.jpg", max_bytes=100) == b"x" * 100


def test_an_image_read_retries_what_is_transient_and_maps_what_is_not(store_client, monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)  # the backoff's waits
    store = store_client([(503, b"busy"), (429, b"slow down"), (200, b"jpeg")])
    assert storage.read_bytes("gs://b/x.jpg", max_bytes=100) == b"jpeg" and len(store.seen) == 3
    store_client([(404, b"no such object")])
    with pytest.raises(FileNotFoundError, match="gs://b/gone.jpg"):
        storage.read_bytes("gs://b/gone.jpg", max_bytes=100)
    store = store_client([(403, b"denied")])
    with pytest.raises(Exception, match="403") as refused:
        storage.read_bytes("gs://b/secret.jpg", max_bytes=100)
    assert not storage.is_transient(refused.value) and len(store.seen) == 1


def test_a_token_is_refreshed_by_the_environments_proxy_settings_for_the_token_servers_url(store_client,
                                                                                        monkeypatch):  # fmt: skip
    """The token server (on GCE, the metadata server) is reached by its own URL's proxy settings, not the store's:
    a proxy for the store's scheme and `no_proxy` naming the token server's host."""
    from google.auth.credentials import Credentials as Base

    class FromTokenServer(Base):  # a token fetched with the request image reads hand to their refreshes
        def __init__(self, url: str) -> None:
            super().__init__()
            self.url = url

        def refresh(self, request) -> None:
            self.token = request(url=self.url, method="GET").data.decode()

    tokens = _store([(200, b"fresh")])  # the token server, on 127.0.0.1
    try:
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        for name in ("NO_PROXY", "HTTP_PROXY"):
            monkeypatch.delenv(name, raising=False)
        # The store, named storage.example, is reached through a proxy: the stand-in itself, which sees whole URLs.
        store = store_client([(200, b"jpeg")], FromTokenServer(tokens.url + "/token"), api="http://storage.example")
        monkeypatch.setenv("http_proxy", store.url)
        assert storage.read_bytes("gs://b/x.jpg", max_bytes=100) == b"jpeg"
        ((path, headers, _),) = store.seen
        assert path.startswith("http://storage.example/download/") and headers["authorization"] == "Bearer fresh"
        assert [path for path, *_ in tokens.seen] == ["/token"]  # straight to the token server, not by the proxy
    finally:
        tokens.close()


def test_each_process_and_each_emulator_has_a_client_of_its_own(monkeypatch):
    """Threads share the client; a forked child must not use its parent's pooled connections."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # anonymous: nothing is asked of the network
    monkeypatch.setattr(storage, "_CLIENT", None)
    client = storage.gcs_client()
    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(lambda _: storage.gcs_client(), range(8))) == {client}
    parent = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: parent + 1)  # as a forked child sees it
    child = storage.gcs_client()
    assert child is not client and child is storage.gcs_client()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:10")
    assert storage.gcs_client() not in (client, child)


def test_retries_in_an_outage_log_a_line_now_and_then_not_one_each(monkeypatch, caplog):
    import logging

    from encoder.throttled import Throttled

    monkeypatch.setattr(storage, "_RETRIES", Throttled(storage.log, every_s=10.0))
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)

    def refused_twice():
        tries = []

        def read():
            tries.append(1)
            if len(tries) <= 2:
                raise ConnectionError("refused")
            return b"bytes"

        return read

    with caplog.at_level(logging.WARNING, logger=storage.log.name):
        for i in range(20):  # 20 reads, each refused twice before it lands: 40 retries
            assert storage.with_retries(refused_twice(), f"read gs://b/{i}.jpg") == b"bytes"
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 1 and retries[0].startswith("read gs://b/0.jpg: refused (attempt 1/5), retrying in")


@pytest.mark.gcs
def test_files_under_and_newest_change_on_gcs(gcs_emulator, gcs_bucket):
    """A folder's files, a glob's (a `*` spans folders on gs://), one file; when anything under a prefix changed."""
    import time

    for name in ("logs/dt=1/part-0.parquet", "logs/dt=2/part-0.parquet", "logs/_SUCCESS", "logsx/other.parquet"):
        storage.write_bytes(f"gs://{gcs_bucket}/{name}", b"x")
    base = f"gs://{gcs_bucket}"
    assert storage.files_under(f"{base}/logs") == [f"{base}/logs/_SUCCESS", f"{base}/logs/dt=1/part-0.parquet",
                                                   f"{base}/logs/dt=2/part-0.parquet"]  # fmt: skip
    assert storage.files_under(f"{base}/logs/*.parquet") == [f"{base}/logs/dt=1/part-0.parquet",
                                                             f"{base}/logs/dt=2/part-0.parquet"]  # fmt: skip
    assert storage.files_under(f"{base}/logs/_SUCCESS") == [f"{base}/logs/_SUCCESS"]
    assert storage.files_under(f"{base}/nothing/*.parquet") == [] == storage.files_under(f"{base}/nothing")
    assert (
        abs(storage.newest_change(f"{base}/logs") - time.time()) < 120 and storage.newest_change(f"{base}/no") is None
    )
