"""The HTTP API: answers, error codes, and the snapshot id on every response."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from indexing import IndexConfig, SnapshotClient, build_snapshot, publish
from indexing.service import create_app
from tests.indexing.conftest import write_run


@pytest.fixture(scope="module")
def api(tmp_path_factory, run):
    root = str(tmp_path_factory.mktemp("served"))
    snapshot_id = build_snapshot(run, root, IndexConfig(queries=50))["snapshot_id"]
    publish(root, snapshot_id)
    with TestClient(create_app(SnapshotClient(root))) as client:
        yield client, snapshot_id


def test_health_and_snapshot(api):
    client, snapshot_id = api
    assert client.get("/healthz").json() == {"status": "ok", "snapshot_id": snapshot_id}
    body = client.get("/snapshot").json()
    assert body["snapshot_id"] == snapshot_id and body["count"] == 4000 and body["dim"] == 32
    assert body["created_at"] and set(body["refresh"]) == {"checked_at", "error", "refused"}


def test_similar_by_item(api):
    client, snapshot_id = api
    response = client.get("/similar/item-000005", params={"k": 4})
    assert response.status_code == 200
    body = response.json()
    assert body["snapshot_id"] == snapshot_id and body["item_id"] == "item-000005"
    assert len(body["neighbors"]) == 4 and all(n["item_id"] != "item-000005" for n in body["neighbors"])


def test_similar_batch_by_vectors_and_ids(api, vectors):
    client, snapshot_id = api
    by_vector = client.post("/similar", json={"vectors": [vectors[5].tolist(), vectors[6].tolist()], "k": 2})
    assert by_vector.status_code == 200
    results = by_vector.json()["results"]
    assert [r[0]["item_id"] for r in results] == ["item-000005", "item-000006"]
    by_id = client.post("/similar", json={"item_ids": ["item-000005"], "k": 3}).json()
    assert by_id["snapshot_id"] == snapshot_id and len(by_id["results"][0]) == 3


def test_an_item_id_with_slashes_is_one_item(tmp_path, vectors):
    """Marketplace ids such as `sku/123`: the path after /similar/ is the whole id, slashes and all, as it is when
    its slash is sent escaped (%2F, which the server's ASGI path arrives decoded)."""
    ids = [f"shop/{i}/sku" if i % 2 else f"sku-{i}" for i in range(300)]
    run = write_run(tmp_path / "run", vectors[:300], ids=ids)
    publish(str(tmp_path / "root"), build_snapshot(run, str(tmp_path / "root"), IndexConfig(queries=50))["snapshot_id"])
    with TestClient(create_app(SnapshotClient(str(tmp_path / "root")))) as client:
        response = client.get("/similar/shop/7/sku", params={"k": 3})
        assert response.status_code == 200, response.json()
        body = response.json()
        assert body["item_id"] == "shop/7/sku" and len(body["neighbors"]) == 3
        assert all(n["item_id"] != "shop/7/sku" for n in body["neighbors"])
        missing = client.get("/similar/shop/7")
        assert missing.status_code == 404 and missing.json()["detail"] == "item 'shop/7' is not in the snapshot"


def test_unknown_item_is_404_with_json(api):
    client, snapshot_id = api
    response = client.get("/similar/no-such-item")
    assert response.status_code == 404
    assert response.json() == {"detail": "item 'no-such-item' is not in the snapshot", "snapshot_id": snapshot_id}
    batch = client.post("/similar", json={"item_ids": ["item-000001", "no-such-item", "item-000002"], "k": 2})
    assert batch.status_code == 200  # the batch's other items are answered: null in the unknown one's place
    body = batch.json()
    assert body["unknown"] == ["no-such-item"] and body["results"][1] is None and body["snapshot_id"] == snapshot_id
    assert [len(row) for row in (body["results"][0], body["results"][2])] == [2, 2]
    assert client.post("/similar", json={"vectors": [[1.0] * 32]}).json()["unknown"] == []


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("get", "/similar/item-000001", {"params": {"k": 0}}),
        ("get", "/similar/item-000001", {"params": {"k": 100000}}),
        ("get", "/similar/item-000001", {"params": {"k": "many"}}),
        ("post", "/similar", {"json": {"vectors": [[0.1, 0.2]]}}),
        ("post", "/similar", {"json": {"vectors": [[0.0] * 32]}}),
        ("post", "/similar", {"json": {"k": 3}}),
        ("post", "/similar", {"json": {"item_ids": ["a"], "vectors": [[0.1] * 32]}}),
        ("post", "/similar", {"json": {"vectors": []}}),
        ("post", "/similar", {"content": b"not json", "headers": {"content-type": "application/json"}}),
    ],
    ids=["k-zero", "k-huge", "k-text", "short-vector", "zero-vector", "neither", "both", "empty", "not-json"],
)
def test_bad_requests_are_422_with_the_snapshot_id(api, method, path, kwargs):
    client, snapshot_id = api
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == 422, response.text
    assert response.json()["snapshot_id"] == snapshot_id


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, run):
    root = str(tmp_path_factory.mktemp("guarded"))
    snapshot_id = build_snapshot(run, root, IndexConfig(queries=50))["snapshot_id"]
    publish(root, snapshot_id)
    with TestClient(create_app(SnapshotClient(root), token="s3cret", max_body_bytes=2048)) as client:
        yield client, snapshot_id


def test_a_token_guards_every_endpoint_but_health(guarded):
    client, snapshot_id = guarded
    assert client.get("/healthz").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Bearer "}):
        for response in (
            client.get("/snapshot", headers=headers),
            client.get("/similar/item-000001", headers=headers),
            client.post("/similar", json={"item_ids": ["item-000001"]}, headers=headers),
            client.get("/similar/item-000001", params={"k": 0}, headers=headers),  # 401 before any validation
        ):
            assert response.status_code == 401, (headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json() == {"detail": "missing or wrong bearer token", "snapshot_id": snapshot_id}
    ok = client.get("/similar/item-000001", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["snapshot_id"] == snapshot_id


def test_request_bodies_over_the_limit_are_413_unread(guarded):
    client, snapshot_id = guarded
    auth = {"Authorization": "Bearer s3cret"}
    small = client.post("/similar", json={"item_ids": ["item-000001"], "k": 2}, headers=auth)
    assert small.status_code == 200
    big = {"item_ids": [f"item-{i:06d}" for i in range(200)], "k": 2}  # ~3 KB of JSON
    declared = client.post("/similar", json=big, headers=auth)
    assert declared.status_code == 413
    assert declared.json() == {"detail": "request body over 2048 bytes", "snapshot_id": snapshot_id}

    def chunks():  # no Content-Length: the limit counts what arrives
        for _ in range(10):
            yield b" " * 1000

    streamed = client.post("/similar", content=chunks(), headers={**auth, "content-type": "application/json"})
    assert streamed.status_code == 413
    lying = client.post("/similar", content=b"x" * 10, headers={**auth, "content-length": "99999999999"})
    assert lying.status_code == 413


def test_an_empty_token_is_refused(run, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        create_app(SnapshotClient.__new__(SnapshotClient), token="  \n")
