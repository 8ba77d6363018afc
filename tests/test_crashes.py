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


def _embed_workers(pgid: int) -> int:
    """How many embed worker processes are alive in process group `pgid`: forked by the worker forker
    (`pipelines.worker_fork`), or started by Beam as its SDK worker."""
    procs = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                procs[int(stat.parent.name)] = (int(fields[1]), (stat.parent / "cmdline").read_bytes())
    forkers = {pid for pid, (_, cmdline) in procs.items() if b"import serve" in cmdline}
    return sum(ppid in forkers or b"sdk_worker_main" in cmdline for ppid, cmdline in procs.values())


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
              "evaluate": {"gates": ["ndcg@5>=baseline-1"], "since_days": None, "min_queries": 10}}  # fmt: skip
    (tmp_path / "nightly.yaml").write_text(json.dumps(config))
    (tmp_path / "t").mkdir()  # the scratch the kill leaves (Beam's pipeline folder, the forker's socket): the test's
    job = subprocess.Popen([LOOKALIKE, "nightly", "--config", "nightly.yaml", "--run-id", "night"], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                           env={**os.environ, "TMPDIR": str(tmp_path / "t")})  # fmt: skip
    ledger = tmp_path / "OUT" / "runs" / "night" / "ledger.jsonl"
    failures = tmp_path / "OUT" / "failures" / "night"
    deadline = time.monotonic() + 180
    # Wait until both Beam worker processes are up (forked warm, or started by Beam), let them work for a moment,
    # then kill everything.
    while _embed_workers(job.pid) < 2 or not ledger.exists():
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
    kills, finished_first = 0, 0
    while kills < 8:
        job = start()
        time.sleep(whole * rng.uniform(0.1, 0.6))  # later builds run warm, a little faster than the first
        if job.poll() is not None:  # done before its kill: the first build ran slow (a busy machine); aim earlier
            assert job.returncode == 0 and finished_first < 8, "builds keep finishing before their kill"
            whole, finished_first = whole * 0.6, finished_first + 1
            continue
        _kill_group(job)
        kills += 1
        for manifest in complete_snapshots(str(root)):  # whatever counts as complete passes its checks
            verify_snapshot(root / manifest["snapshot_id"], manifest)
    assert len(complete_snapshots(str(root))) == 1 + finished_first  # only the builds that were let finish
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


_CRASHING_WORKER = """
import signal, sys, threading
from pathlib import Path
from encoder import DecodeLimits, EncoderConfig, load_encoder
from encoder.gpu_images import GpuImages, pil_decoder
from pipelines.direct_embed import embed_files

model, culprit, journal, out, *paths = sys.argv[1:]
bad, pil = Path(culprit).read_bytes(), pil_decoder()

def decode(datas, device):  # a native GPU decoder that segfaults on one photo: in this thread, at once
    if any(bytes(data) == bad for data in datas):
        signal.pthread_kill(threading.get_ident(), signal.SIGSEGV)
    return pil(datas, device)

encoder = load_encoder(EncoderConfig(model=model, device="cpu"))
images = GpuImages(encoder.preprocess, "cpu", DecodeLimits(draft=False), decoder=decode)
embed_files(paths, encoder, images, out, batch_size=4, reader="threads", journal=journal)
"""


def test_a_gpu_decoder_that_crashes_on_one_photo_stops_one_run_not_every_rerun(tmp_path, tiny_model, tiny_encoder):
    """The worker dies in the GPU decoder (SIGSEGV, nothing to catch); the rerun decodes the batch it died with on the
    CPU (`encoder.decode_journal`) and embeds every photo, the culprit too: Pillow reads it."""
    from benchmarks.common import realistic_jpegs
    from encoder import DecodeLimits
    from encoder.gpu_images import GpuImages, pil_decoder
    from pipelines.direct_embed import embed_files

    paths = [str(p) for p in realistic_jpegs(tmp_path / "photos", 12, width=96)]
    culprit, journal = paths[6], tmp_path / "journal"
    died = subprocess.run([sys.executable, "-c", _CRASHING_WORKER, str(tiny_model), culprit, str(journal),
                           str(tmp_path / "first"), *paths], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert died.returncode == -signal.SIGSEGV, died.stderr[-2000:]

    given, pil = [], pil_decoder()

    def decode(datas, device):  # the same decoder, recording instead of crashing
        given.extend(bytes(data) for data in datas)
        return pil(datas, device)

    images = GpuImages(tiny_encoder.preprocess, "cpu", DecodeLimits(draft=False), decoder=decode)
    result = embed_files(paths, tiny_encoder, images, tmp_path / "again", batch_size=4, reader="threads",
                         journal=journal)  # fmt: skip
    assert (result.embedded, result.dead_lettered) == (12, 0)
    assert Path(culprit).read_bytes() not in given
    # The batches in flight at the crash (the culprit's, and the one before it, whose vectors were not taken yet)
    # went to the CPU threads; the rest, to the GPU decoder as before.
    assert 4 <= result.on_gpu <= 12 - 4
    assert len((journal / "suspects.txt").read_text().split()) == 12 - result.on_gpu
    assert list(journal.glob("journal-*")) == []  # the rerun ended every batch it began, and left no journal
