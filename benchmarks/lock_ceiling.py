"""The GPU worker's ceiling when its GPU work hands the interpreter lock over as the real calls do, on the CPU.

    python benchmarks/lock_ceiling.py [--images 12000] [--batch-size 256]

`worker_overhead.py` stands the decoder and the model in by no-ops: it measures the host's own
per-image work. On a GPU host the decode, resize and model threads also call into torch and the
decoders, and each such call releases the interpreter lock and must take it back, behind whatever
thread holds it (Beam's runner thread runs pure Python). Here the stand-ins keep that shape and
nothing else:
  the decoder releases the lock for as long as the hardware decoder takes (`--decode-rate`, 14,000
  images/s: nvImageCodec's alone on the H200) and hands back blank images of all-different sizes,
  so the real resize makes its real calls: as separate tensors (nvJPEG's; one copy per image) or
  packed in one buffer (lookalike's nvImageCodec binding; a few gathers per chunk);
  the model makes `calls` calls into torch per batch on a tiny tensor and queues the batch on a
  simulated device that finishes `--model-rate` images/s (10,600: the compiled SigLIP base alone on
  the H200); taking the vectors waits for it without the lock, as `PendingVectors.result` does; its
  vectors are random, `--dim` wide (768: SigLIP base's), so the shards cost what real ones do to encode.
The `compiled-packed-before` variant has Beam's tables of vectors go as before two changes
(`benchmarks/beam_before.py`): each encoded into its shard in the runner's thread, and pickled for Beam's size
sampling; `compiled-packed-reads-before` has each chunk of local files read as before reads were sent to the
reader processes ahead: the runner's thread waiting for them.
`calls` is 321 (SigLIP base's eager forward, `model_gil.py`), 250 (compiled: a launch per kernel, each
handing the lock over; on the H200 beside a pure-Python thread a compiled batch took ~250 switch intervals)
or 3 (one CUDA graph: copy in, replay, copy out). For each variant and each interpreter switch interval
(`--switch-ms`, `sys.setswitchinterval`; Python's default is 5 ms), the standalone loop (reader processes)
and the Beam pipeline (whole run, and steady state: less a run over 1% of the files), alternated, `--rounds`
runs each; the ideal is the slower of the two rates. Beside each rate, the model's launch: ms per batch in
its calls, the lock's waits included (alone, on an idle interpreter, it is the calls' own cost); and the CPU
time per image of the thread that runs the standalone loop or Beam's runner (the local runner runs bundles on
the thread that calls it): work that no number of cores spreads. Results go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import encoder.gpu_images as gpu_images  # noqa: E402
import pipelines.embed_dofns as embed_dofns  # noqa: E402
from benchmarks.beam_before import reads_as_before, tables_as_before  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from benchmarks.gpu_embed import SHAPES, _checkpoint, _make_images  # noqa: E402
from benchmarks.worker_overhead import SIZE, beam, direct  # noqa: E402
from encoder.model import ImageEncoder, PendingVectors  # noqa: E402
from encoder.resize import PackedImages  # noqa: E402

EAGER_CALLS, COMPILED_CALLS, GRAPH_CALLS = 321, 250, 3
VARIANTS = {  # name on the command line: (its name in the table, the model's calls per batch, images packed,
    # what runs the variant as before a change to the Beam runner's thread: `benchmarks.beam_before`)
    "eager": ("per-op calls (eager), separate images", EAGER_CALLS, False, None),
    "compiled-packed": ("per-kernel launches (compiled), packed images", COMPILED_CALLS, True, None),
    "compiled-packed-before": (
        "per-kernel launches (compiled), packed images, Beam's tables as before (encoded in the runner's thread, "
        "pickled to be sized)",
        COMPILED_CALLS,
        True,
        tables_as_before,
    ),
    "compiled-packed-reads-before": (
        "per-kernel launches (compiled), packed images, local reads as before (each chunk's waited for by the "
        "runner's thread)",
        COMPILED_CALLS,
        True,
        reads_as_before,
    ),
    "graph-separate": ("one CUDA graph, separate images", GRAPH_CALLS, False, None),
    "graph-packed": ("one CUDA graph, packed images", GRAPH_CALLS, True, None),
}
LAUNCH_S: list[float] = []  # each batch's launch, seconds: its calls and the lock's waits between them


class SimulatedDevice:
    """A queue that finishes `rate` images/s, one batch after another, as a GPU stream does."""

    def __init__(self, rate: float) -> None:
        self.rate, self.free_at, self.lock = rate, 0.0, threading.Lock()

    def queue(self, n: int) -> float:
        with self.lock:
            self.free_at = max(self.free_at, time.perf_counter()) + n / self.rate
            return self.free_at


class _Done:
    """`torch.cuda.Event`'s part that `PendingVectors` uses: waits (without the lock) until the device is done."""

    def __init__(self, at: float) -> None:
        self.at = at

    def synchronize(self) -> None:
        time.sleep(max(0.0, self.at - time.perf_counter()))


