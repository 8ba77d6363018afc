"""Human-readable run summaries for the command line."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from pipelines.dead_letters import describe_reasons

if TYPE_CHECKING:  # importing it at run time would load torch and Beam into `lookalike index`
    from pipelines.embed import EmbedResult

__all__ = [
    "print_nightly",
    "print_train_summary",
    "print_embed_summary",
    "print_evaluation",
    "print_snapshot_list",
    "print_snapshot_summary",
]


def _console() -> Console:
    """Rich's console, wide enough for ids and paths when output goes to a file or pipe."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def print_embed_summary(result: EmbedResult, console: Console | None = None) -> None:
    """A table of counts, speed and output paths, then the accounting line."""
    console = console or _console()
    m, c = result.manifest, result.counts
    table = Table(title=f"embed run {result.run_id}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for label, value in [
        ("items in", f"{c['items_in']:,}"),
        ("embedded", f"{c['embedded']:,}"),
        ("reused", f"{c['reused']:,}"),
        ("dead-lettered", f"{c['dead_lettered']:,}"),
        ("  by stage", ", ".join(f"{k} {v}" for k, v in sorted(m["dead_letters_by_stage"].items())) or "-"),
        *_reason_rows(m.get("dead_letter_reasons")),
        *_batch_rows(m.get("batches")),
        *_object_store_rows(m.get("object_store_reads")),
        *_process_rows(m.get("worker_processes")),
        ("images/s (embedded, whole run)", f"{m['images_per_s']:,.1f}" if c["embedded"] else "-"),
        ("wall time", f"{m['wall_time_s']:,.1f} s"),
        ("  of which", _time_split(m.get("time_s"))),
        ("model_version", m["model_version"]),
        ("reused from run", m["previous_run"] or "-"),
        ("embeddings", f"{result.run_dir} ({len(m['shards'])} shards)"),
        ("dead letters", f"{result.failures_dir}"),
    ]:
        table.add_row(label, value)
    console.print(table)
    console.print(
        f"items in = embedded + reused + dead-lettered: "
        f"{c['items_in']:,} = {c['embedded']:,} + {c['reused']:,} + {c['dead_lettered']:,}"
    )


def _reason_rows(reasons: list[dict] | None) -> list[tuple[str, str]]:
    """The commonest kinds of reason for the dead letters, where there were any (older manifests have none)."""
    if not reasons:
        return []
    return [("  why", describe_reasons(((r["stage"], r["reason"], r["count"]) for r in reasons), sep="\n"))]


def _batch_rows(batches: dict | None) -> list[tuple[str, str]]:
    """The workers' batches, where there is something to say: images decoded on the GPU, batches retried or run in
    pieces."""
    rows = []
    if batches and batches.get("decoded_on_gpu"):
        rows.append(("decoded on the GPU", f"{batches['decoded_on_gpu']:,}"))
    if batches and batches.get("retried"):
        why = "failed whole in the GPU decoder, resize or model; see the log"
        rows.append(("batches retried in halves", f"{batches['retried']:,} ({why})"))
    if batches and batches.get("in_pieces"):
        why = "the model, GPU decoder or resize ran out of memory at the batch size; see the log"
        rows.append(("batches run in pieces", f"{batches['in_pieces']:,} ({why})"))
    return rows


def _process_rows(processes: dict | None) -> list[tuple[str, str]]:
    """The worker processes of their own that embedded, and how many were forked warm, where there were several."""
    if not processes or processes.get("embedding", 0) < 2:
        return []
    count, forked = processes["embedding"], processes.get("forked", 0)
    how = ("all forked warm" if forked == count else "started by Beam" if not forked
           else f"{forked} forked warm, {count - forked} started by Beam: see the log")  # fmt: skip
    return [("worker processes", f"{count:,} ({how})")]


def _object_store_rows(reads: dict | None) -> list[tuple[str, str]]:
    """Image reads from an object store and their second requests, where there were any."""
    if not reads or not reads.get("reads"):
        return []
    share = 100 * reads["second_requests"] / reads["reads"]
    return [("object-store reads", f"{reads['reads']:,} (second requests {reads['second_requests']:,}, {share:.1f}%; "
                                   f"{reads['second_requests_used']:,} used)")]  # fmt: skip


def _time_split(time_s: dict | None) -> str:
    """The manifest's `time_s` in a line, e.g. `prepare 0.40 s · pipeline 12.0 s · accounting 0.01 s · model load
    2.1 s` (the model loads in one of the first two); "-" for manifests written before it."""
    if not time_s:
        return "-"

    def secs(v: float) -> str:
        return f"{v:.2f} s" if v < 1 else f"{v:,.1f} s"

    parts = [
        ("prepare", "prepare"),
        ("pipeline", "pipeline"),
        ("accounting", "accounting"),
        ("model_load", "model load"),
        ("compile", "of it compile"),
        ("fetch_setup", "fetch set-up"),
        ("embed_setup", "embed set-up"),
    ]
    return " · ".join(f"{label} {secs(time_s[key])}" for key, label in parts if time_s.get(key) is not None)


