"""`lookalike evaluate`: metrics, comparison, gates, report, and the evaluation record for publish."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime

from encoder import storage
from evaluation import PIXELS, baselines
from evaluation.baselines import PixelBaseline
from evaluation.catalog import read_catalog_info
from evaluation.evaluate import EvalResult, SnapshotRanker, evaluate
from evaluation.gate import check, parse_gate, results_as_dicts, write_record
from evaluation.logs import read_judgments
from evaluation.rankings import load_rankings, save_rankings
from evaluation.report import per_category, render_report
from indexing.client import open_snapshot

__all__ = ["EvaluateConfig", "run_evaluation"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    """What to evaluate, against what, on which logs, and what must hold."""

    snapshot: str  # ROOT/<snapshot_id>, or ROOT for its LATEST
    interactions: str
    baseline: str | None = None  # another snapshot (same forms), or builtin:pixels
    catalog: str | None = None  # manifest: titles, categories, images (needed by builtin:pixels and the grids)
    out: str | None = None  # where metrics.json and report.html go
    k: int = 5
    since: datetime | None = None
    max_queries: int | None = None  # at most this many query items of the logs, chosen by a hash of their ids
    gates: tuple[str, ...] = ()
    bootstrap: int = 1000
    sample_queries: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1 or self.bootstrap < 1:
            raise ValueError(f"k and bootstrap must be >= 1, got {self.k}, {self.bootstrap}")
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {self.max_queries}")
        if self.baseline and self.baseline.startswith("builtin:") and self.baseline != PIXELS:
            raise ValueError(f"--baseline {self.baseline}: the built-in baseline is {PIXELS}")
        if self.baseline == PIXELS and not self.catalog:
            raise ValueError(f"--baseline {PIXELS} needs --catalog (the images to compute it from)")
        for gate in self.gates:
            parse_gate(gate, self.k)  # typos fail now, not after the evaluation
        for name in ("snapshot", "out"):
            if getattr(self, name):
                storage.check_location(getattr(self, name), name)


def _document(cfg: EvaluateConfig, result: EvalResult, names: list[str]) -> dict:
    return {
        "evaluated_at": datetime.now(UTC).isoformat(),
        "k": result.k,
        "interactions": cfg.interactions,
        "since": cfg.since.isoformat() if cfg.since else None,
        "max_queries": cfg.max_queries,
        "candidate": names[0],
        "baseline": names[1] if len(names) > 1 else None,
        "counts": result.counts,
        "metrics": {n: {f"{m}@{result.k}": result.mean(n, m) for m in result.per_query[n]} for n in names},
        "coverage": result.coverage,
        "comparisons": [c.__dict__ for c in result.comparisons],
    }


def _snapshot_ranker(root: str, client, k: int) -> SnapshotRanker:
    """The snapshot as a ranker, with the rankings a gated evaluation of it kept, if any."""
    return SnapshotRanker(client, remembered=load_rankings(root, client.loaded, k))


def run_evaluation(cfg: EvaluateConfig) -> dict:
    """Evaluate, compare, check gates, write metrics.json + report.html (with `out`) and the record.

    Returns:
        The metrics document; `passed` says whether every gate held.

    Raises:
        LogError: unusable logs. SnapshotError: unusable snapshot. ValueError: nothing measurable.
    """
    if cfg.baseline == PIXELS:  # too large a catalog is refused on its row count, before the logs or the snapshot
        catalog = read_catalog_info(cfg.catalog, baselines.PIXELS_MAX_ITEMS, baselines.TOO_MANY_FOR_PIXELS)
    else:
        catalog = read_catalog_info(cfg.catalog) if cfg.catalog else None
    judgments = read_judgments(cfg.interactions, cfg.since, cfg.max_queries)
    root, client = open_snapshot(cfg.snapshot)
    rankers = [_snapshot_ranker(root, client, cfg.k)]
    if cfg.baseline == PIXELS:
        rankers.append(PixelBaseline(catalog))
    elif cfg.baseline:
        rankers.append(_snapshot_ranker(*open_snapshot(cfg.baseline), cfg.k))
    if len(rankers) == 2 and rankers[0].name == rankers[1].name:
        rankers[1].name += " (baseline)"
    result = evaluate(judgments, rankers, k=cfg.k, bootstrap=cfg.bootstrap, seed=cfg.seed)
    names = [r.name for r in rankers]
    doc = _document(cfg, result, names)
    doc["rankings_reused"] = {r.name: r.reused for r in rankers if isinstance(r, SnapshotRanker)}
    for name, reused in doc["rankings_reused"].items():
        if reused:
            log.info("%s: %d of the %d queries' top %d taken from the rankings an earlier evaluation kept, not "
                     "searched again", name, reused, len(result.queries), cfg.k)  # fmt: skip
    if catalog and catalog.has_categories:
        doc["per_category"] = per_category(result, catalog)
    baseline_means = doc["metrics"][names[1]] if len(names) > 1 else {}
    gates = [parse_gate(g, cfg.k) for g in cfg.gates]
    results = [check(g, doc["metrics"][names[0]][g.metric], baseline_means.get(g.metric)) for g in gates]
    doc["gates"] = results_as_dicts(results)
    doc["passed"] = all(r.passed for r in results)
    if cfg.out:
        storage.write_bytes(storage.join(cfg.out, "metrics.json"), json.dumps(doc, indent=2).encode())
        page = render_report(result, doc, catalog, cfg.sample_queries, cfg.seed)
        storage.write_bytes(storage.join(cfg.out, "report.html"), page.encode())
        doc["report"] = (
            storage.join(cfg.out, "report.html")
            if storage.is_gcs(cfg.out)
            else os.path.abspath(os.path.join(cfg.out, "report.html"))
        )
    if gates:  # the record `publish --require-evaluation` looks for, and the rankings a later night's reuses
        write_record(root, client.snapshot_id, {"snapshot_id": client.snapshot_id, "passed": doc["passed"],
                                                "gates": doc["gates"], "metrics": doc["metrics"],
                                                "evaluated_at": doc["evaluated_at"]})  # fmt: skip
        save_rankings(root, rankers[0].snapshot, *result.query_rows_and_rankings(names[0]), cfg.k)
    log.info("evaluated %s on %d queries: %s", " against ".join(names), len(result.queries), "; ".join(
        f"{name} " + ", ".join(f"{metric} {value:.4f}" for metric, value in doc["metrics"][name].items())
        for name in names))  # fmt: skip
    return doc
