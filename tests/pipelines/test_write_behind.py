import threading

import pytest

from pipelines.write_behind import WriteBehind


def test_calls_run_in_order_on_a_thread_of_their_own_while_the_caller_goes_on():
    behind, gate, done = WriteBehind(pending=4), threading.Event(), []
    behind.submit(gate.wait)  # the first call holds the thread: the next ones must wait, the caller not
    for k in range(3):
        behind.submit(lambda k=k: done.append((k, threading.current_thread().name)))
    assert done == []  # submitted, not run: the caller did not wait for them
    gate.set()
    behind.close()
    assert [k for k, _ in done] == [0, 1, 2]
    assert all(name.startswith("write") and name != threading.current_thread().name for _, name in done)


def test_submit_waits_once_pending_calls_are_full():
    behind, gate = WriteBehind(pending=2), threading.Event()
    behind.submit(gate.wait)  # running
    behind.submit(lambda: None)  # waiting: the two are all that may be pending
    third = threading.Thread(target=behind.submit, args=(lambda: None,))
    third.start()
    third.join(0.2)
    assert third.is_alive()  # held until the calls before it finish
    gate.set()
    third.join(5)
    assert not third.is_alive()
    behind.close()


def test_a_failed_call_is_raised_by_the_next_submit_and_the_calls_after_it_do_not_run():
    behind, ran, gate = WriteBehind(pending=4), [], threading.Event()

    def fail():
        gate.wait()
        raise OSError("disk full")

    behind.submit(fail)
    behind.submit(lambda: ran.append("after"))  # queued behind the failure: skipped, not run out of order
    gate.set()
    with pytest.raises(OSError, match="disk full"):
        behind.drain()
    with pytest.raises(OSError, match="disk full"):
        behind.submit(lambda: ran.append("later"))
    closed = []
    with pytest.raises(OSError, match="disk full"):  # the calls' error, not the closing one's
        behind.close(then=lambda: closed.append(1) or 1 / 0)
    assert ran == [] and closed == [1]  # what the calls wrote to is closed all the same


def test_close_raises_the_closing_call_s_own_error_where_the_calls_had_none():
    behind = WriteBehind()
    behind.submit(lambda: None)
    with pytest.raises(ZeroDivisionError):
        behind.close(then=lambda: 1 / 0)


def test_pending_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        WriteBehind(pending=0)
