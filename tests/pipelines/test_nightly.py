"""The nightly chain: a full run, an incremental rerun, resume after a failure, the gate, the lock, the config."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from datetime import UTC, datetime, timedelta

import pyarrow.parquet as pq
import pytest

from encoder.run_lock import LockHeld
from evaluation.gate import GateFailed
from indexing.publish import read_latest
from indexing.snapshot import read_manifest
from pipelines.nightly import read_ledger, run_nightly
from pipelines.nightly_config import ConfigError, load_nightly_config

pytestmark = pytest.mark.slow

PASSING = ["ndcg@5>=baseline-1"]  # the tiny random model need not beat anything here: the chain is under test


def _config(tmp_path, demo_catalog, tiny_model, gates=PASSING, **top):
    text = {
        "catalog": str(demo_catalog.manifest), "model": str(tiny_model), "out": str(tmp_path / "out"),
        "interactions": str(demo_catalog.interactions),
        "index": {"index": "flat"}, "evaluate": {"gates": gates, "since_days": None, "min_queries": 10}, **top,
    }  # fmt: skip
    path = tmp_path / "nightly.json"  # JSON is YAML
    path.write_text(json.dumps(text))
    return load_nightly_config(str(path))


def _rows(run_dir) -> int:
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    return sum(pq.read_metadata(run_dir / s["path"]).num_rows for s in manifest["shards"])


def test_first_night_publishes_and_the_next_reuses(tmp_path, demo_catalog, tiny_model):
    cfg = _config(tmp_path, demo_catalog, tiny_model)
    first = run_nightly(cfg, "nightly-1")
    assert [s["step"] for s in first.steps] == ["embed", "index", "evaluate", "publish", "retention"]
    assert first.published == "nightly-1" == read_latest(f"{cfg.out}/snapshots").snapshot_id
    assert first.steps[0]["counts"]["embedded"] == 95
    assert first.steps[2]["outputs"]["baseline"] == "builtin:pixels"  # nothing published yet
    ledger = read_ledger(cfg.out, "nightly-1")
    assert [(r["step"], r["status"]) for r in ledger][-2:] == [("retention", "done"), ("run", "done")]

    second = run_nightly(cfg, "nightly-2")
    embed = second.steps[0]["counts"]
    assert (embed["embedded"], embed["reused"], embed["dead_lettered"]) == (0, 95, 5)
    assert first.steps[0]["counts"]["images_per_s"] > 0 and "images_per_s" not in embed  # none embedded: no rate
    assert second.steps[2]["outputs"]["baseline"].endswith("snapshots/nightly-1")
    assert read_latest(f"{cfg.out}/snapshots").snapshot_id == "nightly-2"


def test_a_failed_step_publishes_nothing_and_a_rerun_resumes(tmp_path, demo_catalog, tiny_model, monkeypatch):
    import indexing

    cfg = _config(tmp_path, demo_catalog, tiny_model)
    real = indexing.build_snapshot

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(indexing, "build_snapshot", crash)
    with pytest.raises(OSError, match="disk full"):
        run_nightly(cfg, "nightly-x")
    assert read_latest(f"{cfg.out}/snapshots") is None
    assert [(r["step"], r["status"]) for r in read_ledger(cfg.out, "nightly-x")][-2:] == [
        ("index", "started"), ("index", "failed")]  # fmt: skip

    monkeypatch.setattr(indexing, "build_snapshot", real)
    resumed = run_nightly(cfg, "nightly-x")
    assert resumed.steps[0].get("resumed") and not resumed.steps[1].get("resumed")
    assert resumed.published == "nightly-x"
    assert _rows(tmp_path / "out" / "embeddings" / "nightly-x") == 95  # embedded once, no duplicates


def test_a_losing_candidate_is_not_published(tmp_path, demo_catalog, tiny_model):
    cfg = _config(tmp_path, demo_catalog, tiny_model)
    run_nightly(cfg, "nightly-1")
    strict = _config(tmp_path, demo_catalog, tiny_model, gates=["ndcg@5>=baseline+1"])
    with pytest.raises(GateFailed, match=r"gate failed: ndcg@5>=baseline\+1"):
        run_nightly(strict, "nightly-2")
    assert read_latest(f"{cfg.out}/snapshots").snapshot_id == "nightly-1"
    assert read_ledger(cfg.out, "nightly-2")[-1]["status"] == "failed"


def test_a_catalog_cut_short_is_not_published_however_well_it_scores(tmp_path, demo_catalog, tiny_model):
    """The metrics compare the queries both snapshots hold: a catalog cut to 80 items by an upstream fault passes
    any gate on them. `evaluate.max_shrink` (10%) stops it; a rerun that allows the shrink publishes it."""
    from pipelines.catalog import read_catalog

    cfg = _config(tmp_path, demo_catalog, tiny_model)
    run_nightly(cfg, "nightly-1")
    pq.write_table(read_catalog(str(demo_catalog.manifest)).slice(0, 80), tmp_path / "short.parquet")
    short = _config(tmp_path, demo_catalog, tiny_model, catalog=str(tmp_path / "short.parquet"))
    with pytest.raises(GateFailed, match=r"snapshot nightly-2 holds 77 items, 18\.9% fewer than the published "
                                         r"nightly-1's 95 \(evaluate.max_shrink 0.1\); not published"):  # fmt: skip
        run_nightly(short, "nightly-2")
    assert read_latest(f"{cfg.out}/snapshots").snapshot_id == "nightly-1"
    assert [(r["step"], r["status"]) for r in read_ledger(cfg.out, "nightly-2")][-2:] == [
        ("evaluate", "started"), ("evaluate", "failed")]  # fmt: skip
    allowed = _config(tmp_path, demo_catalog, tiny_model, catalog=str(tmp_path / "short.parquet"),
                      evaluate={"gates": PASSING, "since_days": None, "max_shrink": 0.3, "min_queries": 10})  # fmt: skip
    assert run_nightly(allowed, "nightly-2").published == "nightly-2"


def test_a_gate_on_too_few_queries_publishes_nothing(tmp_path, demo_catalog, tiny_model):
    """Logs thinned upstream to a few clicks would pass or fail a candidate on noise: below `evaluate.min_queries`
    the night stops at the gate, saying where the other queries went; a rerun that accepts them publishes."""
    cfg = _config(tmp_path, demo_catalog, tiny_model)
    run_nightly(cfg, "nightly-1")
    logs = pq.read_table(demo_catalog.interactions)
    pq.write_table(logs.slice(0, 12), tmp_path / "thin.parquet")
    thin = _config(tmp_path, demo_catalog, tiny_model, interactions=str(tmp_path / "thin.parquet"),
                   evaluate={"gates": PASSING, "since_days": None, "min_queries": 20})  # fmt: skip
    with pytest.raises(GateFailed, match=r"the logs measured \d queries, fewer than evaluate.min_queries 20: too few "
                                         r"to judge snapshot nightly-2; not published \(the logs' rows 12"):  # fmt: skip
        run_nightly(thin, "nightly-2")
    assert read_latest(f"{cfg.out}/snapshots").snapshot_id == "nightly-1"
    assert read_ledger(cfg.out, "nightly-2")[-1]["step"] == "evaluate"
    enough = _config(tmp_path, demo_catalog, tiny_model, interactions=str(tmp_path / "thin.parquet"),
                     evaluate={"gates": PASSING, "since_days": None, "min_queries": 1})  # fmt: skip
    assert run_nightly(enough, "nightly-2").published == "nightly-2"


def test_a_reduce_the_model_cannot_take_is_refused_before_the_embed(tmp_path, demo_catalog, tiny_model):
    """`index.reduce` at or above the model's 128 dimensions failed at the index step, after a whole embed: it is
    read against the model's config.json before the run takes its lock."""
    for reduce in ("pca:128", "prefix:500"):
        cfg = _config(tmp_path, demo_catalog, tiny_model, index={"index": "flat", "reduce": reduce})
        with pytest.raises(ValueError, match=rf"index.reduce {reduce}: the model's vectors have 128 dimensions"):
            run_nightly(cfg, "nightly-1")
        assert not (tmp_path / "out").exists()  # no lock, no ledger, no embeddings
    cfg = _config(tmp_path, demo_catalog, tiny_model, index={"index": "flat", "reduce": "pca:16"})
    run_nightly(cfg, "nightly-1", until="index")
    assert read_manifest(f"{cfg.out}/snapshots", "nightly-1")["dim"] == 16


