"""The test suite's own helpers: what a failing run on a leased GPU leaves to read."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from hypothesis.vendor.pretty import pretty

from tests import conftest
from tests.support.hostile_jpegs import JpegBatch


def test_failures_are_logged_as_they_happen_with_long_lines_cut(tmp_path, monkeypatch):
    log = tmp_path / "failures.log"
    monkeypatch.setenv("LOOKALIKE_FAILURES_LOG", str(log))
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=False, nodeid="t::passes", when="call", longreprtext=""))
    assert not log.exists()
    report = SimpleNamespace(failed=True, nodeid="t::fails", when="call", longreprtext="x" * 5000 + "\nassert 1 == 2")
    conftest.pytest_runtest_logreport(report)
    conftest.pytest_runtest_logreport(SimpleNamespace(**{**vars(report), "nodeid": "t::also"}))
    lines = log.read_text().splitlines()
    assert lines[0] == "=== t::fails (call)" and lines[2] == "assert 1 == 2" and lines[3] == "=== t::also (call)"
    assert lines[1].endswith("… (5,000 characters)") and len(lines[1]) < 330
    monkeypatch.delenv("LOOKALIKE_FAILURES_LOG")
    conftest.pytest_runtest_logreport(report)
    assert len(log.read_text().splitlines()) == 6  # nothing more without the variable


def test_a_drawn_jpeg_batch_prints_in_a_line():
    batch = JpegBatch([b"\xff\xd8" + bytes(70_000), np.frombuffer(b"\xff\xd8\xff\xd9", np.uint8)])
    text = pretty(batch)  # how hypothesis prints a falsifying example
    assert text == repr(batch) and len(text) < 120, text
    assert text.startswith("JpegBatch([bytes[70,002 B sha256 ") and "ndarray[4 B sha256 " in text
    assert isinstance(batch, list) and len(batch) == 2  # still the list the decoders take
