"""The model's share of the GPU's SMs (`encoder.sm_share`): the counts, the green context asked for, and what a
device or torch build without them does; on a GPU, that the model gives the same vectors there."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch.cuda import green_contexts

from encoder.model import EncoderConfig, ImageEncoder, load_encoder
from encoder.sm_share import SmShare, SmShareError, model_sm_count, share_sms
from tests.support.fake_cuda import FakeCuda

HOPPER, AMPERE, VOLTA = (9, 0), (8, 0), (7, 0)


@pytest.mark.parametrize(
    ("total", "decode", "capability", "model"),
    [(132, 8, HOPPER, 120), (132, 4, HOPPER, 128), (132, 16, HOPPER, 112), (132, 124, HOPPER, 8),
     (108, 8, AMPERE, 100), (108, 103, AMPERE, 4), (80, 3, VOLTA, 76), (28, 5, (6, 1), 23)],
)  # fmt: skip
def test_the_model_takes_what_is_left_in_the_partitions_the_architecture_allows(total, decode, capability, model):
    assert model_sm_count(total, decode, capability) == model
    assert total - model >= decode


@pytest.mark.parametrize(("total", "decode", "capability"), [(132, 0, HOPPER), (132, -8, HOPPER), (132, 125, HOPPER),
                                                             (108, 105, AMPERE), (132, 200, HOPPER)])  # fmt: skip
def test_a_count_that_does_not_fit_the_gpu_says_what_does(total, decode, capability):
    with pytest.raises(ValueError, match=rf"decode_sms must be 1 to \d+ on this GPU \({total} SMs"):
        model_sm_count(total, decode, capability)


class _FakeGreenContext:
    """Records what was asked of it; `with_stream`: whether torch's binding has `Stream()`."""

    def __init__(self, with_stream: bool, log: list[str]) -> None:
        self._with_stream, self.log = with_stream, log

    def Stream(self):  # noqa: N802 - torch's name
        if not self._with_stream:
            raise AttributeError("Stream")
        self.log.append("its own stream")
        return "green stream"

    def set_context(self) -> None:
        self.log.append("set")

    def pop_context(self) -> None:
        self.log.append("pop")


@pytest.fixture
def hopper(monkeypatch):
    """A CUDA device as `share_sms` sees it: an H100's 132 SMs, green contexts that record their making."""
    log: list[str] = []
    made: list[dict] = []
    monkeypatch.setattr(green_contexts, "SUPPORTED", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: HOPPER)

    def create(with_stream: bool = True):
        def make(**kwargs):
            made.append(kwargs)
            return _FakeGreenContext(with_stream, log)

        monkeypatch.setattr(green_contexts.GreenContext, "create", staticmethod(make))

    create()
    return SimpleNamespace(log=log, made=made, create=create)


def test_the_model_gets_a_green_context_of_what_is_left_and_its_stream(hopper):
    share = share_sms(torch.device("cuda", 1), 16)
    assert hopper.made == [{"num_sms": 112, "device_id": 1}]
    assert (share.stream, share.model_sms, share.total_sms, share.decode_sms) == ("green stream", 112, 132, 20)
    assert hopper.log == ["its own stream"]


def test_without_torchs_stream_binding_the_stream_is_made_while_the_green_context_is_current(hopper, monkeypatch):
    hopper.create(with_stream=False)
    monkeypatch.setattr(torch.cuda, "Stream", lambda index: hopper.log.append(f"stream on {index}") or "made")
    share = share_sms(torch.device("cuda"), 8)
    assert share.stream == "made" and hopper.made == [{"num_sms": 120, "device_id": 0}]
    assert hopper.log == ["set", "stream on 0", "pop"]


def test_a_driver_that_refuses_the_green_context_is_a_share_error(hopper, monkeypatch):
    def refuse(**kwargs):
        raise RuntimeError("CUDA driver error: operation not supported")

    monkeypatch.setattr(green_contexts.GreenContext, "create", staticmethod(refuse))
    with pytest.raises(SmShareError, match="the driver gave no green context of 120 SMs .*not supported"):
        share_sms(torch.device("cuda"), 8)


def test_a_torch_without_green_contexts_or_a_device_without_cuda_is_a_share_error(hopper, monkeypatch):
    with pytest.raises(SmShareError, match="needs a CUDA device, not cpu"):
        share_sms(torch.device("cpu"), 8)
    monkeypatch.setattr(green_contexts, "SUPPORTED", False)
    with pytest.raises(SmShareError, match="built without CUDA green contexts"):
        share_sms(torch.device("cuda"), 8)
    assert hopper.made == []


