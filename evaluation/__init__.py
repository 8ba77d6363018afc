"""Offline evaluation: nDCG@k and friends from interaction logs (see issue 4)."""

__all__ = ["PIXELS"]

# The built-in baseline's name (`evaluation.baselines`), here so that configs name it without importing it.
PIXELS = "builtin:pixels"
