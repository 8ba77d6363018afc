"""A demo catalog embedded with the tiny model and indexed twice (exact, and PCA-reduced), for evaluation tests."""

from __future__ import annotations

import pytest

from indexing import IndexConfig, build_snapshot
from pipelines.embed import EmbedConfig, run_embed


@pytest.fixture(scope="session")
def snapshots(demo_catalog, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    run = run_embed(EmbedConfig(catalog=str(demo_catalog.manifest), model=str(tiny_model), out=str(out / "emb")))
    root = out / "snapshots"
    exact = build_snapshot(run.run_dir, str(root), IndexConfig(queries=50))["snapshot_id"]
    reduced = build_snapshot(run.run_dir, str(root), IndexConfig(queries=50, reduce="pca:8", min_recall=0.1))[
        "snapshot_id"
    ]
    return root, exact, reduced
