"""kill -9 at awkward moments: during embed with worker processes, during index builds, during publishes.

After every kill the next attempt completes exactly (no lost or duplicated rows), no partial output
is ever taken for a complete one, and LATEST always names a complete snapshot that passes its checks.
Kill times come from a seeded generator, so CI sees the same schedule every run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from indexing import IndexConfig, build_snapshot, publish, read_latest
from indexing.publish import complete_snapshots
from indexing.snapshot import local_copy, read_manifest, verify_snapshot
from tests.indexing.conftest import clustered, write_run
from tests.pipelines.test_cli import _lookalike

pytestmark = pytest.mark.slow
LOOKALIKE = str(Path(sys.executable).with_name("lookalike"))


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> str:
    """A complete embed run of 4,000 clustered vectors."""
    return write_run(tmp_path_factory.mktemp("run") / "20260101T000000Z-aaaaaa", clustered(4000, 32))


def _kill_group(job: subprocess.Popen) -> None:
    """SIGKILL the job and every process it started (Beam workers too), as a dying machine would."""
    with contextlib.suppress(ProcessLookupError):  # it may have finished on its own
        os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=30)


def _group_size(pgid: int) -> int:
    """How many live processes are in process group `pgid` (from /proc)."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            count += fields[0] != "Z" and int(fields[2]) == pgid  # state, ppid, pgrp
    return count


def _assert_latest_is_complete(root: Path) -> str | None:
    latest = read_latest(str(root))
    if latest is None:
        return None
    manifest = read_manifest(str(root), latest.snapshot_id)
    verify_snapshot(local_copy(str(root), latest.snapshot_id, root / ".cache"), manifest)
    return latest.snapshot_id


def test_kill_during_embed_with_two_worker_processes_then_rerun(tmp_path, demo_catalog, tiny_model):
    config = {"catalog": str(demo_catalog.manifest), "model": str(tiny_model), "out": "OUT",
              "interactions": str(demo_catalog.interactions), "index": {"index": "flat"},
              "embed": {"workers": 2, "batch_size": 8},
              "evaluate": {"gates": ["ndcg@5>=baseline-1"], "since_days": None}}  # fmt: skip
    (tmp_path / "nightly.yaml").write_text(json.dumps(config))
    job = subprocess.Popen([LOOKALIKE, "nightly", "--config", "nightly.yaml", "--run-id", "night"], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    ledger = tmp_path / "OUT" / "runs" / "night" / "ledger.jsonl"
    failures = tmp_path / "OUT" / "failures" / "night"
    deadline = time.monotonic() + 180
    # Wait until both Beam worker processes are up (the launcher plus two in the job's process group),
    # let them work for a moment, then kill everything.
    while _group_size(job.pid) < 3 or not ledger.exists():
        assert job.poll() is None, job.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the Beam workers never started"
        time.sleep(0.05)
    time.sleep(0.5)
    _kill_group(job)
    assert '"step": "embed", "status": "done"' not in ledger.read_text(), "killed too late to prove anything"

    rerun = _lookalike("nightly", "--config", "nightly.yaml", "--run-id", "night", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    out = tmp_path / "OUT" / "embeddings" / "night"
    manifest = json.loads((out / "_manifest.json").read_text())
    ids = [i for s in manifest["shards"] for i in pq.read_table(out / s["path"]).column("item_id").to_pylist()]
    assert len(ids) == len(set(ids)) == 95  # 100 items, 5 broken on purpose: dead-lettered
    dead = [i for p in failures.glob("*.parquet") for i in pq.read_table(p).column("item_id").to_pylist()]
    assert len(dead) == len(set(dead)) == 5 and not set(dead) & set(ids)
    assert {p.name for p in out.glob("*.parquet")} == {s["path"] for s in manifest["shards"]}
    assert _assert_latest_is_complete(tmp_path / "OUT" / "snapshots") == "night"


def test_kill_during_index_builds_at_random_moments(tmp_path):
    embeddings = write_run(tmp_path / "20260101T000000Z-bbbbbb", clustered(40_000, 64))
    root = tmp_path / "snapshots"
    rng = random.Random(7)
    script = ("import sys; from indexing import IndexConfig, build_snapshot; "
              "build_snapshot(sys.argv[1], sys.argv[2], IndexConfig(queries=50, index='hnsw'))")  # fmt: skip

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", script, embeddings, str(root)], cwd=Path(__file__).parents[1],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    began = time.monotonic()
    assert start().wait(timeout=300) == 0  # one whole build: how long one takes on this machine
    whole = time.monotonic() - began
    for _ in range(8):
        job = start()
        time.sleep(whole * rng.uniform(0.1, 0.6))  # later builds run warm, a little faster than the first
        assert job.poll() is None, "the build finished before its kill"
        _kill_group(job)
        for manifest in complete_snapshots(str(root)):  # whatever counts as complete passes its checks
            verify_snapshot(root / manifest["snapshot_id"], manifest)
    assert len(complete_snapshots(str(root))) == 1  # only the build that was let finish
    finished = build_snapshot(embeddings, str(root), IndexConfig(queries=50, index="hnsw"))
    publish(str(root), finished["snapshot_id"])
    assert _assert_latest_is_complete(root) == finished["snapshot_id"]


_PUBLISH_FOREVER = """
import sys
from indexing import publish
ids = sys.argv[2:]
i = 0
while True:
    publish(sys.argv[1], ids[i % len(ids)])
    if i == 0:
        print("publishing", flush=True)
    i += 1
"""


def test_kill_during_publishes_at_random_moments(tmp_path, embeddings):
    root = tmp_path / "snapshots"
    ids = [build_snapshot(embeddings, str(root), IndexConfig(queries=20))["snapshot_id"] for _ in range(2)]
    publish(str(root), ids[0])
    rng = random.Random(11)
    sequences = []
    for _ in range(15):
        job = subprocess.Popen([sys.executable, "-c", _PUBLISH_FOREVER, str(root), *ids], cwd=Path(__file__).parents[1],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        assert job.stdout.readline() == b"publishing\n"  # past the imports: publishing as fast as it can
        time.sleep(rng.uniform(0.0, 0.3))
        _kill_group(job)
        assert _assert_latest_is_complete(root) in ids
        sequences.append(read_latest(str(root)).sequence)
    assert sequences[-1] >= 30, "the publishers never got going"
    assert publish(str(root), ids[1]).snapshot_id == ids[1]  # no lock or temp file left in the way
