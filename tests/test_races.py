"""Races between processes: jobs starting at the same moment, and a client refreshing while others publish.

(Two publishers racing on LATEST: tests/indexing/test_publish.py.)
"""

from __future__ import annotations

import multiprocessing
import time

import numpy as np
import pytest

from encoder.run_lock import LockHeld, run_lock
from indexing import IndexConfig, SnapshotClient, build_snapshot, publish, rollback
from tests.indexing.conftest import clustered, write_run

pytestmark = pytest.mark.slow
JOBS = 4


def _contend(out: str, job: int, rounds: int, barrier, wins) -> None:
    for round_ in range(rounds):
        barrier.wait()  # everyone tries at once
        try:
            with run_lock(out, f"job-{job}", ttl_h=1):
                wins.put((round_, job))
                barrier.wait()  # hold it until every other job has tried
        except LockHeld:
            barrier.wait()
        barrier.wait()  # released before the next round


def _race_for_the_lock(out: str, rounds: int) -> dict[int, list[int]]:
    ctx = multiprocessing.get_context("spawn")
    barrier, wins = ctx.Barrier(JOBS), ctx.Queue()
    jobs = [ctx.Process(target=_contend, args=(out, j, rounds, barrier, wins)) for j in range(JOBS)]
    for p in jobs:
        p.start()
    for p in jobs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in jobs)
    by_round: dict[int, list[int]] = {r: [] for r in range(rounds)}
    while not wins.empty():
        round_, job = wins.get()
        by_round[round_].append(job)
    return by_round


def test_jobs_started_at_the_same_moment_only_one_proceeds(tmp_path):
    by_round = _race_for_the_lock(str(tmp_path / "out"), rounds=50)
    assert all(len(winners) == 1 for winners in by_round.values()), by_round
    assert len({w[0] for w in by_round.values()}) > 1  # not always the same job: a real race


@pytest.mark.gcs
def test_jobs_started_at_the_same_moment_only_one_proceeds_on_gcs(gcs_emulator, gcs_bucket):
    by_round = _race_for_the_lock(f"gs://{gcs_bucket}/out", rounds=20)
    assert all(len(winners) == 1 for winners in by_round.values()), by_round


def _publish_and_roll_back(root: str, ids: list[str], rounds: int, done) -> None:
    for i in range(rounds):
        publish(root, ids[i % len(ids)])
        if i % 3 == 2:
            rollback(root)
    done.set()


def test_a_client_refreshing_while_others_publish_and_roll_back(tmp_path):
    root = str(tmp_path / "snapshots")
    run = write_run(tmp_path / "20260101T000000Z-cccccc", clustered(2000, 16))
    ids = [build_snapshot(run, root, IndexConfig(queries=20))["snapshot_id"] for _ in range(3)]
    publish(root, ids[0])
    client = SnapshotClient(root)
    ctx = multiprocessing.get_context("spawn")
    done = ctx.Event()
    writer = ctx.Process(target=_publish_and_roll_back, args=(root, ids, 100, done))
    writer.start()
    served, query = set(), np.ones(16, dtype=np.float32)
    deadline = time.monotonic() + 240
    while not done.is_set() and time.monotonic() < deadline:
        client.refresh()
        snapshot_id, found = client.search_tagged(vectors=query, k=5)
        assert snapshot_id in ids and len(found[0]) == 5
        served.add(snapshot_id)
    writer.join(timeout=60)
    client.close()
    assert writer.exitcode == 0
    assert len(served) >= 2, "the client never saw a publish land"


def test_a_job_longer_than_its_locks_time_to_live_keeps_it(tmp_path, caplog):
    """The lock's expiry moves on while its job runs: a job past `lock_ttl_h` (a large backfill) lost its lock to
    the next job, and both ran. A lock taken over from a stalled holder is reported, and left to its new holder."""
    import json

    out, ttl_h = str(tmp_path / "out"), 0.0005  # 1.8 s, renewed every 0.45 s
    lock = tmp_path / "out" / "runs" / "LOCK"
    with run_lock(out, "long-job", ttl_h=ttl_h):
        first = json.loads(lock.read_text())["expires_at"]
        time.sleep(2.5)  # past the first expiry
        with pytest.raises(LockHeld, match="locked by run long-job"):
            with run_lock(out, "next-night", ttl_h=ttl_h):
                pass
        assert json.loads(lock.read_text())["expires_at"] > first
    assert not lock.exists()  # released

    with caplog.at_level("ERROR", logger="encoder.run_lock"), run_lock(out, "stalled", ttl_h=ttl_h):
        lock.write_text(json.dumps({**json.loads(lock.read_text()), "run_id": "taker", "pid": -1}))
        time.sleep(1.0)
        assert json.loads(lock.read_text())["run_id"] == "taker"  # not written back over
    assert "run stalled lost its lock on" in caplog.text and "to run taker" in caplog.text
    assert lock.exists()  # the taker's, not released by the stalled job
