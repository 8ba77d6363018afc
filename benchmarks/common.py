"""Shared benchmark helpers: realistic JPEGs from scikit-image's bundled photos, machine facts, timing."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

if TYPE_CHECKING:
    from encoder.resize import PackedImages

_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field", "retina")


def scratch_dir(prefix: str) -> Path:
    """A new folder under the system's temporary folder, removed when this process exits."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    return work


def realistic_jpegs(folder: Path, count: int, width: int = 640, quality: int = 90, seed: int = 0,
                    first: int = 0, grain: float = 0.0) -> list[Path]:  # fmt: skip
    """`count` JPEGs of ~`width` px made from real photos: random crops, flips and rescales; named from `first`.
    `grain`: the standard deviation of noise added after the rescale, in levels, as a camera's sensor leaves it:
    photos upscaled past their source are smooth, and compress (and decode) far faster than a camera's."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in _PHOTOS]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop = crop.resize((width, int(width * ch / cw)), Image.Resampling.BICUBIC)
        if grain:
            noisy = np.asarray(crop, dtype=np.float32) + rng.normal(0.0, grain, (crop.height, crop.width, 3))
            crop = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        buffer = io.BytesIO()
        crop.save(buffer, "JPEG", quality=quality)
        path = folder / f"{first + i:06d}.jpg"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def packed_interleaved(images: list[np.ndarray], device) -> PackedImages:
    """(h, w, 3) uint8 images side by side in one buffer on `device`, with a widest row's room after the last: a
    batch as nvImageCodec's decoder hands it to the resize (`encoder.resize.PackedImages`)."""
    import torch

    from encoder.resize import PackedImages

    room = np.zeros(3 * max(i.shape[1] for i in images), np.uint8)
    buffer = torch.from_numpy(np.concatenate([i.ravel() for i in images] + [room])).to(device)
    offsets = tuple(int(o) for o in np.cumsum([0] + [i.size for i in images[:-1]]))
    return PackedImages(buffer, offsets, tuple(i.shape[:2] for i in images))


LEVEL = 2 / 255  # one uint8 level in the model's normalised units (mean 0.5, std 0.5: a range of 2)


def level_diff(a: np.ndarray, b: np.ndarray) -> dict:
    """|a − b| of two uint8 arrays in levels: mean, 99th percentile, max, the share of values equal; and the mean
    and max in normalised units."""
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"mean_levels": round(float(d.mean()), 3), "p99_levels": int(np.percentile(d, 99)),
            "max_levels": int(d.max()), "equal_pct": round(100 * float((d == 0).mean()), 1),
            "mean_normalised": round(float(d.mean()) * LEVEL, 4), "max_normalised": round(int(d.max()) * LEVEL, 3)}  # fmt: skip


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shape_args(doc: str, shapes, images_help: str, commands: tuple[str, ...] = ()) -> argparse.Namespace:
    """The command line of a benchmark of `lookalike` runs in new processes: `--shape` (one of `shapes`), `--images`
    (`images_help`), `--rounds`, and `--command` where it measures more than one (`commands`, the first by default)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if commands:
        parser.add_argument("--command", default=commands[0], choices=commands)
    parser.add_argument("--shape", default="smoke", choices=sorted(shapes))
    parser.add_argument("--images", type=int, default=200, help=images_help)
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args()


def timed_process(command: list[str]) -> tuple[float, str]:
    """Run `command` in a new process from the project's root, offline; its wall seconds and stdout. A failure ends
    the benchmark with the process's last error lines."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
    took = time.monotonic() - started
    if done.returncode:
        raise SystemExit(f"error: a measured process failed:\n{done.stderr[-2000:]}")
    return took, done.stdout


def photos_on_gcs(folder: Path, count: int, bucket: str = "photos") -> tuple[list[Path], list[str], float]:
    """`count` realistic JPEGs written under `folder` and uploaded to a new bucket of the GCS emulator in use:
    (their paths, their gs:// URIs, their mean size in KB)."""
    from encoder import storage

    storage.gcs_client().create_bucket(bucket)
    photos = realistic_jpegs(folder, count)
    uris = [f"gs://{bucket}/{p.name}" for p in photos]
    for path, uri in zip(photos, uris, strict=True):
        storage.write_bytes(uri, path.read_bytes())
    return photos, uris, sum(p.stat().st_size for p in photos) / len(photos) / 1000


