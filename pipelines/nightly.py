"""The nightly job: embed (incremental) → index → evaluate against what is published → gate → publish → retention.

One run id ties every output together (`OUT/embeddings/<run_id>`, `OUT/snapshots/<run_id>`,
`OUT/runs/<run_id>/`). Each step's outcome is appended to the run's ledger,
`OUT/runs/<run_id>/ledger.jsonl`; a rerun of the same run id skips the steps the ledger
marks done and picks up their outputs, so a run killed half-way completes without
redoing (or duplicating) anything. A failing step stops the chain; nothing is published
unless the gate passed, and the snapshot already published keeps being served.
A backfill is the same chain with a fresh run id, a given model and no vector reuse.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta

from encoder import storage
from encoder.run_lock import run_lock
from pipelines.ledger import Ledger, default_run_id, read_ledger
from pipelines.nightly_config import PIXELS, NightlyConfig

__all__ = ["STEPS", "NightlyResult", "default_run_id", "read_ledger", "run_nightly"]

log = logging.getLogger(__name__)

STEPS = ("embed", "index", "evaluate", "publish", "retention")


@dataclass
class NightlyResult:
    run_id: str
    steps: list[dict] = field(default_factory=list)  # the ledger's final row per step
    published: str | None = None


@dataclass(frozen=True)
class _Context:
    cfg: NightlyConfig
    run_id: str
    incremental: bool
    beam_args: tuple[str, ...]
    reembed_since: str | None = None

    @property
    def snapshots(self) -> str:
        return storage.join(self.cfg.out, "snapshots")


def _embed(ctx: _Context, outputs: dict) -> tuple[dict, dict]:
    from pipelines.embed import EmbedConfig, run_embed
    from pipelines.embed_runs import MANIFEST_NAME

    run_dir = storage.join(ctx.cfg.out, "embeddings", ctx.run_id)
    existing = storage.join(run_dir, MANIFEST_NAME)
    if storage.exists(existing):  # finished before the ledger heard of it (killed in between)
        manifest = json.loads(storage.read_bytes(existing))
    else:
        cfg = EmbedConfig(catalog=ctx.cfg.catalog, model=ctx.cfg.model, out=ctx.cfg.out, run_id=ctx.run_id,
                          incremental=ctx.incremental, reembed_since=ctx.reembed_since,
                          **ctx.cfg.embed.step_options())  # fmt: skip
        manifest = run_embed(cfg, beam_args=[*ctx.cfg.embed.beam_args, *ctx.beam_args]).manifest
    counts = {**manifest["counts"], "images_per_s": manifest["images_per_s"]}
    if not counts.get("embedded"):  # every vector reused: no rate to show (a 0 read as a stall)
        del counts["images_per_s"]
    return counts, {"run_dir": run_dir, "model_version": manifest["model_version"]}


def _index(ctx: _Context, outputs: dict) -> tuple[dict, dict]:
    from indexing import build_snapshot
    from indexing.snapshot import read_manifest

    try:
        manifest = read_manifest(ctx.snapshots, ctx.run_id)  # built before the ledger heard of it
    except ValueError:
        manifest = build_snapshot(outputs["embed"]["run_dir"], ctx.snapshots, ctx.cfg.index, snapshot_id=ctx.run_id)
    quality = manifest.get("quality", {})
    counts = {"vectors": manifest.get("count"), "recall_at_10": quality.get("recall_at_10")}
    return counts, {"snapshot": storage.join(ctx.snapshots, ctx.run_id), "index": manifest.get("index")}


def _evaluate(ctx: _Context, outputs: dict) -> tuple[dict, dict]:
    from evaluation.gate import raise_if_failed
    from evaluation.run import EvaluateConfig, run_evaluation
    from indexing.publish import read_latest

    settings = ctx.cfg.evaluate
    latest = read_latest(ctx.snapshots)
    published = latest.snapshot_id if latest and latest.snapshot_id != ctx.run_id else None
    if published and settings.max_shrink is not None:
        _refuse_a_shrink(ctx, published, settings.max_shrink)
    baseline = storage.join(ctx.snapshots, published) if published else settings.first_baseline
    since = datetime.now(UTC) - timedelta(days=settings.since_days) if settings.since_days else None
    out = storage.join(ctx.cfg.out, "runs", ctx.run_id, "evaluation")
    doc = run_evaluation(EvaluateConfig(
        snapshot=outputs["index"]["snapshot"], interactions=ctx.cfg.interactions, baseline=baseline,
        catalog=ctx.cfg.catalog if baseline == PIXELS else None, out=out, k=settings.k,
        since=since, gates=settings.gates if baseline else (), bootstrap=settings.bootstrap,
        max_queries=settings.max_queries,
    ))  # fmt: skip
    k = settings.k
    metrics = doc["metrics"]
    counts = {f"ndcg@{k}": metrics[doc["candidate"]][f"ndcg@{k}"], "queries": doc["counts"]["evaluated_queries"]}
    if doc["baseline"]:
        counts[f"baseline_ndcg@{k}"] = metrics[doc["baseline"]][f"ndcg@{k}"]
    if doc.get("gates"):
        _refuse_too_few_queries(ctx, doc, settings.min_queries)
    raise_if_failed(doc)  # nothing is published; LATEST keeps serving the snapshot it names
    return counts, {"report": doc.get("report"), "baseline": baseline, "passed": doc["passed"]}


def _refuse_a_shrink(ctx: _Context, published: str, max_shrink: float) -> None:
    """Stop a candidate with more than `max_shrink` fewer items than the published snapshot: the metrics compare only
    the queries both hold, so a catalog cut short upstream would pass the gate and be served."""
    from evaluation.gate import GateFailed
    from indexing.snapshot import read_manifest

    now, before = read_manifest(ctx.snapshots, ctx.run_id)["count"], read_manifest(ctx.snapshots, published)["count"]
    if now < (1 - max_shrink) * before:
        raise GateFailed(
            f"snapshot {ctx.run_id} holds {now:,} items, {1 - now / before:.1%} fewer than the published {published}'s "
            f"{before:,} (evaluate.max_shrink {max_shrink:g}); not published. If the catalog did shrink, publish it "
            f"by hand (lookalike publish --root {ctx.snapshots} {ctx.run_id}) or raise evaluate.max_shrink"
        )


def _refuse_too_few_queries(ctx: _Context, doc: dict, min_queries: int) -> None:
    """Stop a candidate whose gates were judged on fewer than `min_queries` queries, with the counts that say where
    the others went (logs before `since_days`, queries or clicks not in the snapshots, bad rows)."""
    from evaluation.evaluate import left_out
    from evaluation.gate import GateFailed

    counts = doc["counts"]
    measured = counts["evaluated_queries"]
    if measured < min_queries:
        dropped = left_out(counts)
        raise GateFailed(
            f"the logs measured {measured:,} queries, fewer than evaluate.min_queries {min_queries:,}: too few to "
            f"judge snapshot {ctx.run_id}; not published (the logs' rows {counts.get('rows', 0):,}{', ' * bool(dropped)}{dropped}). "
            f"If the logs are right, publish it by hand "
            f"(lookalike publish --root {ctx.snapshots} {ctx.run_id}) or lower evaluate.min_queries"
        )


def _publish(ctx: _Context, outputs: dict) -> tuple[dict, dict]:
    from indexing import publish
    from indexing.publish import read_latest

    latest = read_latest(ctx.snapshots)
    if latest is None or latest.snapshot_id != ctx.run_id:
        # A gated run has an evaluation record; an ungated first night (first_baseline: null) has none.
        latest = publish(ctx.snapshots, ctx.run_id, require_evaluation=bool(outputs["evaluate"]["baseline"]))
    return {}, {"latest": latest.snapshot_id, "previous": latest.history[0] if latest.history else None}


def _retention(ctx: _Context, outputs: dict) -> tuple[dict, dict]:
    from indexing import retain
    from indexing.publish import complete_snapshots
    from pipelines.embed_runs import retain_runs

    deleted = retain(ctx.snapshots, ctx.cfg.keep)
    used = {run["run_id"] for m in complete_snapshots(ctx.snapshots) for run in m.get("source_runs", [])}
    runs = retain_runs(ctx.cfg.out, used | {ctx.run_id})
    return {"deleted": len(deleted), "runs_deleted": len(runs)}, {"deleted": deleted, "runs_deleted": runs}


_RUNNERS: dict[str, Callable[[_Context, dict], tuple[dict, dict]]] = {
    "embed": _embed, "index": _index, "evaluate": _evaluate, "publish": _publish, "retention": _retention,
}  # fmt: skip


def run_nightly(cfg: NightlyConfig, run_id: str | None = None, *, incremental: bool = True,
                beam_args: list[str] | None = None, on_step: Callable[[dict], None] | None = None,
                kind: str = "nightly", until: str | None = None,
                reembed_since: str | None = None) -> NightlyResult:  # fmt: skip
    """Run (or resume) the chain for `run_id` (default: tonight's) under an exclusive lock on `cfg.out`.

    `reembed_since` (ISO date, with `incremental`): items updated on or after it are encoded
    afresh even where an earlier vector of the same model exists (a backfill of a date range).
    `until` stops after that step (done or skipped as done), so an orchestrator can run one
    step per task: each task runs the chain up to its step, which does only that step once
    the earlier tasks have succeeded.

    Raises:
        LockHeld: another job runs on the same output root.
        FileNotFoundError: the interaction logs are missing where this run is to evaluate (before any step).
        ValueError: `index.reduce` keeps as many dimensions as the model's vectors have, or more (before any step).
        evaluation.gate.GateFailed: the candidate lost to the published snapshot (nothing published).
        Anything a step raises (after recording it in the ledger as failed).
    """
    from evaluation.logs import log_files  # a file, a glob or a folder of them

    if until is not None and until not in STEPS:
        raise ValueError(f"unknown step {until!r}; steps: {', '.join(STEPS)}")
    run_id = storage.check_id(run_id or default_run_id(kind), "run id")  # its embeddings', ledger's, snapshot's
    ctx = _Context(cfg, run_id, incremental, tuple(beam_args or ()), reembed_since)
    steps = STEPS[: STEPS.index(until) + 1] if until else STEPS
    if "index" in steps:
        _refuse_a_reduce_past_the_model(cfg)
    with run_lock(cfg.out, run_id, cfg.lock_ttl_h):
        ledger = Ledger(cfg.out, run_id)
        if "evaluate" in steps and not ledger.done("evaluate") and not log_files(cfg.interactions):
            raise FileNotFoundError(f"interaction log {cfg.interactions} does not exist: the run would embed and "
                                    "index, then stop at its evaluate step")  # fmt: skip
        if not ledger.rows:
            ledger.add({"step": "run", "status": "started", "kind": kind, "config": _config_dict(cfg)})
        else:
            _refuse_a_changed_input(ledger, cfg, run_id)
        outputs: dict[str, dict] = {}
        result = NightlyResult(run_id)
        for step in STEPS:
            done = ledger.done(step)
            if done:
                log.info("%s: %s already done at %s; skipped", run_id, step, done["at"])
                outputs[step] = done["outputs"]
                result.steps.append({**done, "resumed": True})
            else:
                result.steps.append(_run_step(ctx, ledger, step, outputs, on_step))
            result.published = outputs.get("publish", {}).get("latest")
            if step == until:
                return result
        ledger.add({"step": "run", "status": "done"})
        return result


def _refuse_a_reduce_past_the_model(cfg: NightlyConfig) -> None:
    """`index.reduce: pca:D` (or `prefix:D`) must leave fewer dimensions than the model's vectors have: checked from
    the model's config.json before the embed, which would otherwise run its whole catalog first."""
    from encoder.configs import embedding_dim

    if cfg.index.reduce is None:
        return
    target, dim = int(cfg.index.reduce.split(":")[1]), embedding_dim(cfg.model)
    if dim is not None and target >= dim:
        raise ValueError(f"index.reduce {cfg.index.reduce}: the model's vectors have {dim} dimensions ({cfg.model}); "
                         f"reduce to fewer, or leave reduce out")  # fmt: skip


def _run_step(ctx: _Context, ledger: Ledger, step: str, outputs: dict, on_step) -> dict:
    """Run one step, recording its start and its end (done with counts and outputs, or failed)."""
    start = time.monotonic()
    ledger.add({"step": step, "status": "started"})
    try:
        counts, produced = _RUNNERS[step](ctx, outputs)
    except BaseException as err:
        ledger.add({"step": step, "status": "failed", "seconds": round(time.monotonic() - start, 3),
                    "error": f"{type(err).__name__}: {err}"})  # fmt: skip
        raise
    outputs[step] = produced
    row = ledger.add({"step": step, "status": "done", "seconds": round(time.monotonic() - start, 3),
                      "counts": counts, "outputs": produced,
                      "settings": _step_settings(ctx.cfg).get(step, {})})  # what a rerun may not change  # fmt: skip
    if on_step:
        on_step(row)
    return row


# What each step's output depends on, among a run's settings: a rerun may change what its steps still to run use
# (a larger max_shrink to go on from the gate, a smaller batch after a crash), not what the done ones used.
_STEP_INPUTS = {"embed": ("catalog", "model"), "index": ("index",), "evaluate": ("interactions", "evaluate")}


def _refuse_a_changed_input(ledger: Ledger, cfg: NightlyConfig, run_id: str) -> None:
    """A rerun under a run's id goes on from its done steps: one whose config changed what a done step used would
    go on from outputs of the old settings (a new `model` on a rerun the same day: the snapshot still the old
    model's, evaluated and published as if it were the new one's)."""
    now = _step_settings(cfg)
    for step in _STEP_INPUTS:
        used = (ledger.done(step) or {}).get("settings", {})
        changes = [change for key, value in used.items() for change in _changes(key, value, now[step].get(key))]
        if changes:
            raise ValueError(
                f"run {run_id}'s {step} step is done with other settings than this rerun's ({'; '.join(changes)}), "
                f"and the rerun would go on from that step's output. Start a new run (--run-id) for the new "
                f"settings, or rerun with the old ones"
            )


def _step_settings(cfg: NightlyConfig) -> dict[str, dict]:
    """Each step's settings from `_STEP_INPUTS`, as the ledger holds them (tuples as lists)."""
    whole = json.loads(json.dumps(_config_dict(cfg)))
    return {step: {key: whole[key] for key in keys} for step, keys in _STEP_INPUTS.items()}


def _changes(key: str, old, new) -> list[str]:
    """`key old → new` for a setting, or for each of a section's settings that differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [f"{key}.{name} {old.get(name)!r} → {new.get(name)!r}"
                for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name)]  # fmt: skip
    return [f"{key} {old!r} → {new!r}"] if old != new else []


def _config_dict(cfg: NightlyConfig) -> dict:
    d = asdict(cfg)
    d["index"] = {k: v for k, v in d["index"].items() if k != "extra"}
    return d
