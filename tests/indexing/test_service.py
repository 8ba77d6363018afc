"""The HTTP API: answers, error codes, and the snapshot id on every response."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from indexing import IndexConfig, SnapshotClient, build_snapshot, publish
from indexing.service import create_app


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


def test_unknown_item_is_404_with_json(api):
    client, snapshot_id = api
    response = client.get("/similar/no-such-item")
    assert response.status_code == 404
    assert response.json() == {"detail": "item 'no-such-item' is not in the snapshot", "snapshot_id": snapshot_id}
    assert client.post("/similar", json={"item_ids": ["no-such-item"]}).status_code == 404


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
