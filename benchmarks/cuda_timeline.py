"""Where a GPU run's time goes, seen from the GPU: a torch profiler trace of kernels, copies and the CUDA calls
of every thread (libraries' own included), summed up per stream and per thread.

`record(fn, trace_path)` runs `fn` under the profiler, writes the Chrome trace (gzipped: open it in Perfetto) and
returns `summarize`'s figures, which answer what a stack sampler cannot:

- `streams`: each CUDA stream's busy time, how much of it ran while the busiest stream (the model's) was busy
  too, which threads launched its work, and its costliest kernels. Work on one stream that never overlaps the
  model's is serialised behind it.
- `gpu_busy_pct`, `two_or_more_streams_pct`: the share of the span with any work, and with work on two streams.
- `calls`: per thread, the CUDA runtime and driver calls that took longest in all (a decode thread that waits in
  `cudaEventSynchronize`, or a `cudaFree` that waits for the whole device, shows here); `syncs`: CUDA's own
  record of those waits, per stream.

Threads are named by the `torch.profiler.record_function` range that covers most of their time (the benchmarks
wrap each stage in one); the others are "thread <tid>".
"""

from __future__ import annotations

import gzip
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["record", "summarize"]

_GPU = ("kernel", "gpu_memcpy", "gpu_memset")
_CALLS = ("cuda_runtime", "cuda_driver")  # on the CPU thread that made them


def record(fn: Callable[[], object], trace_path: Path, cuda: bool, top: int = 3) -> dict:
    """Run `fn` under torch's profiler (every thread; CUDA activity and synchronisation events when `cuda`),
    write the trace to `trace_path` (.json.gz) and return its summary (`top` kernels per stream)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:  # older torch lacks some of these fields; the trace is still useful without them
        config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True, enable_cuda_sync_events=cuda)
    except TypeError:
        config = None
    with profile(activities=activities, experimental_config=config) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace_path))  # gzipped by torch for a .gz name
    with gzip.open(trace_path, "rt") if trace_path.suffix == ".gz" else open(trace_path) as f:
        return summarize(json.load(f).get("traceEvents", []), top)


def summarize(events: Iterable[dict], top: int = 3) -> dict:
    """The figures described in the module's docstring, from Chrome-trace events as Kineto writes them."""
    spans = [{**e, "ts": float(e["ts"]), "dur": float(e["dur"])}  # some Kineto versions write them as strings
             for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]  # fmt: skip
    names = _thread_names(spans)
    launcher = {}  # correlation id → the thread that launched it
    for e in spans:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):
            launcher[e["args"]["correlation"]] = names.get(e["tid"], f"thread {e['tid']}")
    gpu = [e for e in spans if e.get("cat") in _GPU]
    if not gpu:
        return {"gpu_events": 0, "calls": _calls(spans, names, top), "syncs": _syncs(spans)}
    by_stream: dict[int, list[dict]] = defaultdict(list)
    for e in gpu:
        by_stream[e.get("args", {}).get("stream", e["tid"])].append(e)
    busy = {s: _union((e["ts"], e["ts"] + e["dur"]) for e in es) for s, es in by_stream.items()}
    start, end = min(e["ts"] for e in gpu), max(e["ts"] + e["dur"] for e in gpu)
    span = max(end - start, 1e-9)
    model = max(busy, key=lambda s: _length(busy[s]))
    streams = {}
    for s, es in sorted(by_stream.items(), key=lambda kv: -_length(busy[kv[0]])):
        length = _length(busy[s])
        costly = Counter()
        for e in es:
            costly[e["name"][:60]] += e["dur"]
        launched = Counter(launcher.get(e.get("args", {}).get("correlation"), "?") for e in es)
        streams[str(s)] = {
            "busy_ms": round(length / 1e3, 1),
            "busy_pct": round(100 * length / span, 1),
            "overlaps_busiest_pct": round(100 * _length(_intersect(busy[s], busy[model])) / max(length, 1e-9), 1),
            "events": len(es),
            "launched_by": dict(launched.most_common(top)),
            "costliest": {name: round(us / 1e3, 1) for name, us in costly.most_common(top)},
        }
    every = _union(iv for ivs in busy.values() for iv in ivs)
    return {
        "gpu_events": len(gpu),
        "span_ms": round(span / 1e3, 1),
        "gpu_busy_pct": round(100 * _length(every) / span, 1),
        "two_or_more_streams_pct": round(100 * _length(_at_least_two(list(busy.values()))) / span, 1),
        "busiest_stream": str(model),
        "streams": streams,
        "calls": _calls(spans, names, top),
        "syncs": _syncs(spans),
    }


def _thread_names(spans: list[dict]) -> dict[int, str]:
    """Each CPU thread's name: the `record_function` range covering most of its time."""
    covered: dict[int, Counter] = defaultdict(Counter)
    for e in spans:
        if e.get("cat") == "user_annotation":
            covered[e["tid"]][e["name"]] += e["dur"]
    return {tid: names.most_common(1)[0][0] for tid, names in covered.items()}


def _calls(spans: list[dict], names: dict[int, str], top: int) -> dict[str, dict[str, dict]]:
    """Per thread, its `top` * 2 CUDA calls by total time: {call: `_tally`}; the thread with most time first."""
    per = _durations((names.get(e["tid"], f"thread {e['tid']}"), e) for e in spans if e.get("cat") in _CALLS)
    ranked = sorted(per.items(), key=lambda kv: -sum(map(sum, kv[1].values())))
    return {thread: {name: _tally(d) for name, d in sorted(calls.items(), key=lambda kv: -sum(kv[1]))[: top * 2]}
            for thread, calls in ranked}  # fmt: skip


def _syncs(spans: list[dict]) -> dict[str, dict[str, dict]]:
    """CUDA's synchronisation events (a host waiting for an event or a stream, a stream waiting for an event), per
    stream they name: {"stream S": {kind: `_tally`}}. The host calls that waited are in `calls` too."""
    per = _durations((f"stream {e.get('args', {}).get('stream', e['tid'])}", e)
                     for e in spans if e.get("cat") == "cuda_sync")  # fmt: skip
    return {stream: {kind: _tally(d) for kind, d in kinds.items()} for stream, kinds in sorted(per.items())}


def _durations(grouped: Iterable[tuple[str, dict]]) -> dict[str, dict[str, list[float]]]:
    """{group: {event name: its durations}} of (group, event) pairs."""
    per: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for group, e in grouped:
        per[group][e["name"]].append(e["dur"])
    return per


def _tally(durations: list[float]) -> dict:
    return {"ms": round(sum(durations) / 1e3, 1), "n": len(durations), "max_ms": round(max(durations) / 1e3, 2)}


def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for lo, hi in sorted(intervals):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi) for lo, hi in merged]


def _intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Where two sorted, disjoint interval lists overlap."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _at_least_two(streams: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """Where two or more of the streams' (each disjoint) intervals overlap."""
    edges = sorted([(lo, 1) for ivs in streams for lo, _ in ivs] + [(hi, -1) for ivs in streams for _, hi in ivs])
    out, depth, since = [], 0, 0.0
    for at, step in edges:
        if depth >= 2 and at > since:
            out.append((since, at))
        depth += step
        since = at
    return _union(out)


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(hi - lo for lo, hi in intervals)
