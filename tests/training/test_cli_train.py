"""`lookalike train` from a shell: the summary, the exported encoder feeding `lookalike embed`, one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.pipelines.test_cli import _lookalike


@pytest.mark.slow
def test_train_then_embed_with_the_exported_encoder(tmp_path, demo_catalog, tiny_model):
    trained = _lookalike(
        "train", "--catalog", str(demo_catalog.manifest), "--model", str(tiny_model), "--out", "T", "--epochs", "1",
        "--batch-size", "16", "--lr", "1e-3", "--workers", "1", "--interactions", str(demo_catalog.interactions),
        cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "skipped: broken image" in trained.stdout and "val recall@1" in trained.stdout
    report = json.loads((tmp_path / "T" / "report.json").read_text())
    assert report["model_version"] in trained.stdout

    embedded = _lookalike("embed", "--catalog", str(demo_catalog.manifest), "--model", "T/encoder", "--out", "E",
                          cwd=tmp_path)  # fmt: skip
    assert embedded.returncode == 0, embedded.stderr[-2000:]
    run = next((tmp_path / "E" / "embeddings").iterdir())
    assert json.loads((run / "_manifest.json").read_text())["model_version"] == report["model_version"]


def test_train_mistakes_get_one_clear_line(tmp_path, demo_catalog, tiny_model):
    table = pq.read_table(demo_catalog.manifest).drop_columns(["title"])
    pq.write_table(table, tmp_path / "untitled.parquet")
    cases = [
        (["--catalog", "untitled.parquet"], "lacks column(s) ['title']"),
        (["--catalog", str(demo_catalog.manifest), "--resume"], "no complete checkpoint"),
        (["--catalog", str(demo_catalog.manifest), "--batch-size", "1"], "batch_size must be >= 2"),
        (["--catalog", str(demo_catalog.manifest), "--out", "s3://b/t"], "in a local folder or on gs://, not s3://"),
    ]
    for args, message in cases:
        result = _lookalike("train", "--model", str(tiny_model), "--out", "T", *args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr


def test_sigterm_to_the_whole_process_group_stops_with_a_checkpoint(tmp_path, demo_catalog, tiny_model):
    """A VM shutting down signals every process: the data-loading processes too, whose death failed the loop's next
    step (exit 1, no checkpoint) before it could stop. They now leave the stop to the loop: exit 143, a checkpoint."""
    exe = Path(sys.executable).with_name("lookalike")
    run = subprocess.Popen(
        [str(exe), "train", "--catalog", str(demo_catalog.manifest), "--model", str(tiny_model), "--out", "T",
         "--epochs", "50", "--batch-size", "16", "--lr", "1e-3", "--workers", "1", "--cache-mb", "0",
         "--log-every", "1", "--auto-resume"],  # on an empty OUT: a start
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    metrics = tmp_path / "T" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        assert run.poll() is None, run.communicate()[1][-2000:]
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM after step" in err and "Traceback" not in err and "resuming" not in err
    step = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert (tmp_path / "T" / "checkpoints" / f"step-{step:08d}" / "trainer.json").is_file()
