"""A nightly (or backfill) run's ledger, `OUT/runs/<run_id>/ledger.jsonl`: one JSON row per step's start and end.

Its own module, with nothing heavier than `encoder.storage`, so that the command line can ask it whether a run's
embed step is done before importing the pipelines (`cli._before_the_embed_step`).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from encoder import storage

__all__ = ["Ledger", "default_run_id", "read_ledger"]


def default_run_id(kind: str = "nightly", now: datetime | None = None) -> str:
    """`nightly-20261125`: one id per night, so a rerun the same night resumes it."""
    now = now or datetime.now(UTC)
    return f"{kind}-{now:%Y%m%d}" if kind == "nightly" else f"{kind}-{now:%Y%m%dT%H%M%SZ}"


def _ledger_uri(out: str, run_id: str) -> str:
    return storage.join(out, "runs", run_id, "ledger.jsonl")


def read_ledger(out: str, run_id: str) -> list[dict]:
    """Every row the run has recorded, oldest first ([] for a new run)."""
    try:
        data = storage.read_bytes(_ledger_uri(out, run_id))
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


class Ledger:
    """Rows appended by rewriting the (small) file, which works the same on gs://."""

    def __init__(self, out: str, run_id: str) -> None:
        self.uri, self.rows = _ledger_uri(out, run_id), read_ledger(out, run_id)

    def done(self, step: str) -> dict | None:
        return next((r for r in reversed(self.rows) if r["step"] == step and r["status"] == "done"), None)

    def add(self, row: dict) -> dict:
        row = {"at": datetime.now(UTC).isoformat(), **row}
        self.rows.append(row)
        storage.write_bytes(self.uri, "".join(json.dumps(r) + "\n" for r in self.rows).encode())
        return row
