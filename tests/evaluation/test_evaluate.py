"""Evaluation end to end on a demo catalog: independent recomputation, comparison, gates, records."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest

from evaluation.run import EvaluateConfig, run_evaluation
from indexing import SnapshotClient, SnapshotError, publish


def _independent_ndcg(client: SnapshotClient, logs: list[dict], k: int) -> float:
    """nDCG@k written out plainly: sum weights per pair, drop self-clicks, rank with the client."""
    rel: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    seen = set()
    for row in logs:
        key = tuple(row.values())
        if key in seen or row["query_item_id"] == row["clicked_item_id"]:
            continue
        seen.add(key)
        rel[row["query_item_id"]][row["clicked_item_id"]] += row["weight"]
    scores = []
    for query, clicked in rel.items():
        clicked = {i: w for i, w in clicked.items() if i in client}
        if query not in client or not clicked:
            continue
        ranked = [n.item_id for n in client.search(item_ids=[query], k=k)[0]]
        dcg = sum(clicked.get(item, 0.0) / math.log2(rank + 2) for rank, item in enumerate(ranked))
        ideal = sorted(clicked.values(), reverse=True)[:k]
        scores.append(dcg / sum(w / math.log2(rank + 2) for rank, w in enumerate(ideal)))
    return sum(scores) / len(scores)


def test_reported_ndcg_equals_an_independent_computation(snapshots, demo_catalog):
    root, exact, _ = snapshots
    doc = run_evaluation(EvaluateConfig(snapshot=str(root / exact), interactions=str(demo_catalog.interactions)))
    logs = pq.read_table(demo_catalog.interactions).to_pylist()
    expected = _independent_ndcg(SnapshotClient(str(root), snapshot_id=exact), logs, 5)
    assert abs(doc["metrics"][exact]["ndcg@5"] - expected) < 1e-9
    assert doc["counts"]["evaluated_queries"] > 30
    assert doc["counts"]["query_not_in_snapshot"] + doc["counts"]["clicks_not_in_snapshot"] > 0  # broken images


def test_comparison_with_confidence_intervals_and_report(snapshots, demo_catalog, tmp_path):
    root, exact, reduced = snapshots
    doc = run_evaluation(EvaluateConfig(
        snapshot=str(root / exact), interactions=str(demo_catalog.interactions), baseline=str(root / reduced),
        catalog=str(demo_catalog.manifest), out=str(tmp_path), bootstrap=300,
    ))  # fmt: skip
    ndcg = next(c for c in doc["comparisons"] if c["metric"] == "ndcg@5")
    assert ndcg["delta"] == pytest.approx(ndcg["candidate"] - ndcg["baseline"])
    assert ndcg["delta_ci"][0] <= ndcg["delta"] <= ndcg["delta_ci"][1]
    assert doc["per_category"] and sum(r["queries"] for r in doc["per_category"]) == doc["counts"]["evaluated_queries"]
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["metrics"] == doc["metrics"]
    page = (tmp_path / "report.html").read_text()
    assert "data:image/jpeg;base64," in page and "95% CI" in page and "by category" in page


def test_a_snapshot_against_itself_changes_nothing(snapshots, demo_catalog):
    root, exact, _ = snapshots
    doc = run_evaluation(EvaluateConfig(snapshot=str(root / exact), interactions=str(demo_catalog.interactions),
                                        baseline=str(root / exact), bootstrap=100))  # fmt: skip
    for c in doc["comparisons"]:
        assert c["delta"] == 0 and tuple(c["delta_ci"]) == (0.0, 0.0)


def test_builtin_pixel_baseline(snapshots, demo_catalog):
    root, exact, _ = snapshots
    doc = run_evaluation(EvaluateConfig(snapshot=str(root / exact), interactions=str(demo_catalog.interactions),
                                        baseline="builtin:pixels", catalog=str(demo_catalog.manifest), bootstrap=100))  # fmt: skip
    assert doc["baseline"] == "builtin:pixels"
    assert 0 <= doc["metrics"]["builtin:pixels"]["ndcg@5"] <= 1
    with pytest.raises(ValueError, match="needs --catalog"):
        EvaluateConfig(snapshot="s", interactions="i", baseline="builtin:pixels")


def test_the_baseline_and_the_reports_thumbnails_keep_to_the_embed_steps_bounds(tmp_path, demo_catalog):
    """A PNG of 120M pixels (a few kilobytes on disk) was decoded whole by each of the pixel baseline's threads (360
    MB apiece), and an image of any size read whole: now both are left out, as the embed step leaves them out."""
    from PIL import Image

    from encoder.configs import DecodeLimits
    from evaluation.baselines import PixelBaseline
    from evaluation.catalog import CatalogInfo, catalog_image

    Image.new("1", (12_000, 10_000)).save(tmp_path / "huge.png")
    photo = next(iter(sorted((demo_catalog.root / "images").glob("*.jpg"))))
    big = tmp_path / "big.jpg"
    big.write_bytes(photo.read_bytes() + b"\0" * DecodeLimits().max_bytes)
    with pytest.raises(ValueError, match="over 100,000,000 pixels"):
        catalog_image(str(tmp_path / "huge.png"), 64)
    with pytest.raises(ValueError, match="larger than max_bytes"):
        catalog_image(str(big), 64)
    uris = {"photo": str(photo), "huge": str(tmp_path / "huge.png"), "big": str(big)}
    assert PixelBaseline(CatalogInfo.from_dicts(titles={}, categories={}, image_uris=uris)).item_ids == ["photo"]


def test_the_pixel_baseline_refuses_a_catalog_it_would_read_for_hours(monkeypatch, demo_catalog):
    """`builtin:pixels` reads every catalog image on the evaluating machine: at a marketplace's scale, a first night
    spent hours there after its embed. Past `PIXELS_MAX_ITEMS` it is refused at once, saying what to do instead."""
    from evaluation import baselines
    from evaluation.catalog import read_catalog_info

    catalog = read_catalog_info(str(demo_catalog.manifest))
    monkeypatch.setattr(baselines, "PIXELS_MAX_ITEMS", len(catalog.images()) - 1)
    read = []
    monkeypatch.setattr(baselines, "catalog_image", lambda *args: read.append(args))
    with pytest.raises(ValueError, match=r"the catalog has 100 images, more than 99: builtin:pixels reads .*"
                                         r"evaluate.first_baseline: null"):  # fmt: skip
        baselines.PixelBaseline(catalog)
    assert not read  # refused before any image

    from evaluation.run import EvaluateConfig, run_evaluation

    monkeypatch.setattr("evaluation.catalog.CatalogInfo", None)  # nothing is built from the manifest
    cfg = EvaluateConfig(snapshot="unused", interactions=str(demo_catalog.interactions), baseline="builtin:pixels",
                         catalog=str(demo_catalog.manifest))  # fmt: skip
    with pytest.raises(ValueError, match=r"manifest.parquet has 100 items, more than 99: builtin:pixels reads"):
        run_evaluation(cfg)


def test_gates_records_and_publish_requirement(snapshots, demo_catalog, tmp_path):
    shared_root, exact, reduced = snapshots
    root = tmp_path / "root"  # a private copy: other tests leave evaluation records in the shared one
    shutil.copytree(shared_root, root, ignore=shutil.ignore_patterns("_evaluations", "LATEST*", ".LATEST*"))
    common = dict(interactions=str(demo_catalog.interactions), bootstrap=50)
    with pytest.raises(SnapshotError, match="no evaluation record"):
        publish(str(root), exact, require_evaluation=True)
    failing = run_evaluation(EvaluateConfig(snapshot=str(root / exact), gates=("ndcg@5>=1.1",), **common))
    assert failing["passed"] is False and failing["gates"][0]["threshold"] == 1.1
    with pytest.raises(SnapshotError, match="failed its evaluation gate"):
        publish(str(root), exact, require_evaluation=True)
    passing = run_evaluation(EvaluateConfig(snapshot=str(root / exact), baseline=str(root / reduced),
                                            gates=("ndcg@5>=baseline-1", "hit_rate@5>=0"), **common))  # fmt: skip
    assert passing["passed"] is True
    assert publish(str(root), exact, require_evaluation=True).snapshot_id == exact


@pytest.mark.parametrize(
    ("gate", "message"),
    [("ndcg@10>=0.1", "k=5"), ("ndcg>=0.1", "cannot read gate"), ("precision@5>=0.1", "cannot read gate")],
)
def test_bad_gates_fail_before_any_work(gate, message):
    with pytest.raises(ValueError, match=message):
        EvaluateConfig(snapshot="s", interactions="i", gates=(gate,))


def test_gate_against_a_missing_baseline(snapshots, demo_catalog):
    root, exact, _ = snapshots
    with pytest.raises(ValueError, match="no --baseline"):
        run_evaluation(EvaluateConfig(snapshot=str(root / exact), interactions=str(demo_catalog.interactions),
                                      gates=("ndcg@5>=baseline",)))  # fmt: skip


def test_nothing_measurable(snapshots, tmp_path):
    import pyarrow as pa

    root, exact, _ = snapshots
    pq.write_table(pa.table({"query_item_id": ["x"], "clicked_item_id": ["y"]}), tmp_path / "l.parquet")
    with pytest.raises(ValueError, match="no query can be measured"):
        run_evaluation(EvaluateConfig(snapshot=str(root / exact), interactions=str(tmp_path / "l.parquet")))


def test_bootstrap_is_seeded(snapshots, demo_catalog):
    root, exact, reduced = snapshots
    args = dict(snapshot=str(root / exact), interactions=str(demo_catalog.interactions), baseline=str(root / reduced),
                bootstrap=200, seed=3)  # fmt: skip
    a, b = run_evaluation(EvaluateConfig(**args)), run_evaluation(EvaluateConfig(**args))
    assert a["comparisons"] == b["comparisons"]
    assert np.isfinite(a["comparisons"][0]["delta_ci"]).all()


@pytest.mark.gcs
def test_snapshot_and_logs_on_gcs(gcs_emulator, gcs_bucket, snapshots, demo_catalog, tmp_path):
    from tests.conftest import upload_dir

    root, exact, _ = snapshots
    remote_root = upload_dir(gcs_emulator, root / exact, gcs_bucket, f"snapshots/{exact}").rsplit("/", 1)[0]
    gcs_emulator.bucket(gcs_bucket).blob("logs/interactions.parquet").upload_from_filename(
        str(demo_catalog.interactions)
    )
    remote = run_evaluation(EvaluateConfig(snapshot=f"{remote_root}/{exact}", bootstrap=20, gates=("hit_rate@5>=0",),
                                           interactions=f"gs://{gcs_bucket}/logs/interactions.parquet"))  # fmt: skip
    local = run_evaluation(EvaluateConfig(snapshot=str(root / exact), interactions=str(demo_catalog.interactions),
                                          bootstrap=20))  # fmt: skip
    assert remote["metrics"][exact] == local["metrics"][exact]
    assert gcs_emulator.bucket(gcs_bucket).blob(f"snapshots/_evaluations/{exact}.json").exists()


def test_a_catalog_column_that_is_not_text_is_refused_by_name(tmp_path):
    """The report's categories and titles are text; numbers are read as their digits, lists are refused by name
    (Arrow said only "Unsupported cast from list<element: int64> to utf8")."""
    import pyarrow as pa

    from evaluation.catalog import read_catalog_info

    pq.write_table(pa.table({"item_id": [7, 8], "category": [3, None]}), tmp_path / "c.parquet")
    assert read_catalog_info(str(tmp_path / "c.parquet")).categories_of(["7", "8", "9"]) == ["3", None, None]
    pq.write_table(pa.table({"item_id": ["a"], "category": [[1, 2]]}), tmp_path / "c.parquet")
    with pytest.raises(ValueError, match=r"c.parquet's category must be text, not list<element: int64>"):
        read_catalog_info(str(tmp_path / "c.parquet"))


def test_the_catalog_is_held_as_columns_and_answers_by_item_id(tmp_path):
    """Three dicts of a field per item took 913 MiB for 2M items; the columns and the ids' hashes answer the same."""
    import pyarrow as pa

    from evaluation.catalog import read_catalog_info

    pq.write_table(pa.table({
        "item_id": ["b", "a", "c", "b", None, "d"],
        "image_uri": ["b.jpg", "gs://x/a.jpg", "", "b2.jpg", "n.jpg", None],
        "title": ["Bee", "Ant", None, "Bee again", "nobody", "Dog"],
        "category": ["bugs", "bugs", None, "twice", "none", "pets"],
        "price": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
    }), tmp_path / "catalog.parquet")  # fmt: skip
    catalog = read_catalog_info(str(tmp_path / "catalog.parquet"))
    assert catalog.has_categories
    assert catalog.titles_of(["b", "c", "zz", "d"]) == ["Bee", None, None, "Dog"]
    assert catalog.categories_of(["a", "b", "c"]) == ["bugs", "bugs", None]
    assert catalog.image_uris_of(["a", "b", "c", "d"]) == ["gs://x/a.jpg", str(tmp_path / "b.jpg"), None, None]
    assert catalog.images() == [("a", "gs://x/a.jpg"), ("b", str(tmp_path / "b.jpg"))]  # b's first row; none for
    # an item without an image, nor for a row without an id
    pq.write_table(pa.table({"item_id": ["a"]}), tmp_path / "bare.parquet")
    assert not read_catalog_info(str(tmp_path / "bare.parquet")).has_categories
    pq.write_table(pa.table({"item_id": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    empty = read_catalog_info(str(tmp_path / "empty.parquet"))  # the report asks it of every item it shows
    assert empty.titles_of(["a", "b"]) == [None, None] and empty.images() == [] and not empty.has_categories


def _ranker(name: str, item_ids: list[str], seed: int):
    from evaluation.evaluate import VectorRanker

    vectors = np.random.default_rng(seed).standard_normal((len(item_ids), 8)).astype(np.float32)
    return VectorRanker(name, item_ids, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)), vectors


def test_every_query_is_measured_as_it_would_be_alone_on_the_queries_both_rankers_hold():
    """The queries, relevant sets and counts found in arrays for a million queries, against the rules written out
    one query at a time: brute-force neighbours, relevance cut to the items both rankers hold, `query_metrics`."""
    from evaluation.evaluate import evaluate
    from evaluation.logs import Judgments
    from evaluation.metrics import query_metrics

    rng = np.random.default_rng(0)
    names = [f"sku-{i}" for i in range(300)]
    candidate, cand_vectors = _ranker("candidate", names, 1)
    baseline, base_vectors = _ranker("baseline", names[:260], 2)  # the last 40 items: the candidate's alone
    asked = names + ["gone-1", "gone-2"]
    relevance = {str(q): {str(c): float(rng.integers(1, 4)) for c in rng.choice(asked, rng.integers(1, 5))}
                 for q in rng.choice(asked, 150, replace=False)}  # fmt: skip
    relevance = {q: {c: w for c, w in clicked.items() if c != q} or {"sku-0": 1.0} for q, clicked in relevance.items()}
    result = evaluate(Judgments.from_relevance(relevance, {"rows": 1}), [candidate, baseline], k=5, bootstrap=50)

    held = set(names[:260])
    expected_queries = sorted(q for q in relevance if q in held and held & set(relevance[q]))
    assert result.queries == expected_queries
    assert result.counts["query_not_in_snapshot"] == sum(q not in held for q in relevance)
    assert result.counts["clicks_not_in_snapshot"] == sum(c not in held for q in relevance if q in held
                                                          for c in relevance[q])  # fmt: skip
    assert result.counts["no_relevant_in_snapshot"] == sum(q in held and not held & set(relevance[q])
                                                           for q in relevance)  # fmt: skip
    for ranker, vectors, catalog in ((candidate, cand_vectors, names), (baseline, base_vectors, names[:260])):
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        for i, query in enumerate(result.queries):
            row = catalog.index(query)
            order = [r for r in np.argsort(-(unit @ unit[row]), kind="stable") if r != row][:5]
            assert result.ranking(ranker.name, i) == [catalog[r] for r in order]
            kept = {c: w for c, w in relevance[query].items() if c in held}
            assert result.relevant(i) == kept
            alone = query_metrics([catalog[r] for r in order], kept, 5)
            for metric, value in alone.items():
                assert result.per_query[ranker.name][metric][i] == pytest.approx(value, abs=1e-9)
    assert result.coverage["candidate"] == len({i for q in range(len(result.queries))
                                                for i in result.ranking("candidate", q)}) / 300  # fmt: skip


def test_the_bootstrap_resamples_the_queries_of_every_metric_together():
    from evaluation.evaluate import _bootstrap

    rng = np.random.default_rng(0)
    base = {"ndcg": rng.random(1000), "recall": np.zeros(1000)}
    shifted = {"ndcg": base["ndcg"] + 0.25, "recall": base["recall"]}
    intervals = _bootstrap(shifted, base, samples=200, seed=0)
    assert intervals["ndcg"][0] == pytest.approx((0.25, 0.25), abs=1e-12)  # every query 0.25 better: no spread
    assert intervals["recall"] == ((0.0, 0.0), None)  # nothing to be relative to
    low, high = intervals["ndcg"][1]
    assert low < 0.25 / base["ndcg"].mean() < high and high - low < 0.1
    assert _bootstrap(shifted, base, samples=200, seed=0) == intervals  # the seed repeats it
    assert _bootstrap(shifted, base, samples=200, seed=1) != intervals


def test_the_ranking_of_many_queries_says_how_far_it_has_got(monkeypatch, caplog):
    """A million queries take minutes: where no bar is drawn (an orchestrator's log), a line says how many are
    ranked, of how many."""
    from evaluation import evaluate as evaluate_module
    from evaluation.logs import Judgments

    names = [f"sku-{i}" for i in range(50)]
    rankers = [_ranker("candidate", names, 1)[0], _ranker("baseline", names, 2)[0]]
    judgments = Judgments.from_relevance({f"sku-{i}": {f"sku-{i + 1}": 1.0} for i in range(40)})
    monkeypatch.setattr(evaluate_module, "RANK_SLICE", 16)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    monkeypatch.setattr("encoder.throttled.time.monotonic", iter(range(0, 10_000, 100)).__next__)  # 100 s a call
    with caplog.at_level(logging.INFO, logger="evaluation.evaluate"):
        result = evaluate_module.evaluate(judgments, rankers, bootstrap=10)
    lines = [r.getMessage() for r in caplog.records if r.name == "evaluation.evaluate"]
    assert len(result.queries) == 40 and lines[0].startswith("ranking queries: 16/80 (20%)")
    assert lines[-1].startswith("ranking queries: 80/80 (100%)") and len(lines) == 6  # 16 + 16 + 8, twice


def test_a_snapshots_rankings_kept_by_its_gated_evaluation_spare_the_next_nights_searches(snapshots, demo_catalog,
                                                                                           tmp_path, caplog):  # fmt: skip
    """The next night's baseline is tonight's published candidate, judged on nearly the same queries: a gated
    evaluation keeps the candidate's top k beside its record, and an evaluation against it takes them rather than
    search again, with the same result. Rankings of another k, or unreadable ones, are searched again."""
    shared_root, exact, reduced = snapshots
    root = tmp_path / "root"
    shutil.copytree(shared_root, root, ignore=shutil.ignore_patterns("_evaluations", "LATEST*", ".LATEST*"))
    common = dict(interactions=str(demo_catalog.interactions), bootstrap=50)
    tonight = run_evaluation(EvaluateConfig(snapshot=str(root / exact), gates=("ndcg@5>=0",), **common))
    kept = root / "_evaluations" / f"{exact}.rankings.npz"
    assert kept.is_file() and tonight["rankings_reused"] == {exact: 0}

    def next_night(**changes) -> dict:
        cfg = dict(snapshot=str(root / reduced), baseline=str(root / exact), **common) | changes
        return run_evaluation(EvaluateConfig(**cfg))

    with caplog.at_level(logging.INFO, logger="evaluation.run"):
        reused = next_night()
    queries = reused["counts"]["evaluated_queries"]
    assert reused["rankings_reused"] == {reduced: 0, exact: queries} and "not searched again" in caplog.text
    kept.rename(tmp_path / "aside.npz")
    searched = next_night()
    assert searched["rankings_reused"] == {reduced: 0, exact: 0}
    assert searched["metrics"] == reused["metrics"] and searched["comparisons"] == reused["comparisons"]
    assert next_night(k=3)["rankings_reused"][exact] == 0  # kept at k=5
    kept.write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING, logger="evaluation.rankings"):
        assert next_night()["rankings_reused"][exact] == 0
    assert "ignoring the rankings" in caplog.text


def test_kept_rankings_answer_only_for_the_very_snapshot_that_made_them(tmp_path, caplog):
    from types import SimpleNamespace

    from evaluation.rankings import load_rankings, save_rankings

    snapshot = SimpleNamespace(snapshot_id="s1", item_ids=list(range(10)), manifest={"files": {"index.faiss": "aa"}})
    queries, neighbours = np.array([7, 2, 5]), np.array([[1, 2, 3, 4, 5], [0, 1, -1, -1, -1], [9, 8, 7, 6, 4]])
    save_rankings(str(tmp_path), snapshot, queries, neighbours, k=5)
    kept = load_rankings(str(tmp_path), snapshot, k=5)
    held, found = kept.lookup(np.array([5, 3, 7]))
    assert held.tolist() == [True, False, True] and found.tolist() == [[9, 8, 7, 6, 4], [1, 2, 3, 4, 5]]
    rebuilt = SimpleNamespace(**{**vars(snapshot), "manifest": {"files": {"index.faiss": "bb"}}})
    assert load_rankings(str(tmp_path), rebuilt, k=5) is None  # the same id, other files: never the other's answers
    smaller = SimpleNamespace(**{**vars(snapshot), "item_ids": list(range(8))})
    with caplog.at_level(logging.WARNING, logger="evaluation.rankings"):
        assert load_rankings(str(tmp_path), smaller, k=5) is None  # rows past the snapshot: refused, searched again
    assert "inconsistent" in caplog.text
    assert load_rankings(str(tmp_path / "elsewhere"), snapshot, k=5) is None
