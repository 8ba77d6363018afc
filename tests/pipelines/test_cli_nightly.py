"""`lookalike nightly` and `lookalike backfill` from a shell: summary, resume, exit codes."""

from __future__ import annotations

import json

import pytest

from tests.pipelines.test_cli import _lookalike

pytestmark = pytest.mark.slow


def _write_config(tmp_path, demo_catalog, tiny_model, gates: list[str]) -> str:
    config = {"catalog": str(demo_catalog.manifest), "model": str(tiny_model), "out": "OUT",
              "interactions": str(demo_catalog.interactions), "index": {"index": "flat"},
              "evaluate": {"gates": gates, "since_days": None, "min_queries": 10}}  # fmt: skip
    (tmp_path / "nightly.yaml").write_text(json.dumps(config))
    return "nightly.yaml"


def test_nightly_then_backfill_then_a_losing_backfill(tmp_path, demo_catalog, tiny_model):
    config = _write_config(tmp_path, demo_catalog, tiny_model, ["ndcg@5>=baseline-1"])
    night = _lookalike("nightly", "--config", config, "--run-id", "nightly-1", cwd=tmp_path)
    assert night.returncode == 0, night.stderr[-2000:]
    assert "published nightly-1" in night.stdout and "embedded 95" in night.stdout

    again = _lookalike("nightly", "--config", config, "--run-id", "nightly-1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("resumed (done earlier)") == 5  # a finished night is not redone

    backfill = _lookalike("backfill", "--config", config, "--model", str(tiny_model), "--run-id", "backfill-1",
                          cwd=tmp_path)  # fmt: skip
    assert backfill.returncode == 0, backfill.stderr[-2000:]
    assert "embedded 95" in backfill.stdout and "reused 0" in backfill.stdout  # everything afresh
    assert "published backfill-1" in backfill.stdout

    strict = _write_config(tmp_path, demo_catalog, tiny_model, ["ndcg@5>=baseline+1"])
    lost = _lookalike("backfill", "--config", strict, "--model", str(tiny_model), "--run-id", "backfill-2",
                      cwd=tmp_path)  # fmt: skip
    assert lost.returncode == 1 and "gate failed" in lost.stderr and "Traceback" not in lost.stderr
    assert lost.stderr.rstrip().endswith("run backfill-2 keeps its done steps (embed, index): go on from them with "
                                         "the same command and --run-id backfill-2")  # fmt: skip
    latest = json.loads((tmp_path / "OUT" / "snapshots" / "LATEST").read_text())
    assert latest["snapshot_id"] == "backfill-1"


def test_nightly_config_mistakes_exit_2(tmp_path):
    (tmp_path / "bad.yaml").write_text("catalog: a\nmodel: b\nout: c\ninteractions: d\nembed: {batch: 8}\n")
    result = _lookalike("nightly", "--config", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "unknown key(s) ['batch'] in embed" in result.stderr
    assert "Traceback" not in result.stderr


def test_killed_mid_run_then_rerun_completes_without_duplicates(tmp_path, demo_catalog, tiny_model):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import pyarrow.parquet as pq

    config = _write_config(tmp_path, demo_catalog, tiny_model, ["ndcg@5>=baseline-1"])
    exe = Path(sys.executable).with_name("lookalike")
    job = subprocess.Popen([str(exe), "nightly", "--config", config, "--run-id", "nightly-k"], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    ledger = tmp_path / "OUT" / "runs" / "nightly-k" / "ledger.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and '"embed", "status": "started"' not in (
        ledger.read_text() if ledger.exists() else ""
    ):
        time.sleep(0.01)
    os.kill(job.pid, signal.SIGKILL)  # inside the embed step, which takes ~0.5 s here: the model's load or Beam's run
    job.wait(timeout=30)
    assert '"step": "embed", "status": "done"' not in ledger.read_text(), "killed too late to prove anything"
    assert (tmp_path / "OUT" / "runs" / "LOCK").exists()  # a dead job's lock is left behind ...

    rerun = _lookalike("nightly", "--config", config, "--run-id", "nightly-k", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]  # ... and taken over: its process is gone
    assert "published nightly-k" in rerun.stdout
    run = tmp_path / "OUT" / "embeddings" / "nightly-k"
    manifest = json.loads((run / "_manifest.json").read_text())
    ids = [i for s in manifest["shards"] for i in pq.read_table(run / s["path"]).column("item_id").to_pylist()]
    assert len(ids) == len(set(ids)) == 95
    files = {p.name for p in run.glob("*.parquet")}
    assert files == {s["path"] for s in manifest["shards"]}  # no shard of the killed attempt left over