def test_a_rerun_that_changes_what_a_done_step_used_is_refused(tmp_path, demo_catalog, tiny_model, capsys,
                                                               monkeypatch):  # fmt: skip
    """A rerun under a run's id goes on from its done steps. One with another model (the default run id is the
    day's, so the same day's rerun resumes) would have evaluated and published the old model's snapshot as the new
    one's; another index setting, an index built with the old. A setting only later steps use may change."""
    cfg = _config(tmp_path, demo_catalog, tiny_model)
    run_nightly(cfg, "nightly-1", until="index")
    other_model = tmp_path / "other-model"
    shutil.copytree(tiny_model, other_model)
    with pytest.raises(ValueError, match=r"run nightly-1's embed step is done with other settings than this rerun's "
                                         rf"\(model '{re.escape(str(tiny_model))}' → '{re.escape(str(other_model))}'"
                                         r"\), and the rerun would go on from that step's output"):  # fmt: skip
        run_nightly(_config(tmp_path, demo_catalog, tiny_model, model=str(other_model)), "nightly-1")
    import pipelines.cli

    monkeypatch.setattr(pipelines.cli, "_setup_logging", lambda verbose: None)
    _config(tmp_path, demo_catalog, tiny_model)  # the file the command line reads
    assert pipelines.cli.main(["nightly", "--config", str(tmp_path / "nightly.json"), "--run-id", "nightly-1",
                               "--model", str(other_model)]) == 2  # fmt: skip
    said = capsys.readouterr().err
    assert said.startswith("error: run nightly-1's embed step is done") and "keeps its done steps" not in said
    with pytest.raises(ValueError, match=r"index step is done with other settings .*\(index.index 'flat' → 'hnsw'; "
                                         r"index.reduce None → 'pca:16'\)"):  # fmt: skip
        run_nightly(_config(tmp_path, demo_catalog, tiny_model, index={"index": "hnsw", "reduce": "pca:16"}),
                    "nightly-1")  # fmt: skip
    later = _config(tmp_path, demo_catalog, tiny_model, evaluate={"gates": PASSING, "since_days": None,
                                                                  "min_queries": 5, "bootstrap": 50})  # fmt: skip
    assert run_nightly(later, "nightly-1").published == "nightly-1"  # evaluate was still to run
    assert run_nightly(later, "nightly-1").published == "nightly-1"  # a finished run's rerun: reported
    with pytest.raises(ValueError, match="embed step is done with other settings"):  # not silently the old model's
        run_nightly(_config(tmp_path, demo_catalog, tiny_model, model=str(other_model)), "nightly-1")


