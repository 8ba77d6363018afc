"""Isolating what fails in a batch (`encoder.failures`): retries in halves, throttled warnings, device errors."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from encoder.failures import Throttled, device_failed, in_halves


def _refusing(calls: list[int], refuse: Callable[[list[int]], bool]) -> Callable[[list[int]], list[int]]:
    """Stands in for a batch step over a slice of ints: records each slice's length, fails where `refuse` says."""

    def step(part):
        calls.append(len(part))
        if refuse(part):
            raise RuntimeError("refused")
        return list(part)

    return step


def test_in_halves_finds_one_culprit_in_two_calls_per_halving():
    calls: list[int] = []
    done, failed = in_halves(_refusing(calls, lambda part: 37 in part), list(range(256)), "the batch's reason")
    assert failed == {37: "RuntimeError: refused"}
    assert [start for start, _ in done] == sorted(start for start, _ in done)
    assert [x for _, part in done for x in part] == [i for i in range(256) if i != 37]
    assert len(calls) == 16 and sum(calls) == 510  # 2 × log2(256) calls over ~2 batches' worth; one by one: 256


def test_in_halves_takes_a_batch_too_large_for_the_memory_left_in_pieces_that_fit():
    calls: list[int] = []
    done, failed = in_halves(_refusing(calls, lambda part: len(part) > 64), list(range(256)), "out of memory")
    assert not failed and [start for start, _ in done] == [0, 64, 128, 192]
    assert calls == [128, 128, 64, 64, 64, 64]


def test_in_halves_of_one_item_or_none_calls_nothing():
    calls: list[int] = []
    assert in_halves(_refusing(calls, lambda part: True), [7], "the batch's reason") == ([], {0: "the batch's reason"})
    assert in_halves(_refusing(calls, lambda part: True), [], "the batch's reason") == ([], {})
    assert calls == []


def test_a_warning_that_repeats_is_logged_at_most_once_a_period_with_how_many_were_held_back(caplog):
    """A batch size that no longer fits fails every batch: one warning per period, not one per batch."""
    throttled = Throttled(logging.getLogger("test.throttled"), every_s=0.3)
    for k in range(3):
        throttled.warning("batch %d failed", k)
    time.sleep(0.35)
    throttled.warning("batch %d failed", 3)
    assert [r.getMessage() for r in caplog.records if r.name == "test.throttled"] == [
        "batch 0 failed",
        "batch 3 failed (2 more since the last such warning)",
    ]


def test_only_an_error_that_leaves_the_device_unusable_stops_a_run():
    assert device_failed(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    assert not device_failed(torch.OutOfMemoryError("CUDA out of memory")) and not device_failed(ValueError())
