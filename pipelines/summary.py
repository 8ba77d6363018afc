"""Human-readable run summaries for the command line."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pipelines.embed import EmbedResult

__all__ = ["print_embed_summary"]


def print_embed_summary(result: EmbedResult, console: Console | None = None) -> None:
    """A table of counts, speed and output paths, then the accounting line."""
    console = console or Console()
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
        ("images/s (embedded, whole run)", f"{m['images_per_s']:,.1f}" if c["embedded"] else "-"),
        ("wall time", f"{m['wall_time_s']:,.1f} s"),
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