def test_retention_deletes_the_embed_runs_no_kept_snapshot_was_built_from(tmp_path, demo_catalog, tiny_model):
    """Every night writes the whole catalog's vectors (~30 GB at 10M × 768) and none was ever deleted. Retention keeps
    the runs the kept snapshots were built from and the newest; a stray file, and a run without a manifest unless
    untouched for a week, stay."""
    import pyarrow as pa

    from pipelines.embed import EmbedConfig, run_embed

    cfg = _config(tmp_path, demo_catalog, tiny_model, keep=1)
    out = tmp_path / "out"
    run_nightly(cfg, "nightly-1")
    run_embed(EmbedConfig(catalog=str(demo_catalog.manifest), model=str(tiny_model), out=str(out), run_id="exp"))
    (out / "embeddings" / "killed").mkdir()  # an attempt without its manifest: its rerun clears it
    (out / "embeddings" / "abandoned" / ".writing").mkdir(parents=True)  # one nothing has touched for 8 days
    (out / "embeddings" / "abandoned" / ".writing" / "part-0.parquet").write_bytes(b"half a shard")
    os.utime(out / "embeddings" / "abandoned" / ".writing" / "part-0.parquet", (time.time() - 8 * 86400,) * 2)
    (out / "embeddings" / "notes.txt").write_text("a stray file")
    pq.write_table(pa.table({"x": [1]}), out / "failures" / "exp" / "extra.parquet")
    second = run_nightly(cfg, "nightly-2")
    assert second.steps[-1]["outputs"] == {
        "deleted": [],
        "runs_deleted": ["exp", "abandoned"],
    }  # LATEST, the one before
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == ["killed", "nightly-1", "nightly-2", "notes.txt"]
    third = run_nightly(cfg, "nightly-3")
    assert third.steps[-1]["outputs"] == {"deleted": ["nightly-1"], "runs_deleted": ["nightly-1"]}
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == ["killed", "nightly-2", "nightly-3", "notes.txt"]
    assert sorted(p.name for p in (out / "failures").iterdir()) == ["nightly-2", "nightly-3"]
    fourth = run_nightly(cfg, "nightly-4")  # reuses from the newest run, as ever
    assert fourth.steps[0]["counts"]["reused"] == 95 and fourth.steps[-1]["outputs"]["runs_deleted"] == ["nightly-2"]


