"""Synthetic embed runs for index tests: clustered unit vectors written as the embed contract says."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.common import clustered, write_run

__all__ = ["clustered", "write_run"]


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return clustered(4000, 32)


@pytest.fixture(scope="module")
def run(tmp_path_factory, vectors) -> str:
    return write_run(tmp_path_factory.mktemp("run") / "20260101T000000Z-aaaaaa", vectors)
