"""Images at http(s) URLs (a marketplace's CDN): read whole over libcurl, redirects to http(s) followed, missing ones
not found, throttling retried, oversized ones refused at their headers, and no bucket's token ever sent."""

from __future__ import annotations

import pytest
from google.api_core.exceptions import Forbidden

from encoder import storage
from tests.support.http_stand_in import StandIn, send

PHOTO = b"\xff\xd8" + bytes(range(256)) * 40


@pytest.fixture
def cdn():
    answers: dict[str, list[tuple[int, bytes, dict]]] = {}

    def answer(handler) -> None:
        queue = answers.get(handler.path) or [(404, b"no such page", {})]
        status, body, headers = queue.pop(0) if len(queue) > 1 else queue[0]
        send(handler, status, body, headers=headers)

    server = StandIn(answer)
    server.answers = answers
    yield server
    server.close()


def test_web_images_are_read_whole_with_redirects_and_retries(cdn):
    cdn.answers["/a.jpg"] = [(200, PHOTO, {})]
    cdn.answers["/old/b.jpg"] = [
        (301, b"<html>moved</html>", {"Location": "/b.jpg"})
    ]  # its page never read as the photo
    cdn.answers["/b.jpg"] = [(200, PHOTO[:100], {})]
    cdn.answers["/busy.jpg"] = [(503, b"", {}), (429, b"", {}), (200, PHOTO, {})]
    assert storage.read_bytes(f"{cdn.url}/a.jpg", max_bytes=1 << 20) == PHOTO
    assert storage.read_bytes(f"{cdn.url}/old/b.jpg") == PHOTO[:100]
    assert storage.read_bytes(f"{cdn.url}/busy.jpg") == PHOTO
    headers = next(h for path, h, _ in cdn.seen if path == "/a.jpg")
    assert "authorization" not in headers and headers["user-agent"].startswith("lookalike")


@pytest.mark.parametrize(
    ("answer", "raised", "requests"),
    [
        ((404, b"no such page", {}), FileNotFoundError, 1),
        ((410, b"gone", {}), FileNotFoundError, 1),
        ((403, b"secret", {}), Forbidden, 1),  # refused: not retried
        ((200, PHOTO, {}), ValueError, 1),  # past max_bytes (its Content-Length): refused before its body
        ((302, b"", {"Location": "file:///etc/hostname"}), OSError, 1),  # off http(s): "Protocol "file" is disabled"
    ],
    ids=["404", "410", "403", "too-large", "redirect-to-a-file"],
)
def test_web_images_that_cannot_be_used_fail_at_once(cdn, answer, raised, requests):
    cdn.answers["/x.jpg"] = [answer]
    with pytest.raises(raised) as err:
        storage.read_bytes(f"{cdn.url}/x.jpg", max_bytes=1000)
    assert b"secret".decode() not in str(err.value)  # a server's page is never quoted back
    assert [path for path, _, _ in cdn.seen] == ["/x.jpg"] * requests


def test_the_embed_step_reads_web_images_and_dead_letters_the_missing(cdn):
    from pipelines.storage import read_image

    cdn.answers["/a.jpg"] = [(200, PHOTO, {})]
    assert read_image(f"{cdn.url}/a.jpg", 1 << 20) == PHOTO
    assert read_image(f"{cdn.url}/gone.jpg", 1 << 20) == "not found"
    assert "max_bytes" in read_image(f"{cdn.url}/a.jpg", 100)


def test_a_body_without_a_length_is_held_to_max_bytes():
    """A server that sends no Content-Length is read until it closes: past `max_bytes` (by less than libcurl's
    first 64 KiB of room) it is refused all the same."""

    def answer(handler) -> None:
        handler.send_response(200)
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(PHOTO)
        handler.close_connection = True

    server = StandIn(answer)
    try:
        assert storage.read_bytes(f"{server.url}/a.jpg", max_bytes=len(PHOTO)) == PHOTO
        with pytest.raises(ValueError, match="larger than max_bytes=1000"):
            storage.read_bytes(f"{server.url}/a.jpg", max_bytes=1000)
    finally:
        server.close()


def test_a_scheme_nothing_here_reads_is_said_so_not_taken_for_a_missing_file(tmp_path):
    """`train --catalog s3://...` and `evaluate --interactions s3://...` said "does not exist" (a local path
    `s3:/...`); `embed --catalog s3://...` was Beam's traceback ("Missing boto3 requirement")."""
    from pipelines.catalog import CatalogError, catalog_files

    for call in (storage.read_bytes, storage.exists, storage.files_under):
        with pytest.raises(ValueError, match="lookalike reads local paths, gs:// and http\\(s\\):// here, not s3://"):
            call("s3://bucket/logs.parquet")
    assert storage.exists(f"file://{tmp_path}/nothing") is False  # a path of this machine's, as before
    with pytest.raises(CatalogError, match="catalog s3://bucket/m.parquet: cannot be listed here"):
        catalog_files("s3://bucket/m.parquet")