def test_a_night_whose_images_are_gone_publishes_nothing(tmp_path, demo_catalog, tiny_model):
    import pyarrow as pa

    from pipelines.dead_letters import TooManyDeadLetters

    cfg = _config(tmp_path, demo_catalog, tiny_model)
    run_nightly(cfg, "nightly-1")
    moved = pq.read_table(demo_catalog.manifest)
    gone = [f"{tmp_path}/moved/{i}.jpg" for i in range(moved.num_rows)]
    pq.write_table(moved.set_column(moved.column_names.index("image_uri"), "image_uri", pa.array(gone)),
                   tmp_path / "moved.parquet")  # fmt: skip
    broken = _config(tmp_path, demo_catalog, tiny_model, catalog=str(tmp_path / "moved.parquet"))
    with pytest.raises(TooManyDeadLetters, match=r"100 of 100 items were dead-lettered .*fetch · not found 100"):
        run_nightly(broken, "nightly-2")
    assert read_latest(f"{cfg.out}/snapshots").snapshot_id == "nightly-1"  # yesterday's keeps being served
    assert [(r["step"], r["status"]) for r in read_ledger(cfg.out, "nightly-2")][-2:] == [
        ("embed", "started"), ("embed", "failed")]  # fmt: skip


def test_an_embed_attempt_killed_midway_leaves_nothing_counted_twice(tmp_path, demo_catalog, tiny_model):
    cfg = _config(tmp_path, demo_catalog, tiny_model)
    stale = tmp_path / "out" / "embeddings" / "nightly-k"
    stale.mkdir(parents=True)
    shutil.copy(demo_catalog.manifest, stale / "part-00000-of-00001.parquet")  # a shard of the killed attempt
    result = run_nightly(cfg, "nightly-k")
    assert result.steps[0]["counts"]["embedded"] == 95
    assert _rows(stale) == 95


def test_a_run_id_that_cannot_name_a_snapshot_is_refused_before_the_lock(tmp_path, demo_catalog, tiny_model):
    """A night's id names its embeddings, its ledger and its snapshot: `LATEST` would be a snapshot named like the
    root's pointer to the published one, found only at the index step before."""
    cfg = _config(tmp_path, demo_catalog, tiny_model)
    for run_id in ("LATEST", "../nightly", "nightly 1"):
        with pytest.raises(ValueError, match=f"run id {re.escape(repr(run_id))}: use letters, digits"):
            run_nightly(cfg, run_id)
    assert not (tmp_path / "out").exists()


def test_missing_interaction_logs_stop_a_run_before_it_embeds(tmp_path, demo_catalog, tiny_model):
    """They are read only at the evaluate step: a typo in their path cost the whole embed and index first. A task that
    stops before that step (an orchestrator's embed task) does not need them yet."""
    cfg = _config(tmp_path, demo_catalog, tiny_model, interactions=str(tmp_path / "nowhere.parquet"))
    with pytest.raises(
        FileNotFoundError, match="interaction log .*nowhere.parquet does not exist: the run would embed"
    ):
        run_nightly(cfg, "nightly-1")
    assert not (tmp_path / "out" / "embeddings").exists() and read_ledger(cfg.out, "nightly-1") == []
    assert run_nightly(cfg, "nightly-1", until="index").steps[-1]["step"] == "index"