def timed_decoder(rate: float, packed: bool):
    """Blank images of all-different sizes after the decoder's time, the lock released: separate tensors, as
    torchvision's nvJPEG hands them back, or `packed` in one buffer, as lookalike's nvImageCodec binding does."""

    def factory(device=None):
        def decode(datas, device):
            time.sleep(len(datas) / rate)
            shapes = [(SIZE + k, SIZE) for k in range(len(datas))]
            if not packed:
                return [torch.zeros((3, h, w), dtype=torch.uint8) for h, w in shapes]
            sizes = [3 * h * w for h, w in shapes]
            offsets = [sum(sizes[:k]) for k in range(len(sizes))]
            buffer = torch.zeros(sum(sizes) + 3 * SIZE, dtype=torch.uint8)  # a row of slack, as the binding leaves
            return PackedImages(buffer, tuple(offsets), tuple(shapes)), list(range(len(datas)))

        return decode

    return factory


@functools.cache
def _vectors(dim: int, rows: int = 4096) -> torch.Tensor:
    vectors = torch.randn((rows, dim), generator=torch.Generator().manual_seed(0))
    return vectors / vectors.norm(dim=1, keepdim=True)


def calling_launch(calls: int, device: SimulatedDevice):
    """`ImageEncoder.launch` as seen by the lock: `calls` calls into torch, then the batch queued on the device."""

    def launch(self, batch, eager: bool = False) -> PendingVectors:
        start = time.perf_counter()
        x = torch.ones(8)
        for _ in range(calls):
            x = x.add(1.0)
        LAUNCH_S.append(time.perf_counter() - start)
        vectors = _vectors(self.dim)[: len(batch)]  # random: Parquet encodes them as it does real ones
        return PendingVectors(vectors, _Done(device.queue(len(batch))))

    return launch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=12_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--decode-rate", type=float, default=14_000)
    parser.add_argument("--model-rate", type=float, default=10_600)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dim", type=int, default=768, help="the vectors' width (SigLIP base: 768)")
    parser.add_argument("--switch-ms", default="5", help="interpreter switch intervals to run, comma-separated")
    parser.add_argument("--variants", default="eager,graph-separate,graph-packed",
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")  # fmt: skip
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    device = SimulatedDevice(args.model_rate)
    embed_dofns.gpu_decoding = lambda cfg, preprocess: True
    variants = [VARIANTS[v] for v in args.variants.split(",")]
    intervals = [float(ms) for ms in args.switch_ms.split(",")]
    default_interval = sys.getswitchinterval()
    work = Path(tempfile.mkdtemp(prefix="lookalike-lock-ceiling-"))
    results: dict[str, list[float]] = {}
    launches: dict[str, list[float]] = {}  # the model's launch, ms per batch, each run
    own: dict[str, list[float]] = {}  # the CPU time of the thread that runs the loop or the runner, s per image
    try:
        files = sorted(str(p) for p in _make_images(work / "jpegs", args.images, 640))
        shape = dict(SHAPES["smoke"], image_size=SIZE, patch_size=SIZE, hidden_size=args.dim)
        ckpt = _checkpoint(work / "ckpt", shape)
        (work / "small").mkdir()
        for f in files[: max(1, len(files) // 100)]:
            shutil.copy(f, work / "small")
        print(f"machine: {machine()}; {len(files):,} JPEGs; batch {args.batch_size}; decoder {args.decode_rate:,.0f}"
              f" images/s, model {args.model_rate:,.0f} images/s (ideal: {min(args.decode_rate, args.model_rate):,.0f})")  # fmt: skip
        for _ in range(args.rounds):
            for ms in intervals:
                sys.setswitchinterval(ms / 1000)
                for name, calls, packed, before in variants:
                    name = f"{name}, switch {ms:g} ms"
                    ImageEncoder.launch = calling_launch(calls, device)  # on the class: Beam keeps its encoder
                    gpu_images.DECODERS["nvjpeg"] = timed_decoder(args.decode_rate, packed)
                    LAUNCH_S.clear()
                    (rate, _), loop_cpu = _on_this_thread(direct, files, ckpt, work / "d", args.batch_size, "processes")
                    _record(results, launches, own, f"standalone loop, {name}", rate, loop_cpu / len(files))
                    with before() if before else contextlib.nullcontext():
                        (n, whole, _), whole_cpu = _on_this_thread(beam, str(work / "jpegs" / "*" / "*.jpg"), ckpt,
                                                                   work / "e", args.batch_size)  # fmt: skip
                        _record(results, launches, own, f"Beam pipeline, whole run, {name}", n / whole, whole_cpu / n)
                        (n_small, fixed, _), fixed_cpu = _on_this_thread(beam, str(work / "small" / "*.jpg"), ckpt,
                                                                         work / "e1", args.batch_size)  # fmt: skip
                    _record(results, None, own, f"Beam pipeline, steady state, {name}", (n - n_small) / (whole - fixed),
                            (whole_cpu - fixed_cpu) / (n - n_small))  # fmt: skip
    finally:
        sys.setswitchinterval(default_interval)
        shutil.rmtree(work, ignore_errors=True)
    ideal = min(args.decode_rate, args.model_rate)
    alone = _launch_alone(calls for _, calls, *_ in variants)
    print("\nThe model's launch alone (its calls, no other thread), ms per batch: "
          + ", ".join(f"{calls} calls {ms:.2f}" for calls, ms in alone.items()))  # fmt: skip
    print("\n| path | images/s, each run | × ideal | the model's launch, ms per batch, each run "
          "| the loop's or runner's thread, CPU µs per image |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, runs in results.items():
        launch = " / ".join(f"{ms:.2f}" for ms in launches.get(name, []))
        cpu = " / ".join(f"{1e6 * c:.0f}" for c in own[name])
        print(f"| {name} | {' / '.join(f'{r:,.0f}' for r in runs)} | {np.mean(runs) / ideal:.2f} | {launch} | {cpu} |")


def _on_this_thread(fn, *args):
    """`fn(*args)` and the CPU seconds this thread spent in it: the standalone loop's, or the local runner's (its
    bundles run on the calling thread), the serial part of a worker whatever its cores."""
    start = time.thread_time()
    return fn(*args), time.thread_time() - start


def _record(results: dict, launches: dict | None, own: dict, name: str, rate: float, cpu_per_image: float) -> None:
    results.setdefault(name, []).append(rate)
    own.setdefault(name, []).append(cpu_per_image)
    if launches is not None:
        launches.setdefault(name, []).append(_launch_ms())


def _launch_ms() -> float:
    """The mean launch of the run just done, ms (the warm-up batch's included: one of many)."""
    return 1000 * float(np.mean(LAUNCH_S)) if LAUNCH_S else float("nan")


def _launch_alone(counts, batches: int = 50) -> dict[int, float]:
    """Each count of calls launched with no other thread: the waits are what the runs add to this."""
    alone = {}
    for calls in sorted(set(counts)):
        launch, device = calling_launch(calls, SimulatedDevice(1e12)), SimpleNamespace(dim=4)
        LAUNCH_S.clear()
        for _ in range(batches):
            launch(device, [None])
        alone[calls] = 1000 * float(np.median(LAUNCH_S))
    return alone


if __name__ == "__main__":
    main()
