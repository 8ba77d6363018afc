"""`lookalike evaluate` as a user runs it: the table, the report, and a failing gate's exit code."""

from __future__ import annotations

import json

from tests.pipelines.test_cli import _lookalike


def test_evaluate_and_gate(snapshots, demo_catalog, tmp_path):
    root, exact, reduced = snapshots
    ok = _lookalike("evaluate", "--snapshot", str(root / exact), "--interactions", str(demo_catalog.interactions),
                    "--baseline", str(root / reduced), "--catalog", str(demo_catalog.manifest), "--out", "EV",
                    "--gate", "ndcg@5>=baseline-1", "--bootstrap", "100", cwd=tmp_path)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "ndcg@5" in ok.stdout and "95% CI" in ok.stdout and "→ pass" in ok.stdout
    assert json.loads((tmp_path / "EV" / "metrics.json").read_text())["passed"] is True

    failing = _lookalike("evaluate", "--snapshot", str(root / exact), "--interactions", str(demo_catalog.interactions),
                         "--gate", "ndcg@5>=0.99", "--bootstrap", "10", "--max-queries", "7", "--out", "EV7",
                         cwd=tmp_path)  # fmt: skip
    assert failing.returncode == 1
    assert "gate failed: ndcg@5>=0.99 (ndcg@5 = " in failing.stderr and "Traceback" not in failing.stderr
    sampled = json.loads((tmp_path / "EV7" / "metrics.json").read_text())
    assert (
        sampled["max_queries"] == 7 and sampled["counts"]["queries"] == 7 and sampled["counts"]["queries_not_sampled"]
    )

    refused = _lookalike("publish", "--root", str(root), exact, "--require-evaluation", cwd=tmp_path)
    assert refused.returncode == 2 and "failed its evaluation gate" in refused.stderr


def test_evaluate_user_mistakes(snapshots, demo_catalog, tmp_path):
    root, exact, _ = snapshots
    for args, message in [
        (["--interactions", "nope.parquet"], "does not exist"),
        (["--interactions", str(demo_catalog.interactions), "--since", "yesterday"], "not an ISO 8601"),
        (["--interactions", str(demo_catalog.interactions), "--since", "2062-01-01"], "is in the future"),
        (["--interactions", str(demo_catalog.interactions), "--gate", "ndcg@5>>1"], "cannot read gate"),
        (["--interactions", str(demo_catalog.interactions), "--max-queries", "0"], "max_queries must be >= 1"),
    ]:
        result = _lookalike("evaluate", "--snapshot", str(root / exact), *args, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