def test_a_count_too_large_for_the_gpu_is_refused_before_any_green_context(hopper):
    with pytest.raises(ValueError, match=r"decode_sms must be 1 to 124 on this GPU \(132 SMs"):
        share_sms(torch.device("cuda"), 130)
    assert hopper.made == []


@pytest.mark.parametrize(
    ("options", "message"),
    [({"decode_sms": -1}, "decode_sms must be >= 0"),
     ({"decode_sms": 8, "cuda_graph": True}, "decode_sms cannot be combined with cuda_graph")],
)  # fmt: skip
def test_the_config_refuses_what_cannot_work(options, message):
    with pytest.raises(ValueError, match=message):
        EncoderConfig(model="m", **options)


def test_asking_for_a_share_on_the_cpu_warns_and_runs_on_it_whole(tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="encoder.model"):
        cpu = load_encoder(EncoderConfig(model=str(tiny_model), device="cpu", decode_sms=8))
    assert cpu.sm_share is None
    assert "decode_sms 8 ignored (needs a CUDA device, not cpu): the model runs on every SM" in caplog.text


@pytest.fixture
def shared_on_cpu(monkeypatch):
    """`load_encoder` on the CPU as on a GPU with green contexts: `share_sms` gives a share whose stream is a logging
    stand-in (`FakeCuda`); the model's step records the stream it runs on, and raises `fails` where it is set."""
    from encoder import model

    cuda = FakeCuda(monkeypatch)
    share = SmShare(cuda.Stream("the model's SMs"), 120, 132, None)
    monkeypatch.setattr(model, "share_sms", lambda device, decode_sms: share)
    state = SimpleNamespace(share=share, ran=[], fails=None)
    embed_prepared = ImageEncoder.embed_prepared

    def recording(self, batch):
        state.ran.append((cuda.current().name, tuple(batch.shape)))
        if state.fails is not None:
            raise state.fails
        return embed_prepared(self, batch)

    monkeypatch.setattr(ImageEncoder, "embed_prepared", recording)
    return state


def test_a_share_is_kept_once_a_batch_of_the_models_step_ran_on_its_stream(tiny_model, shared_on_cpu):
    encoder = load_encoder(EncoderConfig(model=str(tiny_model), device="cpu", batch_size=4, decode_sms=8))
    assert encoder.sm_share is shared_on_cpu.share
    size = encoder.preprocess.height
    assert shared_on_cpu.ran == [("the model's SMs", (4, size, size, 3))]


def test_a_step_that_will_not_run_on_its_share_runs_on_every_sm_with_a_warning(tiny_model, shared_on_cpu, caplog):
    """Rather than fail every batch of a run: a kernel that cannot launch on the green context's stream."""
    shared_on_cpu.fails = RuntimeError("Triton Error [CUDA]: invalid resource handle")
    with caplog.at_level(logging.WARNING, logger="encoder.model"):
        encoder = load_encoder(EncoderConfig(model=str(tiny_model), device="cpu", batch_size=4, decode_sms=8))
    assert encoder.sm_share is None and len(shared_on_cpu.ran) == 1
    assert ("decode_sms 8 ignored: the model's step did not run on 120 of 132 SMs (RuntimeError: Triton Error "
            "[CUDA]: invalid resource handle); it runs on every SM") in caplog.text  # fmt: skip


def test_a_device_that_failed_on_the_share_stops_the_load(tiny_model, shared_on_cpu):
    shared_on_cpu.fails = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(torch.AcceleratorError, match="illegal memory access"):
        load_encoder(EncoderConfig(model=str(tiny_model), device="cpu", batch_size=4, decode_sms=8))


@pytest.mark.gpu
def test_the_model_on_its_share_of_the_sms_gives_the_vectors_it_gives_on_all_of_them(tiny_model):
    whole = load_encoder(EncoderConfig(model=str(tiny_model), device="cuda", batch_size=16))
    shared = load_encoder(EncoderConfig(model=str(tiny_model), device="cuda", batch_size=16, decode_sms=16))
    assert shared.sm_share is not None, "no green context on this GPU (see the warning above)"
    assert shared.sm_share.decode_sms >= 16 and shared.sm_share.model_sms > 0
    size = (shared.preprocess.height, shared.preprocess.width, 3)
    pixels = torch.randint(0, 256, (37, *size), dtype=torch.uint8, device="cuda")
    expected = whole.embed_prepared(pixels)
    with torch.cuda.stream(shared.sm_share.stream):
        got = shared.embed_prepared(pixels)
    cosine = (got * expected).sum(axis=1)
    assert cosine.min() > 0.999, f"on a share of the SMs vs all of them: cosine as low as {cosine.min()}"
