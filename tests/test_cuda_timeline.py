"""The GPU timeline's summary (benchmarks/cuda_timeline.py) on traces made up to known answers, and its recording
on the CPU."""

from __future__ import annotations

import gzip
import json
import threading

import pytest
import torch

from benchmarks.cuda_timeline import record, summarize


def _span(cat: str, name: str, tid: int, ts_ms: float, dur_ms: float, **args) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts_ms * 1e3, "dur": dur_ms * 1e3,
            "args": args}  # fmt: skip


MODEL, DECODE = 101, 102  # CPU threads


def _trace() -> list[dict]:
    """The model's stream (7) busy 0-30 ms; the decoder's (13) busy 5-8 (beside the model) and 30-35 (after it)."""
    events = [
        _span("user_annotation", "encode", MODEL, 0, 40),
        _span("user_annotation", "decode", DECODE, 0, 40),
        _span("user_annotation", "encode", DECODE, 0, 1),  # a shorter range does not name the thread
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": MODEL, "args": {"name": "python"}},
    ]
    for k, (lo, hi) in enumerate([(0, 10), (10, 20), (20, 30)]):
        events += [_span("cuda_runtime", "cudaLaunchKernel", MODEL, lo, 1, correlation=k),
                   _span("kernel", "gemm", 7, lo, hi - lo, stream=7, correlation=k)]  # fmt: skip
    events += [
        _span("cuda_driver", "cuLaunchKernel", DECODE, 4, 1, correlation=10),
        _span("kernel", "color_convert", 13, 5, 3, stream=13, correlation=10),
        _span("cuda_runtime", "cudaMemcpyAsync", DECODE, 29, 1, correlation=11),
        _span("gpu_memcpy", "Memcpy HtoD", 13, 30, 5, stream=13, correlation=11),
        _span("cuda_runtime", "cudaEventSynchronize", DECODE, 8, 12),
        {**_span("cuda_sync", "Event Sync", 13, 8, 12, stream=13), "pid": 0},  # on the device, by stream
        _span("cuda_runtime", "cudaFree", 999, 30, 2),  # a thread with no range: named by its id
    ]
    return events


def test_streams_busy_time_overlap_and_launchers():
    summary = summarize(_trace())
    assert summary["gpu_events"] == 5 and summary["span_ms"] == 35.0
    assert summary["gpu_busy_pct"] == 100.0
    assert summary["two_or_more_streams_pct"] == pytest.approx(100 * 3 / 35, abs=0.1)
    assert summary["busiest_stream"] == "7"
    assert list(summary["streams"]) == ["7", "13"]  # busiest first
    model, decoder = summary["streams"]["7"], summary["streams"]["13"]
    assert model["overlaps_busiest_pct"] == 100.0 and model["launched_by"] == {"encode": 3}
    assert decoder["busy_ms"] == 8.0 and decoder["events"] == 2
    assert decoder["overlaps_busiest_pct"] == pytest.approx(100 * 3 / 8, abs=0.1)
    assert decoder["launched_by"] == {"decode": 2}
    assert decoder["costliest"] == {"Memcpy HtoD": 5.0, "color_convert": 3.0}


def test_calls_per_thread_longest_first():
    calls = summarize(_trace())["calls"]
    assert list(calls) == ["decode", "encode", "thread 999"]  # the most time in calls first
    assert list(calls["decode"]) == ["cudaEventSynchronize", "cuLaunchKernel", "cudaMemcpyAsync"]
    assert calls["decode"]["cudaEventSynchronize"] == {"ms": 12.0, "n": 1, "max_ms": 12.0}
    assert calls["encode"]["cudaLaunchKernel"]["n"] == 3
    assert calls["thread 999"]["cudaFree"]["ms"] == 2.0


def test_synchronisation_events_are_summed_per_stream():
    assert summarize(_trace())["syncs"] == {"stream 13": {"Event Sync": {"ms": 12.0, "n": 1, "max_ms": 12.0}}}


def test_times_written_as_strings_are_read():
    events = [{**_span("kernel", "a", 7, 0, 10, stream=7), "ts": "0.000", "dur": "10000.000"}]
    assert summarize(events)["streams"]["7"]["busy_ms"] == 10.0


def test_a_stream_after_another_overlaps_nothing():
    events = [_span("kernel", "a", 7, 0, 10, stream=7), _span("kernel", "b", 13, 10, 4, stream=13)]
    summary = summarize(events)
    assert summary["two_or_more_streams_pct"] == 0.0  # touching is not overlapping
    assert summary["streams"]["13"]["overlaps_busiest_pct"] == 0.0
    assert summary["streams"]["13"]["launched_by"] == {"?": 1}  # no launch call seen


def test_gaps_count_against_the_busy_share():
    events = [_span("kernel", "a", 7, 0, 10, stream=7), _span("kernel", "a", 7, 30, 10, stream=7)]
    assert summarize(events)["gpu_busy_pct"] == 50.0


def test_a_cpu_trace_has_no_gpu_part():
    summary = summarize([_span("cpu_op", "aten::add", 1, 0, 5)])
    assert summary == {"gpu_events": 0, "calls": {}, "syncs": {}}


def test_record_writes_a_trace_of_every_thread(tmp_path):
    def work():
        def side():
            with torch.profiler.record_function("decode"):
                torch.ones(8).sum()

        thread = threading.Thread(target=side)
        thread.start()
        with torch.profiler.record_function("encode"):
            torch.ones(8).mul(2)
        thread.join()

    trace = tmp_path / "t" / "trace.json.gz"
    assert record(work, trace, cuda=False) == {"gpu_events": 0, "calls": {}, "syncs": {}}
    events = json.load(gzip.open(trace, "rt"))["traceEvents"]
    ranges = {e["name"]: e["tid"] for e in events if e.get("cat") == "user_annotation"}
    assert set(ranges) == {"decode", "encode"} and ranges["decode"] != ranges["encode"]
