"""The model's step replayed as one CUDA graph: buffers, short chunks, refusals; on CUDA, the graph itself.

On the CPU the capture is stood in by `_replaying`: it keeps the graph's contract (fixed input and output
buffers, a replay that reads the one and overwrites the other), so what the encoder does around a graph is
tested here; the `gpu` tests capture a real one.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch

from encoder import EncoderConfig, load_encoder
from encoder.cuda_graph import GraphedStep


def _replaying(calls: list[str] | None = None):
    """A capture for the CPU: runs the step once, then each replay reruns it into the same output buffer."""

    def capture(step, static_input):
        output = step(static_input).clone()

        def replay() -> None:
            if calls is not None:
                calls.append("replay")
            output.copy_(step(static_input))

        return output, replay

    return capture


@pytest.fixture
def encoder(tiny_model):
    return load_encoder(EncoderConfig(model=str(tiny_model), device="cpu", batch_size=8))


def _pixels(encoder, n: int, seed: int) -> np.ndarray:
    size = (n, encoder.preprocess.height, encoder.preprocess.width, 3)
    return np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8)


def test_a_graphed_encoder_gives_the_same_vectors_for_full_and_short_chunks(encoder):
    pixels = _pixels(encoder, 19, seed=0)  # chunks of 8, 8 and 3
    expected = encoder.embed_prepared(pixels)
    assert encoder.capture_graph(_replaying())
    np.testing.assert_allclose(encoder.embed_prepared(pixels), expected, atol=1e-6)
    # a short chunk after a full one: the rows it leaves hold the full one's pixels, and must not leak out
    encoder.embed_prepared(_pixels(encoder, 8, seed=1))
    np.testing.assert_allclose(encoder.embed_prepared(pixels[:3]), expected[:3], atol=1e-6)


def test_each_chunk_is_one_replay_and_the_step_never_runs_outside_it(encoder):
    calls: list[str] = []
    encoder.capture_graph(_replaying(calls))
    step = encoder._step
    encoder._step = lambda pixels: pytest.fail("the eager step ran beside the graph")
    encoder.embed_prepared(_pixels(encoder, 19, seed=2))
    assert calls == ["replay"] * 3
    encoder._step = step


def test_a_graph_takes_no_more_images_than_it_was_captured_with(encoder):
    graph = GraphedStep(encoder._step, torch.zeros((4, encoder.preprocess.height, encoder.preprocess.width, 3),
                                                   dtype=torch.uint8), _replaying())  # fmt: skip
    out = torch.empty((5, encoder.dim))
    with pytest.raises(ValueError, match="captured at 4 images cannot take 5"):
        graph(torch.as_tensor(_pixels(encoder, 5, seed=3)), out)


def test_a_model_that_cannot_be_captured_keeps_running_without_a_graph(encoder, caplog):
    def refuse(step, static_input):
        raise RuntimeError("operation not permitted when stream is capturing")

    pixels = _pixels(encoder, 5, seed=4)
    expected = encoder.embed_prepared(pixels)
    with caplog.at_level(logging.WARNING, logger="encoder.model"):
        assert not encoder.capture_graph(refuse)
    assert encoder.graph is None and "not permitted when stream is capturing" in caplog.text
    np.testing.assert_array_equal(encoder.embed_prepared(pixels), expected)


def test_calls_from_two_threads_do_not_interleave_around_a_replay(encoder):
    """Copy in, replay, copy out: another thread's copy in between would hand one batch the other's vectors."""
    events: list[str] = []

    def capture(step, static_input):
        def replay() -> None:
            events.append("replay")
            threading.Event().wait(0.002)  # lets the other thread run, were it not locked out

        return torch.zeros((len(static_input), encoder.dim)), replay

    graph = GraphedStep(encoder._step, torch.zeros((2, 2, 2, 3), dtype=torch.uint8), capture)
    recorded = graph._replay

    def replay() -> None:
        events.append(f"in:{threading.current_thread().name}")
        recorded()
        events.append(f"out:{threading.current_thread().name}")

    graph._replay = replay
    chunk, out = torch.zeros((1, 2, 2, 3), dtype=torch.uint8), torch.empty((1, encoder.dim))
    threads = [threading.Thread(target=lambda: [graph(chunk, out) for _ in range(20)], name=f"t{i}") for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    triples = [events[i : i + 3] for i in range(0, len(events), 3)]
    assert len(triples) == 40
    assert all(a[3:] == c[4:] and b == "replay" for a, b, c in triples)


def test_asking_for_a_cuda_graph_on_the_cpu_warns_and_runs_without_one(tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="encoder.model"):
        cpu = load_encoder(EncoderConfig(model=str(tiny_model), device="cpu", cuda_graph=True))
    assert cpu.graph is None and "cuda_graph needs a CUDA device" in caplog.text


@pytest.mark.gpu
def test_a_captured_graph_matches_the_eager_model_and_never_waits_for_the_gpu(tiny_model):
    eager = load_encoder(EncoderConfig(model=str(tiny_model), device="cuda", batch_size=16))
    graphed = load_encoder(EncoderConfig(model=str(tiny_model), device="cuda", batch_size=16, cuda_graph=True))
    assert graphed.graph is not None
    size = (graphed.preprocess.height, graphed.preprocess.width, 3)
    pixels = torch.randint(0, 256, (37, *size), dtype=torch.uint8, device="cuda")
    expected = eager.embed_prepared(pixels)
    cosine = (graphed.embed_prepared(pixels) * expected).sum(axis=1)
    assert cosine.min() > 0.999, f"graph vs eager cosine as low as {cosine.min()}"
    one_at_a_time = [graphed.embed_prepared(pixels[i : i + 16]) for i in (0, 16)]
    torch.cuda.set_sync_debug_mode("error")
    try:  # two in flight, as the GPU worker runs them: the second replay must not overwrite the first's vectors
        pending = [graphed.launch(pixels[0:16]), graphed.launch(pixels[16:32])]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for p, alone in zip(pending, one_at_a_time, strict=True):
        np.testing.assert_array_equal(p.result(), alone)
    host = graphed.embed_prepared(pixels[:5].cpu().numpy())  # from the host: copied straight into the graph's input
    np.testing.assert_array_equal(host, one_at_a_time[0][:5])
