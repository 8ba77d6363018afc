"""Dates from the command line and configs, read without the catalog's heavy imports (pyarrow)."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["parse_when"]


def parse_when(text: str) -> datetime:
    """An ISO 8601 date or time from a flag such as --since; UTC unless it names a zone.

    Raises:
        ValueError: not a date or time, or one still to come: every --since asks what changed or was logged after
            it, so a future one (a typo'd year) would quietly select nothing.
    """
    try:
        when = datetime.fromisoformat(text)
    except ValueError as err:
        raise ValueError(f"--since {text!r} is not an ISO 8601 date or time") from err
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    now = datetime.now(UTC)
    if when > now:
        raise ValueError(f"--since {text!r} is in the future (now: {now:%Y-%m-%dT%H:%MZ}): nothing is after it")
    return when