def print_snapshot_summary(manifest: dict, root: str, console: Console | None = None) -> None:
    """What was built, how it was tuned, and how well it measured."""
    console = console or _console()
    m, q, ix = manifest, manifest["quality"], manifest["index"]
    table = Table(title=f"snapshot {m['snapshot_id']} (not published)", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    reduce = m["reduce"]
    for label, value in [
        (
            "vectors",
            f"{m['count']:,} × {m['dim']}" + (f" (from {m['source_dim']}, {reduce['method']})" if reduce else ""),
        ),
        ("model_version", m["model_version"]),
        ("index", f"{ix['backend']} {ix['kind']}" + (f" [{ix['factory']}]" if ix["factory"] else "")),
        ("why", ix["reason"]),
        ("search params", ", ".join(f"{k}={v}" for k, v in ix["search_params"].items()) or "-"),
        (f"recall@{q['k']} ({q['queries']} queries)", f"{q['recall_at_10']:.4f}"),
        ("latency p50 / p99", f"{q['latency_ms_p50']:.3f} / {q['latency_ms_p99']:.3f} ms"),
        ("batch queries/s", f"{q['batch_queries_per_s']:,.0f}"),
        ("build", f"{q['build_s']:.2f} s (wall {m['wall_time_s']:.1f} s)"),
        ("index bytes", f"{m['bytes']['index']:,}"),
        ("path", f"{root.rstrip('/')}/{m['snapshot_id']}"),
    ]:
        table.add_row(label, value)
    console.print(table)
    console.print(f"publish with: lookalike publish --root {root} {m['snapshot_id']}")


def print_snapshot_list(rows: list[dict], root: str, console: Console | None = None) -> None:
    console = console or _console()
    if not rows:
        console.print(f"no complete snapshots under {root}")
        return
    table = Table(title=f"snapshots under {root}", title_justify="left")
    for column in ("snapshot_id", "created", "model_version", "count", "index", "recall@10", "gate", "LATEST"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["snapshot_id"], r["created_at"][:19], r["model_version"], f"{r['count']:,}", r["index"],
                      f"{r['recall_at_10']:.3f}", r.get("gate") or "-", "*" if r["latest"] else "")  # fmt: skip
    console.print(table)


def print_evaluation(doc: dict, console: Console | None = None) -> None:
    """Metrics per ranker, the change with its 95% interval, gates, and what was left out."""
    console = console or _console()
    names = [doc["candidate"]] + ([doc["baseline"]] if doc["baseline"] else [])
    table = Table(
        title=f"evaluation @ {doc['k']} on {doc['counts']['evaluated_queries']:,} queries", title_justify="left"
    )
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    if doc["comparisons"]:
        table.add_column("change", justify="right")
        table.add_column("95% CI", justify="right")
    comparisons = {c["metric"]: c for c in doc["comparisons"]}
    for metric in doc["metrics"][names[0]]:
        row = [metric] + [f"{doc['metrics'][n][metric]:.4f}" for n in names]
        c = comparisons.get(metric)
        if c:
            rel = "–" if c["relative"] is None else f"{c['relative'] * 100:+.1f}%"
            ci = (
                "–"
                if c["relative_ci"] is None
                else f"[{c['relative_ci'][0] * 100:+.1f}%, {c['relative_ci'][1] * 100:+.1f}%]"
            )
            row += [rel, ci]
        table.add_row(*row)
    table.add_row("coverage", *[f"{doc['coverage'][n]:.3f}" for n in names], *([""] * (2 if doc["comparisons"] else 0)))
    console.print(table)
    from evaluation.evaluate import left_out

    if dropped := left_out(doc["counts"]):
        console.print(f"left out: {dropped}")
    for g in doc["gates"]:
        console.print(
            f"gate {g['gate']}: {g['metric']} = {g['value']:.4f} vs {g['threshold']:.4f} → {'pass' if g['passed'] else 'FAIL'}"
        )
    if doc.get("report"):
        console.print(f"report: {doc['report']}")


def print_train_summary(result, console: Console | None = None) -> None:
    """Pairs used and skipped, speed, the last validation, and where the encoder went."""
    console = console or _console()
    c = result.counts
    table = Table(title=f"training run {result.out}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("catalog rows", f"{c.get('rows', 0):,}"),
        ("pairs (train / held out)", f"{c.get('pairs', 0):,} ({c.get('train', 0):,} / {c.get('val', 0):,})"),
        ("skipped: broken image", f"{c.get('skipped_broken_image', 0):,}"),
        ("skipped: empty title", f"{c.get('skipped_empty_title', 0):,}"),
        ("skipped: no image_uri", f"{c.get('skipped_no_image', 0):,}"),
        ("unreadable during training (replaced)", f"{c.get('unreadable_during_training', 0):,}"),
        ("steps (epochs)", f"{result.steps:,} ({result.epochs})"),
        ("resumed from step", f"{result.resumed_from_step:,}" if result.resumed_from_step is not None else "-"),
        ("images/s (training steps)", f"{result.images_per_s:,.1f}"),
        ("wall time", f"{result.seconds:,.1f} s"),
    ]
    rows += [(name.replace("_at_", "@").replace("_", " "), f"{value:.4f}") for name, value in result.validation.items()
             if name != "val_queries"]  # fmt: skip
    rows += [
        ("model_version", result.model_version),
        ("image encoder", result.encoder),
        ("two-tower model", result.model),
    ]
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)
    console.print(f"embed with: lookalike embed --model {result.encoder} ...")


def print_nightly(result, out: str, console: Console | None = None) -> None:
    """One row per step: status (done, or resumed from an earlier attempt), seconds, counts."""
    console = console or _console()
    table = Table(title=f"run {result.run_id}", title_justify="left")
    for column in ("step", "status", "seconds", "counts"):
        table.add_column(column)
    for row in result.steps:
        status = "resumed (done earlier)" if row.get("resumed") else row["status"]
        counts = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in (row.get("counts") or {}).items())  # fmt: skip
        table.add_row(row["step"], status, f"{row.get('seconds', 0):.1f}", counts or "-")
    console.print(table)
    done = f"published {result.published}" if result.published else f"stopped after {result.steps[-1]['step']}"
    console.print(f"{done}; ledger: {out.rstrip('/')}/runs/{result.run_id}/ledger.jsonl")