def test_a_second_job_on_the_same_root_is_refused(tmp_path, demo_catalog, tiny_model):
    cfg = _config(tmp_path, demo_catalog, tiny_model)
    lock = tmp_path / "out" / "runs" / "LOCK"
    lock.parent.mkdir(parents=True)
    now = datetime.now(UTC)
    holder = {"run_id": "nightly-other", "host": socket.gethostname(), "pid": os.getpid(),
              "acquired_at": now.isoformat(), "expires_at": (now + timedelta(hours=1)).isoformat()}  # fmt: skip
    lock.write_text(json.dumps(holder))
    with pytest.raises(LockHeld, match="locked by run nightly-other"):
        run_nightly(cfg, "nightly-1")
    assert not (tmp_path / "out" / "embeddings").exists()  # refused before any work

    lock.write_text(json.dumps({**holder, "expires_at": (now - timedelta(minutes=1)).isoformat()}))
    assert run_nightly(cfg, "nightly-1").published == "nightly-1"  # an expired lock is taken over
    assert not lock.exists()  # and released at the end


@pytest.mark.parametrize(
    "text, message",
    [
        ("catalog: a\nmodel: b\nout: c\ninteractions: d\nkeeep: 3\n", r"unknown key\(s\) \['keeep'\]"),
        ("catalog: a\nmodel: b\nout: c\ninteractions: d\nindex: {bakend: faiss}\n", r"unknown key\(s\) \['bakend'\] in index"),
        ("catalog: a\nmodel: b\nout: c\n", "interactions required"),
        ("catalog: a\nmodel: b\nout: c\ninteractions: d\nevaluate: {gates: ['ndcg@5 > ']}\n", "evaluate"),
        ("catalog: a\nmodel: b\nout: c\ninteractions: d\nembed: {gpu_decoder: pil}\n",
         "embed: gpu_decoder must be auto, nvimgcodec or nvjpeg"),
        ("catalog: a\nmodel: b\nout: c\ninteractions: d\nembed: {batch_size: 0}\n", "embed: batch_size must be >= 1"),
        ("catalog: a\nmodel: b\nout: c\ninteractions: d\nembed: {max_dead_letters: 2}\n",
         "embed: max_dead_letters is a share of the items, 0 to 1"),
        ("catalog: a\nmodel: b\nout: c\ninteractions: d\nevaluate: {max_shrink: 1}\n",
         "evaluate.max_shrink is a share of the published items, 0 to 1"),
        ("catalog: a\nmodel: b\nout: c\ninteractions: d\nevaluate: {min_queries: 0}\n",
         "evaluate.min_queries must be >= 1"),
        ("catalog: a\nmodel: b\nout: c\ninteractions: d\nevaluate: {max_queries: 50}\n",
         "evaluate.max_queries 50 is below evaluate.min_queries 100"),
        ("- just\n- a list\n", "must be a mapping"),
        ("catalog: [unclosed\n", "not valid YAML"),
    ],
    ids=["top-typo", "section-typo", "missing", "bad-gate", "bad-decoder", "bad-batch", "bad-share", "bad-shrink",
         "bad-min-queries", "max-below-min", "not-mapping", "bad-yaml"],
)  # fmt: skip
def test_bad_configs_fail_before_any_work(tmp_path, text, message):
    path = tmp_path / "nightly.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_nightly_config(str(path))


def test_every_embed_option_but_the_run_s_own_is_a_nightly_setting():
    from dataclasses import fields

    from pipelines.embed import EmbedConfig
    from pipelines.nightly_config import EmbedSettings

    per_run = {"catalog", "model", "out", "run_id", "incremental", "previous", "reembed_since"}
    assert {f.name for f in fields(EmbedConfig)} - per_run == set(EmbedSettings().step_options())
    # with the same defaults: a night embeds as `lookalike embed` does unless its config says otherwise
    assert EmbedSettings().step_options() == {f.name: f.default for f in fields(EmbedConfig) if f.name not in per_run}


