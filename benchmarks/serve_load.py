"""`lookalike serve` under load on loopback, with a snapshot hot swap in the middle.

    python benchmarks/serve_load.py [--seconds 60] [--clients 64] [--items 100000] [--dim 256]

Builds two snapshots of a synthetic catalog (clustered unit vectors, index auto), publishes the
first, starts `lookalike serve` (refresh every second) and runs `--clients` concurrent
keep-alive clients on one asyncio loop for `--seconds`, each asking GET /similar/{id}?k=10
for random catalog items. Half-way `lookalike publish` (a separate process, as in
production) publishes the second snapshot; the server swaps it in while answering. Reports
requests/s, p50/p99/max latency, errors (non-200 answers or broken connections) and which
snapshots answered. The load generator shares the machine's cores with the server, so
requests/s is a floor for the server alone. Results go in RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import child_pids, clustered, free_port, machine, write_run  # noqa: E402


async def _client(url: str, ids: list[str], until: float, seed: int, latencies: list, outcomes: Counter,
                  served: Counter) -> None:  # fmt: skip
    import httpx

    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while time.monotonic() < until:
            start = time.perf_counter()
            try:
                answer = await http.get(f"/similar/{rng.choice(ids)}", params={"k": 10})
            except httpx.HTTPError as err:
                outcomes[f"error {type(err).__name__}"] += 1
                continue
            latencies.append((start, time.perf_counter() - start))
            if answer.status_code == 200 and len(answer.json()["neighbors"]) == 10:
                outcomes["ok"] += 1
                served[answer.json()["snapshot_id"]] += 1
            else:
                outcomes[f"status {answer.status_code}"] += 1


async def _load(url: str, ids: list[str], seconds: float, clients: int, swap: list[str]) -> dict:
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    served: Counter[str] = Counter()
    start, t0 = time.monotonic(), time.perf_counter()
    until = start + seconds
    tasks = [asyncio.create_task(_client(url, ids, until, i, latencies, outcomes, served)) for i in range(clients)]
    await asyncio.sleep(seconds / 2)
    swap_at = time.perf_counter() - t0
    swapper = await asyncio.create_subprocess_exec(*swap)  # another job publishes, as in production
    await swapper.wait()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - start
    began = np.array([t for t, _ in latencies] or [0.0])
    ms = np.array([d for _, d in latencies] or [0.0]) * 1000
    worst = int(np.argmax(ms))
    errors = sum(n for k, n in outcomes.items() if k != "ok")
    return {"requests": sum(outcomes.values()), "errors": errors, "outcomes": dict(outcomes), "served": dict(served),
            "requests_per_s": sum(outcomes.values()) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
            "max_at_s": float(began[worst] - t0), "swap_at_s": swap_at,
            "max_after_warmup_ms": float(ms[began - t0 >= 2.0].max(initial=0.0)),
            "max_around_swap_ms": float(ms[np.abs(began - t0 - swap_at) <= 3.0].max(initial=0.0))}  # fmt: skip


def _own_mib(pid: int) -> float:
    """The anonymous memory of `pid` and every process under it, in MiB (what no other process shares)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    own = next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("RssAnon:")), 0.0)
    return own + sum(_own_mib(child) for child in child_pids(pid))


def run_load_test(work: Path, *, seconds: float, clients: int, items: int, dim: int, workers: int = 1) -> dict:
    """Two snapshots, a server of `workers` processes, `clients` clients for `seconds`, a publish half-way; the
    measurements, and the server processes' own memory at the end."""
    from indexing import IndexConfig, build_snapshot, publish

    run = write_run(work / "20260101T000000Z-dddddd", clustered(items, dim))
    root = work / "snapshots"
    cfg = IndexConfig(queries=200)  # index auto: what the nightly job builds
    first, second = (build_snapshot(run, str(root), cfg)["snapshot_id"] for _ in range(2))
    publish(str(root), first)
    ids = [f"item-{i:06d}" for i in random.Random(0).sample(range(items), min(items, 5000))]
    port = free_port()
    exe = Path(sys.executable).with_name("lookalike")
    server = subprocess.Popen([str(exe), "serve", "--root", str(root), "--port", str(port), "--refresh-s", "1",
                               "--workers", str(workers)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ})  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {server.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.2)
        result = asyncio.run(
            _load(f"http://127.0.0.1:{port}", ids, seconds, clients, [str(exe), "publish", "--root", str(root), second])
        )
        result["server_own_mib"] = _own_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {**result, "first": first, "second": second}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1, help="`lookalike serve --workers`")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lookalike-serve-load-") as work:
        r = run_load_test(Path(work), seconds=args.seconds, clients=args.clients, items=args.items, dim=args.dim,
                          workers=args.workers)  # fmt: skip
    print(
        f"machine: {machine()}; {args.items:,} × {args.dim} vectors, index auto; {args.clients} clients, "
        f"{args.seconds:.0f} s, snapshot swapped half-way; {args.workers} server process(es)\n"
    )
    print("| requests | errors | requests/s | p50 ms | p99 ms | max ms | answered by first / second snapshot "
          "| server's own MiB |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")  # fmt: skip
    print(
        f"| {r['requests']:,} | {r['errors']} | {r['requests_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
        f"| {r['max_ms']:.1f} | {r['served'].get(r['first'], 0):,} / {r['served'].get(r['second'], 0):,} "
        f"| {r['server_own_mib']:,.0f} |"
    )
    print(
        f"\nslowest request started {r['max_at_s']:.1f} s into the run; the publish began at {r['swap_at_s']:.1f} s; "
        f"max after the first 2 s {r['max_after_warmup_ms']:.1f} ms, within 3 s of the publish "
        f"{r['max_around_swap_ms']:.1f} ms"
    )
    if r["errors"]:
        print(f"outcomes: {r['outcomes']}")


if __name__ == "__main__":
    main()
