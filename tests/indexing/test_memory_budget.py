"""`lookalike index --memory-budget` keeps the whole build process's anonymous memory under the budget."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks.common import run_watching_memory
from tests.indexing.conftest import clustered, write_run

_LOOKALIKE = str(Path(sys.executable).with_name("lookalike"))


@pytest.fixture(scope="module")
def big_run(tmp_path_factory) -> str:
    # 140 MiB of vectors: twice that is over the budget below, so the build goes to disk in parts.
    vectors = clustered(140_000, 256, clusters=1_400, spread=0.5)
    return write_run(tmp_path_factory.mktemp("big") / "20260101T000000Z-bigrun", vectors, shards=2)


def test_the_build_stays_under_its_budget(big_run, tmp_path):
    budget = 240 << 20
    cmd = [_LOOKALIKE, "index", "--embeddings", big_run, "--out", str(tmp_path), "--memory-budget", "240MiB"]
    _, peak_anon, _, _ = run_watching_memory(cmd, interval=0.01)
    (snapshot,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    manifest = json.loads((snapshot / "manifest.json").read_text())
    assert manifest["index"]["on_disk"] and manifest["index"]["parts"] > 1
    assert manifest["memory"]["budget"] == budget and manifest["count"] == 140_000
    assert peak_anon <= budget, f"peak RssAnon {peak_anon >> 20} MiB over the {budget >> 20} MiB budget"


def test_a_budget_below_what_a_build_needs_is_refused_with_the_minimum(big_run, tmp_path):
    with pytest.raises(RuntimeError, match=r"exited 2: error: --memory-budget 64 MiB is too small.*give at least"):
        run_watching_memory([_LOOKALIKE, "index", "--embeddings", big_run, "--out", str(tmp_path),
                             "--memory-budget", "64MiB"])  # fmt: skip
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
