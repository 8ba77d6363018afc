"""Isolating what fails in a batch (`encoder.failures`): retries in halves, throttled warnings, device errors."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from encoder.failures import MemoryBackoff, Throttled, device_failed, in_halves, out_of_memory


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


def test_out_of_memory_is_told_apart_from_other_failures_by_its_reason():
    assert out_of_memory("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert out_of_memory("RuntimeError: CUDA out of memory. Tried to allocate 20.00 MiB")  # before torch 2.1
    assert out_of_memory("RuntimeError: DefaultCPUAllocator: not enough memory: you tried to allocate 1 GB")
    assert out_of_memory("MemoryError: ")
    assert not out_of_memory("RuntimeError: kernel failed") and not out_of_memory("non-finite embedding")


def test_backoff_halves_on_running_out_of_memory_probes_less_often_while_it_fails_and_ends_when_one_fits(caplog):
    caplog.set_level(logging.INFO, logger="encoder.failures")
    backoff = MemoryBackoff(probe_every=2, max_probe_every=4)
    assert backoff.piece_for(256) is None
    backoff.failed(256, "RuntimeError: kernel failed")  # not memory
    backoff.failed(1, "OutOfMemoryError: CUDA out of memory")  # nothing smaller to try
    assert not backoff.backing_off
    backoff.failed(256, "OutOfMemoryError: CUDA out of memory")
    assert [backoff.piece_for(256) for _ in range(4)] == [128, None, 128, None]  # a whole batch every 2nd
    backoff.failed(128, "OutOfMemoryError: CUDA out of memory")  # a piece: smaller pieces, same probes
    backoff.failed(256, "OutOfMemoryError: CUDA out of memory")  # a probe: every 4th from now on
    assert [backoff.piece_for(100) for _ in range(4)] == [64, 64, 64, None]
    assert [backoff.piece_for(50) for _ in range(5)] == [50] * 5  # short: its own size, never a probe
    backoff.failed(256, "OutOfMemoryError: CUDA out of memory")
    assert [backoff.piece_for(256) for _ in range(4)] == [64, 64, 64, None]  # no more than every 4th
    backoff.fitted()
    assert not backoff.backing_off and backoff.piece_for(256) is None
    backoff.failed(256, "OutOfMemoryError: CUDA out of memory")
    assert [backoff.piece_for(256) for _ in range(2)] == [128, None]  # from the first interval again
    warnings = [r.getMessage() for r in caplog.records if r.name == "encoder.failures"]
    assert warnings[0].startswith("out of memory at 256 images (OutOfMemoryError: CUDA out of memory): the model "
                                  "takes the next batches in pieces of 128, and a whole batch again every 2")  # fmt: skip
    assert "a whole batch fits the memory again: the model takes batches whole, no longer in pieces of 64" in warnings
