"""Offline evaluation: nDCG@k and friends from interaction logs (see issue 4)."""

__all__: list[str] = []
