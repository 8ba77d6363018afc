"""`frozen_heap`: objects alive on entry stay out of the collector's passes until the last overlapping run exits."""

from __future__ import annotations

import gc
import weakref

import pytest

from pipelines.heap import frozen_heap


@pytest.fixture(autouse=True)
def _thawed():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_objects_alive_on_entry_are_frozen_until_exit():
    before = [[] for _ in range(1000)]  # tracked containers that exist when the run starts
    with frozen_heap():
        frozen = gc.get_freeze_count()
        assert frozen >= len(before)
        during = [[] for _ in range(1000)]
        # Objects made during the run stay with the collector: the count does not grow by them. (It may shrink:
        # a thread an earlier test left behind can free frozen objects meanwhile.)
        assert gc.get_freeze_count() <= frozen
        assert len(during) == 1000
    assert gc.get_freeze_count() == 0


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_garbage_made_during_the_run_is_still_collected():
    with frozen_heap():
        alive = weakref.ref(_Node())
        gc.collect()
        assert alive() is None


def test_frozen_objects_that_became_garbage_are_collected_after_exit():
    alive = weakref.ref(_Node())
    with frozen_heap():
        gc.collect()
        assert alive() is not None  # frozen: the full pass does not see it
    gc.collect()
    assert alive() is None


def test_overlapping_runs_thaw_when_the_last_one_ends():
    with frozen_heap():
        with frozen_heap():
            pass
        assert gc.get_freeze_count() > 0  # the outer run still has its heap frozen
    assert gc.get_freeze_count() == 0


def test_with_the_collector_disabled_nothing_is_frozen_or_thawed():
    gc.disable()
    try:
        with frozen_heap():
            assert gc.get_freeze_count() == 0
    finally:
        gc.enable()


def test_it_unfreezes_when_the_run_fails():
    with pytest.raises(RuntimeError), frozen_heap():
        raise RuntimeError("a run that fails")
    assert gc.get_freeze_count() == 0