@pytest.mark.parametrize(
    "written, read", [("off", "off"), ("on", "on"), ("no", "off"), ('"off"', "off"), ("auto", "auto")]
)
def test_an_unquoted_on_or_off_is_the_switch_not_a_boolean(tmp_path, written, read):
    """YAML reads an unquoted `off` as false: for a switch with an auto it means "off", as written."""
    path = tmp_path / "nightly.yaml"
    path.write_text(f"catalog: a\nmodel: b\nout: c\ninteractions: d\nembed:\n  gpu_decode: {written}\n")
    assert load_nightly_config(str(path)).embed.gpu_decode == read


def test_a_switch_that_is_not_on_off_or_auto_is_still_an_error(tmp_path):
    path = tmp_path / "nightly.yaml"
    path.write_text("catalog: a\nmodel: b\nout: c\ninteractions: d\nembed: {gpu_decode: 1, draft: off}\n")
    with pytest.raises(ConfigError, match="gpu_decode must be a string, got int 1"):
        load_nightly_config(str(path))


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "nightly.yaml"
    path.write_text("catalog: a\nmodel: b\nout: c\ninteractions: d\nkeep: 3\nembed: {batch_size: 8}\n")
    cfg = load_nightly_config(str(path), model="m2", keep=None)
    assert (cfg.model, cfg.keep, cfg.embed.batch_size) == ("m2", 3, 8)
    with pytest.raises(ConfigError, match="does not exist"):
        load_nightly_config(str(tmp_path / "nope.yaml"))


def test_a_config_files_relative_paths_are_relative_to_its_folder(tmp_path, monkeypatch):
    """An orchestrator chooses a task's working directory (Airflow's BashOperator: a temporary one, which a relative
    `out` went away with), so the file's paths are read from its own folder; flags stay relative to the working
    directory, and a Hub id stays one."""
    (tmp_path / "jobs" / "encoder").mkdir(parents=True)
    path = tmp_path / "jobs" / "nightly.yaml"
    path.write_text("catalog: data/manifest.parquet\nmodel: google/siglip-base-patch16-224\nout: ../out\n"
                    "interactions: gs://logs/clicks.parquet\n")  # fmt: skip
    monkeypatch.chdir(tmp_path / "jobs" / "encoder")  # any working directory
    cfg = load_nightly_config(str(path))
    jobs = str(tmp_path / "jobs")
    assert (cfg.catalog, cfg.out) == (f"{jobs}/data/manifest.parquet", str(tmp_path / "out"))
    assert (cfg.model, cfg.interactions) == ("google/siglip-base-patch16-224", "gs://logs/clicks.parquet")
    path.write_text("catalog: /abs/m.parquet\nmodel: encoder\nout: o\ninteractions: i.parquet\n")
    assert load_nightly_config(str(path)).model == f"{jobs}/encoder"  # a folder beside the file
    assert load_nightly_config(str(path), out="here").out == "here"  # a flag: as given


def test_one_step_at_a_time_as_an_orchestrator_runs_it(tmp_path, demo_catalog, tiny_model):
    from pipelines.nightly import STEPS

    cfg = _config(tmp_path, demo_catalog, tiny_model)
    for step in STEPS:
        result = run_nightly(cfg, "nightly-s", until=step)
        assert result.steps[-1]["step"] == step and not result.steps[-1].get("resumed")
        assert all(s.get("resumed") for s in result.steps[:-1])  # earlier tasks' work is not redone
    assert result.published == "nightly-s"
    assert read_latest(f"{cfg.out}/snapshots").snapshot_id == "nightly-s"
    with pytest.raises(ValueError, match="unknown step 'embedd'"):
        run_nightly(cfg, "nightly-s", until="embedd")


def test_backfill_of_a_date_range_reencodes_only_those_items(tmp_path, demo_catalog, tiny_model):
    cfg = _config(tmp_path, demo_catalog, tiny_model)
    run_nightly(cfg, "nightly-1")
    manifest = pq.read_table(demo_catalog.manifest).to_pydict()
    since = datetime(2026, 7, 1, tzinfo=UTC)
    recent = {i for i, t in zip(manifest["item_id"], manifest["updated_at"], strict=True) if t >= since}
    expected = len(recent - set(demo_catalog.broken_item_ids))
    assert 0 < expected < 95

    result = run_nightly(cfg, "backfill-1", kind="backfill", reembed_since="2026-07-01")
    counts = result.steps[0]["counts"]
    assert (counts["embedded"], counts["reused"], counts["dead_lettered"]) == (expected, 95 - expected, 5)
    assert result.published == "backfill-1"


