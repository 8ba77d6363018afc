"""`lookalike index / publish / snapshots / similar / rollback / serve` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import free_port as _free_port
from tests.indexing.conftest import clustered, write_run
from tests.pipelines.test_cli import _lookalike


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    return write_run(tmp_path_factory.mktemp("emb") / "20260101T000000Z-cli000", clustered(2000, 16))


@pytest.mark.slow
def test_index_publish_query_rollback(tmp_path, run_dir):
    built = _lookalike(
        "index", "--embeddings", run_dir, "--out", "S", "--snapshot-id", "first", "--queries", "200", cwd=tmp_path
    )
    assert built.returncode == 0, built.stderr
    assert "recall@10 (200 queries)" in built.stdout and "not published" in built.stdout
    assert not (tmp_path / "S" / "LATEST").exists()
    again = _lookalike("index", "--embeddings", run_dir, "--out", "S", "--snapshot-id", "second", "--index", "hnsw",
                       "--queries", "200", cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr
    pinned = _lookalike("similar", "item-000007", "--root", "S/second", "-k", "2", cwd=tmp_path)  # not yet published
    assert pinned.returncode == 0 and pinned.stdout.startswith("snapshot second: 2 neighbours"), pinned.stderr

    assert _lookalike("publish", "--root", "S", "first", cwd=tmp_path).returncode == 0
    published = _lookalike("publish", "--root", "S", cwd=tmp_path)
    assert "published second (previously first)" in published.stdout

    listing = _lookalike("snapshots", "--root", "S", cwd=tmp_path)
    assert listing.returncode == 0 and "first" in listing.stdout and "hnsw" in listing.stdout

    similar = _lookalike("similar", "item-000007", "--root", "S", "-k", "3", cwd=tmp_path)
    assert similar.returncode == 0, similar.stderr
    lines = similar.stdout.strip().splitlines()
    assert lines[0] == "snapshot second: 3 neighbours of item-000007" and len(lines) == 4
    assert all("item-000007" not in line for line in lines[1:])

    vector = json.dumps([1.0] + [0.0] * 15)[1:-1]
    by_vector = _lookalike("similar", "--vector", vector, "--root", "S", "-k", "2", cwd=tmp_path)
    assert by_vector.returncode == 0 and "neighbours of the vector" in by_vector.stdout

    rolled = _lookalike("rollback", "--root", "S", cwd=tmp_path)
    assert rolled.stdout.strip() == "LATEST is now first"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["index", "--embeddings", "nowhere", "--out", "S"], "not a complete embed run"),
        (
            [
                "index",
                "--embeddings",
                "RUN",
                "--out",
                "S",
                "--min-recall",
                "1.0",
                "--target-recall",
                "1.0",
                "--index",
                "IVF8,PQ2x4",
                "--queries",
                "50",
            ],
            "below --min-recall",
        ),
        (["index", "--embeddings", "RUN", "--out", "S", "--reduce", "svd:3"], "reduce must be"),
        (["publish", "--root", "S"], "no complete snapshot"),
        (["rollback", "--root", "S"], "nothing is published"),
        (["similar", "x", "--root", "S"], "nothing is published"),
    ],
    ids=["no-run", "low-recall", "bad-reduce", "publish-empty", "rollback-empty", "similar-empty"],
)
def test_index_user_mistakes(tmp_path, run_dir, args, message):
    result = _lookalike(*[run_dir if a == "RUN" else a for a in args], cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr and "Traceback" not in result.stderr


def _serve(tmp_path, *args: str) -> tuple[subprocess.Popen, int]:
    """`lookalike serve --root S` with `args`, once it answers /healthz."""
    import sys
    from pathlib import Path

    port = _free_port()
    exe = Path(sys.executable).with_name("lookalike")
    server = subprocess.Popen([str(exe), "serve", "--root", "S", "--port", str(port), *args], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return server, port
        except OSError:
            assert server.poll() is None, server.stderr.read().decode()
            assert time.monotonic() < deadline, "server did not answer in 60 s"
            time.sleep(0.3)


@pytest.mark.slow
def test_serve_answers_http(tmp_path, run_dir):
    assert _lookalike("index", "--embeddings", run_dir, "--out", "S", "--queries", "50", cwd=tmp_path).returncode == 0
    assert _lookalike("publish", "--root", "S", cwd=tmp_path).returncode == 0
    (tmp_path / "token").write_text("s3cret\n")
    server, port = _serve(tmp_path, "--token-file", "token")
    url = f"http://127.0.0.1:{port}/similar/item-000001?k=2"
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=5)
        assert refused.value.code == 401
        request = urllib.request.Request(url, headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(request, timeout=5) as r:
            body = json.loads(r.read())
        assert len(body["neighbors"]) == 2 and body["snapshot_id"]
    finally:
        server.terminate()
        server.wait(timeout=10)


def _workers(pid: int) -> set[int]:
    """The worker processes uvicorn spawned under `pid` (not multiprocessing's resource tracker)."""
    from pathlib import Path

    from benchmarks.common import child_pids

    workers = set()
    for child in child_pids(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.add(child)
        except OSError:  # gone meanwhile
            pass
    return workers


@pytest.mark.slow
def test_serve_with_workers_answers_from_each_and_each_takes_a_new_snapshot(tmp_path, run_dir):
    """`--workers 2`: two processes on the port, each with its own client over the snapshot's mapped files, each
    refreshing on its own; a worker killed is replaced and the port keeps answering. A token file is read by each."""
    import os
    import signal

    assert _lookalike("index", "--embeddings", run_dir, "--out", "S", "--queries", "50", cwd=tmp_path).returncode == 0
    assert _lookalike("publish", "--root", "S", cwd=tmp_path).returncode == 0
    (tmp_path / "token").write_text("s3cret\n")
    server, port = _serve(tmp_path, "--workers", "2", "--refresh-s", "1", "--token-file", "token")

    def answers(n: int) -> list[dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/similar/item-000001?k=2",
                                         headers={"Authorization": "Bearer s3cret", "Connection": "close"})  # fmt: skip
        out = []
        for _ in range(n):
            with urllib.request.urlopen(request, timeout=5) as r:
                out.append(json.loads(r.read()))
        return out

    try:
        workers = _workers(server.pid)
        first = answers(20)
        assert len(workers) == 2 and all(len(a["neighbors"]) == 2 for a in first)
        assert (
            _lookalike("index", "--embeddings", run_dir, "--out", "S", "--queries", "50", cwd=tmp_path).returncode == 0
        )
        assert _lookalike("publish", "--root", "S", cwd=tmp_path).returncode == 0
        newest = json.loads((tmp_path / "S" / "LATEST").read_text())["snapshot_id"]
        assert newest != first[0]["snapshot_id"]
        deadline = time.monotonic() + 30
        while {a["snapshot_id"] for a in answers(20)} != {newest}:  # every worker's answers, not one's
            assert time.monotonic() < deadline, "not every worker took the new snapshot in 30 s"
            time.sleep(0.5)
        os.kill(max(workers), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while len(_workers(server.pid) - workers) != 1 or len(_workers(server.pid)) != 2:
            assert time.monotonic() < deadline, "the killed worker was not replaced in 30 s"
            time.sleep(0.3)
        assert all(a["snapshot_id"] == newest for a in answers(20))
    finally:
        server.terminate()
        server.wait(timeout=20)
