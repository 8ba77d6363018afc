"""The model's whole device step, uint8 pixels to unit vectors, captured once as a CUDA graph and replayed.

Every torch op called from Python releases the interpreter lock and takes it back, and beside a thread
running pure Python each retake can wait a switch interval (5 ms). SigLIP base's eager forward makes ~300
such calls per batch (a compiled one still calls its matmuls one by one); in the GPU worker, where decode,
resize, writer and Beam's own threads share that lock, the model's thread can spend longer waiting for it
than the GPU spends on the batch. Replayed, a batch costs three calls: copy in, replay, copy out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

__all__ = ["GraphedStep", "capture_cuda_graph"]

Step = Callable[[torch.Tensor], torch.Tensor]  # (n, h, w, 3) uint8 -> (n, dim) float32
Capture = Callable[[Step, torch.Tensor], tuple[torch.Tensor, Callable[[], None]]]


def capture_cuda_graph(step: Step, static_input: torch.Tensor, warmup: int = 2) -> tuple[torch.Tensor, Callable]:
    """Capture `step(static_input)` as a CUDA graph; returns its output buffer and the replay.

    The warm-up runs on a side stream, as capture needs: it compiles a `torch.compile`d model and makes the
    one-off copies (normalisation constants) that a capture may not contain. Only this thread is barred
    from unsafe calls while capturing, so the worker's other threads carry on.
    """
    device = static_input.device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step(static_input)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        output = step(static_input)
    return output, graph.replay


class GraphedStep:
    """`step` captured at one batch shape; each call takes up to that many images.

    The graph reads and writes fixed buffers, so a call copies the chunk in, replays, and queues the copy
    of its vectors out on the same stream before the next call can overwrite them. Calls are serialised:
    two threads must not interleave their copies around one replay.
    """

    def __init__(self, step: Step, example: torch.Tensor, capture: Capture = capture_cuda_graph) -> None:
        self.input = example.clone()
        self.output, self._replay = capture(step, self.input)
        self._lock = threading.Lock()

    @property
    def batch_size(self) -> int:
        return len(self.input)

    def __call__(self, chunk: torch.Tensor, out: torch.Tensor) -> None:
        """Write the vectors of `chunk` (at most `batch_size` images) into `out`, without waiting for them.

        Rows past the chunk keep an earlier batch's pixels: each image's vector depends on its own pixels
        only, and those rows' vectors are never copied out.
        """
        n = len(chunk)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"a graph captured at {self.batch_size} images cannot take {n}")
        with self._lock:
            self.input[:n].copy_(chunk, non_blocking=True)
            self._replay()
            out.copy_(self.output[:n], non_blocking=True)