def test_a_backfill_reads_updated_at_as_text_and_refuses_numbers(tmp_path, demo_catalog, tiny_model, caplog):
    """A CSV catalog's `updated_at` is ISO text: read as times (it failed the run: Arrow's cast wants a zone). An
    item whose time does not read is not known to be recent: reused, and counted in the log. Numbers (seconds or
    milliseconds?) are refused: Arrow read them as microseconds since 1970, so nothing was re-encoded."""
    import pyarrow as pa

    from pipelines.catalog import CatalogError, read_catalog

    cfg = _config(tmp_path, demo_catalog, tiny_model)
    run_nightly(cfg, "nightly-1")
    manifest = read_catalog(str(demo_catalog.manifest))  # image URIs resolved: the copies live elsewhere
    since = datetime(2026, 7, 1, tzinfo=UTC)
    times = manifest.column("updated_at").to_pylist()
    unreadable = {i for i, t in enumerate(times) if t >= since}
    unreadable = set(sorted(unreadable)[:2])
    text = [("last week" if i in unreadable else t.strftime("%Y-%m-%d %H:%M:%S")) for i, t in enumerate(times)]
    pq.write_table(manifest.set_column(manifest.column_names.index("updated_at"), "updated_at", pa.array(text)),
                   tmp_path / "text.parquet")  # fmt: skip
    recent = {i for i, t in zip(manifest["item_id"].to_pylist(), times, strict=True) if t >= since}
    dropped = {manifest["item_id"][i].as_py() for i in unreadable}
    expected = len(recent - dropped - set(demo_catalog.broken_item_ids))

    text_cfg = _config(tmp_path, demo_catalog, tiny_model, catalog=str(tmp_path / "text.parquet"))
    with caplog.at_level("WARNING", logger="pipelines.embed"):
        counts = run_nightly(text_cfg, "backfill-1", kind="backfill", reembed_since="2026-07-01").steps[0]["counts"]
    assert counts["embedded"] == expected and counts["reused"] == 95 - expected
    assert "2 item(s) have no updated_at that reads as a time" in caplog.text

    seconds = [int(t.timestamp()) for t in times]
    pq.write_table(manifest.set_column(manifest.column_names.index("updated_at"), "updated_at", pa.array(seconds)),
                   tmp_path / "seconds.parquet")  # fmt: skip
    seconds_cfg = _config(tmp_path, demo_catalog, tiny_model, catalog=str(tmp_path / "seconds.parquet"))
    with pytest.raises(CatalogError, match="the catalog's updated_at must be timestamps, dates or ISO 8601 text, "
                                           "not int64"):  # fmt: skip
        run_nightly(seconds_cfg, "backfill-2", kind="backfill", reembed_since="2026-07-01")


_WITHOUT_TORCH_OR_BEAM = """
import sys

class Refuse:  # as if torch, Beam and transformers were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "apache_beam", "transformers"):
            raise ImportError(f"{name} is not installed here")

sys.meta_path.insert(0, Refuse())
from pipelines.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_steps_after_embed_run_where_torch_and_beam_are_not_installed(tmp_path, demo_catalog, tiny_model):
    """The Airflow DAG's tasks after the embed step (`--step index`, `evaluate`, `publish`, `retention`) check the
    config and do their work without torch, Beam or transformers: they could run in an image without them."""
    import subprocess
    import sys

    from pipelines.nightly import STEPS

    cfg = _config(tmp_path, demo_catalog, tiny_model)
    run_nightly(cfg, "nightly-t", until="embed")
    for step in STEPS[1:]:
        done = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH_OR_BEAM, "nightly", "--config",
                               str(tmp_path / "nightly.json"), "--run-id", "nightly-t", "--step", step],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
        assert done.returncode == 0, (step, done.stderr[-2000:])
    assert [r["step"] for r in read_ledger(cfg.out, "nightly-t") if r["status"] == "done"] == list(STEPS)
    assert read_latest(f"{cfg.out}/snapshots").snapshot_id == "nightly-t"