def process_memory_mib(field: str = "VmHWM") -> float:
    """A memory field of this process's /proc/self/status, in MiB: `VmHWM` its peak resident memory (unlike
    `ru_maxrss`, which a process started by fork and exec inherits from its parent), `RssAnon` its anonymous memory
    now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_pids(pid: int) -> set[int]:
    """The processes whose parent is `pid` (from each process's /proc/PID/stat, which every Linux kernel has)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # past "pid (comm)": state, ppid, ...
        except OSError:  # gone meanwhile
            continue
        if len(fields) > 1 and fields[1] == str(pid):
            children.add(int(stat.parent.name))
    return children


def best_of_checkouts(ways: list[str], rounds: int, code_env: str, command: Callable[[str], list[str]],
                      lowest: tuple[str, ...] = ("seconds", "peak_mib")) -> dict:  # fmt: skip
    """Each way's measurement in a fresh process, `rounds` times, the ways alternated: `command(way)` prints a JSON
    object last. A way is `now` (this checkout) or the folder of another checkout (the code before a change), which
    `code_env` hands the child to put first on its path, either followed by `@` and what the way varies. The lowest
    of each way's rounds for the fields in `lowest`; its other fields from the first."""
    results: dict[str, list[dict]] = {way: [] for way in ways}
    for _ in range(rounds):
        for way in ways:
            code = way.partition("@")[0]
            checkout = Path(__file__).resolve().parents[1] if code == "now" else Path(code).resolve()
            env = {**os.environ, code_env: str(checkout)}
            done = subprocess.run(command(way), capture_output=True, text=True, env=env)
            if done.returncode:
                raise SystemExit(f"way {way} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            results[way].append(json.loads(done.stdout.splitlines()[-1]))
    return {way: {**rs[0], **{field: min(r[field] for r in rs) for field in lowest}} for way, rs in results.items()}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def rate(n: int, fn: Callable[[], object], repeats: int = 1) -> float:
    """Best-of-`repeats` items per second for `fn` processing `n` items."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def images_per_s(fn: Callable[[], object], batch: int, seconds: float, device, warmup: int = 1) -> float:
    """Images/s of calling `fn` (one batch each) for about `seconds`, after `warmup` calls; CUDA-synchronised."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        done += batch
    sync()
    return done / (time.perf_counter() - start)


def print_table(results: dict[str, float], baseline: str) -> None:
    """A Markdown table of images/s, each row also as a ratio to the first (the baseline)."""
    base = next(iter(results.values()))
    print(f"| path | images/s | × {baseline} |\n| --- | ---: | ---: |")
    for name, value in results.items():
        print(f"| {name} | {value:,.0f} | {value / base:.1f} |")


def clustered(n: int, dim: int, clusters: int = 50, spread: float = 0.25, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres (noise `spread` × the centres' scale): neighbourhoods, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, size=n)] + spread * rng.normal(size=(n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_run(run_dir: Path, vectors: np.ndarray, ids: list[str] | None = None, model_version: str = "siglip-test",
              shards: int = 3) -> str:  # fmt: skip
    """An embed run directory with `shards` Parquet files and its _manifest.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    n, dim = vectors.shape
    ids = ids or [f"item-{i:06d}" for i in range(n)]
    listed = []
    for s, rows in enumerate(np.array_split(np.arange(n), shards)):
        table = pa.table({
            "item_id": pa.array([ids[i] for i in rows], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors[rows].reshape(-1)), dim),
            "image_sha256": pa.array(["0" * 64] * len(rows)),
            "model_version": pa.array([model_version] * len(rows)),
            "embedded_at": pa.array([0] * len(rows), pa.timestamp("us", tz="UTC")),
        })  # fmt: skip
        name = f"part-{s:05d}-of-{shards:05d}.parquet"
        pq.write_table(table, run_dir / name)
        listed.append({"path": name, "rows": len(rows), "bytes": (run_dir / name).stat().st_size})
    manifest = {"run_id": run_dir.name, "model_version": model_version, "dim": dim, "shards": listed,
                "counts": {"items_in": n, "embedded": n, "reused": 0, "dead_lettered": 0}}  # fmt: skip
    (run_dir / "_manifest.json").write_text(json.dumps(manifest))
    return str(run_dir)


def run_sampling_memory(cmd: list[str], interval: float = 0.02) -> tuple[float, list[tuple[float, dict]], str]:
    """Run `cmd`, reading /proc/PID/status every `interval` s.

    Returns:
        (seconds, [(seconds since start, {"VmRSS", "RssAnon", "RssFile": bytes})], stderr).

    Raises:
        RuntimeError: the command failed (its stderr's tail in the message).
    """
    import subprocess
    import tempfile

    start, samples = time.monotonic(), []
    with tempfile.TemporaryFile() as err:
        job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        while job.poll() is None:
            try:
                status = Path(f"/proc/{job.pid}/status").read_text()
            except OSError:
                break
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if "RssAnon" in fields:
                sizes = {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile")}
                samples.append((time.monotonic() - start, sizes))
            time.sleep(interval)
        job.wait()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if job.returncode != 0:
        raise RuntimeError(f"{cmd[:2]} exited {job.returncode}: {stderr[-2000:]}")
    return time.monotonic() - start, samples, stderr


def run_watching_memory(cmd: list[str], interval: float = 0.02) -> tuple[float, int, int, str]:
    """Run `cmd`; return (seconds, peak RssAnon bytes, peak RssFile bytes, stderr) (see `run_sampling_memory`)."""
    seconds, samples, stderr = run_sampling_memory(cmd, interval)
    peak = {k: max((s[k] for _, s in samples), default=0) for k in ("RssAnon", "RssFile")}
    return seconds, peak["RssAnon"], peak["RssFile"], stderr


def busy_python(stop: threading.Event) -> None:
    """Pure Python: holds the interpreter lock until the interpreter makes it switch (every 5 ms)."""
    while not stop.is_set():
        sum(range(500))


def busy_torch(stop: threading.Event) -> None:
    """Small torch ops: each releases and retakes the lock, as the GPU worker's launches do."""
    import torch

    x = torch.ones(8)
    while not stop.is_set():
        x = (x + 1) * 0.5


BUSY_CASES = {
    "alone": None,
    "beside a pure-Python thread": busy_python,
    "beside a thread of small torch ops": busy_torch,
}


@contextlib.contextmanager
def beside(busy: Callable[[threading.Event], None] | None) -> Iterator[None]:
    """Run the body with `busy(stop)` in a thread of its own, already running; None: alone."""
    stop = threading.Event()
    other = threading.Thread(target=busy, args=(stop,), daemon=True) if busy else None
    if other:
        other.start()
        time.sleep(0.05)
    try:
        yield
    finally:
        stop.set()
        if other:
            other.join()


class StackSampler:
    """Where each thread spends a run: every `interval` s, the innermost frame of every Python thread.

    A profiler with no dependency, for machines where py-spy cannot go (a leased GPU host). `top()` gives,
    per thread name (numbered pool threads merged), its busiest frames as percentages of its samples;
    frames in `threading`/`queue`/idle pool waits read as "waiting". Costs the sampled threads ~1-2% (the GIL).
    """

    _WAITS = ("threading.py", "queue.py", "concurrent/futures/_base.py", "concurrent/futures/thread.py")

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.counts = interval, {}

    def __enter__(self) -> StackSampler:
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import re
        import threading

        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            names = {t.ident: re.sub(r"[_-]?\d+( \(\w+\))?$", "", t.name) for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                name = names.get(ident, "?")
                path = frame.f_code.co_filename
                where = ("waiting" if path.endswith(self._WAITS) else
                         f"{frame.f_code.co_name} ({'/'.join(Path(path).parts[-2:])}:{frame.f_lineno})")  # fmt: skip
                per = self.counts.setdefault(name, {})
                per[where] = per.get(where, 0) + 1

    def top(self, n: int = 6) -> dict[str, dict[str, float]]:
        out = {}
        for name, per in sorted(self.counts.items(), key=lambda kv: -sum(kv[1].values())):
            total = sum(per.values())
            out[f"{name} ({total} samples)"] = {
                where: round(100 * c / total, 1) for where, c in sorted(per.items(), key=lambda kv: -kv[1])[:n]
            }
        return out


@contextlib.contextmanager
def bundles_timed(spent: list[tuple[str, float]]) -> Iterator[None]:
    """Each bundle the local runner (`FnApiRunner`) executes in it: its stage's name and seconds, appended to `spent`."""
    from unittest import mock

    from apache_beam.runners.portability.fn_api_runner import fn_runner

    execute = fn_runner.FnApiRunner._execute_bundle

    def timed(self, context, stage_context, bundle_input):
        started = time.perf_counter()
        try:
            return execute(self, context, stage_context, bundle_input)
        finally:
            spent.append((stage_context.stage.name, time.perf_counter() - started))

    with mock.patch.object(fn_runner.FnApiRunner, "_execute_bundle", timed):
        yield


def stage_label(name: str) -> str:
    """A fused stage's name (`((a)+(b))+(c)`, Beam's ids of its steps) as its first and last steps: `a … c`."""
    steps = [re.sub(r"_\d+$", "", s.removeprefix("ref_AppliedPTransform_")) for s in re.findall(r"[^()+]+", name)]
    return steps[0] if len(steps) == 1 else f"{steps[0]} … {steps[-1]}"


def print_ways(seconds: dict[tuple[int, str], list[float]], sizes: list[int], ways, extra_headers: tuple[str, ...] = (),
               extra: Callable[[int, str], list[str]] = lambda n, way: [], size_header: str = "images") -> None:  # fmt: skip
    """A Markdown table of runs by catalog size (`size_header`) and way: each run's seconds, their median and its ratio
    to the first way's (`× before`); then the `extra` cells of each row (`extra(n, way)`, formatted) under
    `extra_headers`."""
    ways = list(ways)
    headers = [size_header, "way", "seconds, each run", "median", "× before", *extra_headers]
    print("\n| " + " | ".join(headers) + " |")
    print("| ---: | --- | " + " | ".join(["---:"] * (len(headers) - 2)) + " |")
    for n in sizes:
        base = float(np.median(seconds[n, ways[0]]))
        for way in ways:
            runs, median = seconds[n, way], float(np.median(seconds[n, way]))
            cells = [f"{n:,}", way, " / ".join(f"{s:.3f}" for s in runs), f"{median:.3f}", f"{median / base:.2f}"]
            print("| " + " | ".join([*cells, *extra(n, way)]) + " |")
