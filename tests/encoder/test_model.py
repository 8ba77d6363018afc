"""Loading checkpoints and embedding: determinism, batch-size invariance, model_version, refusals."""

from __future__ import annotations

import io
import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import encoder.model as model_module
from encoder import EncoderConfig, ImageEncoder, load_encoder, model_version
from encoder.gelu_epilogue import EpilogueMLP, gelu_in_epilogue
from encoder.patch_embedding import PatchEmbedding, patch_embedding_as_matmul
from encoder.preprocess import PreprocessConfig
from tests.encoder.test_siglip_tower import save_alone


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(80 + i, 120, 3), dtype=np.uint8)) for i in range(n)]


def test_embeddings_are_unit_float32(tiny_encoder):
    vectors = tiny_encoder.embed(_images(5))
    assert vectors.shape == (5, tiny_encoder.dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_same_image_same_vector(tiny_encoder):
    image = _images(1)[0]
    first, second = tiny_encoder.embed([image]), tiny_encoder.embed([image.copy()])
    assert np.array_equal(first, second)


def test_pil_bytes_and_path_inputs_agree(tiny_encoder, tmp_path):
    image = _images(1)[0]
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    (tmp_path / "a.png").write_bytes(buffer.getvalue())
    from_pil, from_bytes, from_path = (tiny_encoder.embed([x]) for x in (image, buffer.getvalue(), tmp_path / "a.png"))
    assert np.array_equal(from_pil, from_bytes) and np.array_equal(from_bytes, from_path)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 64])
def test_batch_size_does_not_change_results(tiny_model, batch_size):
    images = _images(11)
    reference = load_encoder(EncoderConfig(model=str(tiny_model), device="cpu", batch_size=11)).embed(images)
    other = load_encoder(EncoderConfig(model=str(tiny_model), device="cpu", batch_size=batch_size)).embed(images)
    diff = np.abs(other - reference).max()
    assert diff < 1e-5, f"batch_size {batch_size} changed vectors by {diff}"


def test_static_batch_padding_does_not_change_results(tiny_encoder):
    images = _images(5)
    padded = ImageEncoder(
        tiny_encoder.vision_model, tiny_encoder.preprocess, tiny_encoder.model_version, batch_size=4, static_batch=True
    )
    assert np.abs(padded.embed(images) - tiny_encoder.embed(images)).max() < 1e-5


def test_empty_input_gives_an_empty_matrix(tiny_encoder):
    assert tiny_encoder.embed([]).shape == (0, tiny_encoder.dim)


def test_model_version_is_stable_and_content_addressed(tiny_model, tiny_encoder, tmp_path):
    again = load_encoder(EncoderConfig(model=str(tiny_model), device="cpu"))
    assert again.model_version == tiny_encoder.model_version

    # The image tower saved alone has the same version as inside the two-tower checkpoint.
    alone = tmp_path / "vision-only"
    save_alone(tiny_model, alone)
    assert load_encoder(EncoderConfig(model=str(alone), device="cpu")).model_version == tiny_encoder.model_version

    state = {k: v.clone() for k, v in tiny_encoder.vision_model.state_dict().items()}
    name = next(iter(state))
    state[name][..., 0] += 1e-3
    assert model_version(state, tiny_encoder.preprocess) != tiny_encoder.model_version
    other_pre = PreprocessConfig(height=64, width=64, resample=2)
    assert model_version(tiny_encoder.vision_model.state_dict(), other_pre) != tiny_encoder.model_version


def test_model_version_is_hashed_once_per_checkpoint_until_its_files_change(tiny_model, tmp_path, monkeypatch):
    import encoder.model as model_module

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_model, checkpoint)
    calls = []
    real = model_module.model_version
    monkeypatch.setattr(model_module, "model_version", lambda *a: calls.append(1) or real(*a))
    first = load_encoder(EncoderConfig(model=str(checkpoint), device="cpu"))
    assert load_encoder(EncoderConfig(model=str(checkpoint), device="cpu")).model_version == first.model_version
    assert len(calls) == 1  # the launcher's load and the worker's, in one process: one hash

    # Weights rewritten in place: a new hash, and a new version.
    state = {k: v.clone() for k, v in first.vision_model.state_dict().items()}
    state[next(iter(state))][..., 0] += 1e-3
    save_alone(tiny_model, checkpoint, state=state)
    rewritten = load_encoder(EncoderConfig(model=str(checkpoint), device="cpu"))
    assert len(calls) == 2 and rewritten.model_version != first.model_version


def test_model_version_is_remembered_on_disk_for_later_processes(tiny_model, tmp_path, monkeypatch):
    """Under the cache directory's `versions/`: a later process on the machine does not hash the weights again,
    unless the checkpoint's files changed; a damaged or unwritable cache costs a hash, never a wrong version."""
    import encoder.model as model_module

    checkpoint, cache = tmp_path / "ckpt", tmp_path / "cache"
    shutil.copytree(tiny_model, checkpoint)
    calls = []
    real = model_module.model_version
    monkeypatch.setattr(model_module, "model_version", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(model_module, "_VERSIONS", {})

    def load(cache_dir=cache):
        model_module._VERSIONS.clear()  # a new process
        return load_encoder(EncoderConfig(model=str(checkpoint), device="cpu", cache_dir=str(cache_dir)))

    monkeypatch.setattr(model_module, "_SETTLED_S", 3600.0)
    first = load()  # its files changed lately: hashed, not remembered (a coarse clock could hide the next change)
    assert len(calls) == 1 and not cache.exists()
    monkeypatch.setattr(model_module, "_SETTLED_S", 0.0)
    assert load().model_version == first.model_version and len(calls) == 2
    [remembered] = (cache / "versions").iterdir()
    assert load().model_version == first.model_version and len(calls) == 2  # not hashed again

    remembered.write_text("{not json")  # damaged: hashed again, and remembered again
    assert load().model_version == first.model_version and len(calls) == 3
    assert load().model_version == first.model_version and len(calls) == 3
    stored = json.loads(remembered.read_text())
    remembered.write_text(json.dumps({**stored, "value": "not a version"}))
    assert load().model_version == first.model_version and len(calls) == 4

    # Weights rewritten in place: their files' change times move, so a new hash and a new version.
    state = {k: v.clone() for k, v in first.vision_model.state_dict().items()}
    state[next(iter(state))][..., 0] += 1e-3
    save_alone(tiny_model, checkpoint, state=state)
    rewritten = load()
    assert len(calls) == 5 and rewritten.model_version != first.model_version
    assert load().model_version == rewritten.model_version and len(calls) == 5
    assert len(list((cache / "versions").iterdir())) == 2

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory would be")
    assert load(blocked).model_version == rewritten.model_version and len(calls) == 6
    assert load(blocked).model_version == rewritten.model_version and len(calls) == 7


def test_pickle_only_checkpoint_is_refused(tiny_model, tmp_path):
    bad = tmp_path / "pickled"
    bad.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(tiny_model / name, bad)
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="pickle"):
        load_encoder(EncoderConfig(model=str(bad), device="cpu"))


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        load_encoder(EncoderConfig(model=str(tmp_path / "nope")))


def test_a_folder_holding_checkpoints_names_them(tiny_model, tmp_path):
    """A training run's output given as the model: its image encoder and its two towers are folders inside it."""
    run = tmp_path / "train-run"
    for name in ("encoder", "model"):
        shutil.copytree(tiny_model, run / name)
    (run / "checkpoints").mkdir()
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"(checkpoints inside it: {run / 'encoder'}, {run / 'model'})")
    ):
        load_encoder(EncoderConfig(model=str(run), device="cpu"))
    with pytest.raises(FileNotFoundError, match=r"has no config\.json; not a Hugging Face checkpoint$"):
        load_encoder(EncoderConfig(model=str(run / "checkpoints"), device="cpu"))


def test_unknown_hub_id_offline_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="Hub"):
        load_encoder(EncoderConfig(model="nobody-has/this-siglip"))


def test_non_siglip_checkpoint_is_refused(tiny_model, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "bert"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="bert"):
        load_encoder(EncoderConfig(model=str(other), device="cpu"))


def test_missing_preprocessor_config_is_refused(tiny_model, tmp_path):
    other = tmp_path / "noproc"
    shutil.copytree(tiny_model, other)
    (other / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config"):
        load_encoder(EncoderConfig(model=str(other), device="cpu"))


def test_cuda_without_a_gpu_fails_loudly(tiny_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        load_encoder(EncoderConfig(model=str(tiny_model), device="cuda"))


@pytest.mark.parametrize(
    "kwargs",
    [{"batch_size": -1}, {"dtype": "int8"}, {"device": "tpu"}, {"model": ""}, {"compile_frozen": True}],
    ids=lambda k: next(iter(k)),
)
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        EncoderConfig(**{"model": "m", **kwargs})


def test_a_frozen_compile_runs_query_key_and_value_as_one_gemm(tiny_model):
    """`compile_frozen`: the tiny tower (4 layers) compiled at load with the weights as constants makes two GEMM
    calls fewer per layer than a plain compile, with the same vectors. On the CPU inductor concatenates such
    weights only when asked (`cpp.enable_concat_linear`); on CUDA it does by default."""
    import torch
    import torch._inductor.config
    from torch._dynamo.utils import counters

    images, calls, vectors = _images(5), [], []
    with torch._inductor.config.patch({"cpp.enable_concat_linear": True}):
        for frozen in (False, True):
            torch.compiler.reset()
            counters.clear()
            encoder = load_encoder(EncoderConfig(model=str(tiny_model), device="cpu", batch_size=4, compile=True,
                                                 compile_frozen=frozen))  # fmt: skip
            vectors.append(encoder.embed(images))  # (compiles the plain one here)
            calls.append(counters["inductor"]["extern_calls"])
    torch.compiler.reset()
    layers = encoder.vision_model.config.num_hidden_layers
    assert calls[1] <= calls[0] - 2 * layers  # and frozen, the patch embedding's product may fold away too
    assert np.allclose(vectors[1], vectors[0], atol=1e-4)


def test_a_compiled_step_gives_the_eager_vectors_with_one_graph_whatever_made_its_batches(tiny_model, tiny_encoder):
    """`compile` compiles the whole step, the pixels' rescale and normalisation with the tower, so they fuse.
    Batches made outside inference mode (the GPU decoder's threads), in it (host batches) and padded short ones
    share one graph: the step's input guards would otherwise compile it again. A failed batch's pieces run
    eagerly at their own size, compiling nothing."""
    import torch
    from torch._dynamo.utils import counters

    from encoder.preprocess import prepare_image

    pixels = np.stack([prepare_image(image, tiny_encoder.preprocess) for image in _images(6)])
    torch.compiler.reset()
    counters.clear()
    encoder = load_encoder(EncoderConfig(model=str(tiny_model), device="cpu", batch_size=4, compile=True))
    assert counters["stats"]["unique_graphs"] == 1 and encoder.compile_s > 0  # compiled at load, timed
    outside = encoder.embed_prepared(torch.from_numpy(pixels[:4]).clone())  # a plain tensor, as the GPU path's
    inside = encoder.embed_prepared(pixels)  # a host batch, then a short one padded to 4
    piece = encoder.launch(pixels[1:4], eager=True).result()  # a failed batch's piece (`embed_checked`)
    assert counters["stats"]["unique_graphs"] == 1  # the piece compiled nothing, at its own size
    torch.compiler.reset()
    eager = tiny_encoder.embed_prepared(pixels)
    assert np.allclose(inside, eager, atol=1e-5) and np.allclose(outside, eager[:4], atol=1e-5)
    assert np.allclose(piece, eager[1:4], atol=1e-5)


@pytest.mark.parametrize("error", ["compiler", "device"])
def test_a_step_that_cannot_compile_runs_eagerly_with_a_warning(tiny_model, tiny_encoder, monkeypatch, caplog, error):
    """As a model that cannot be captured as a CUDA graph: the run goes on without, where before each batch failed
    and was retried in pieces. A device that failed fails the load."""
    import torch

    def broken(*args):
        if error == "device":
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda fn, **options: broken)
    cfg = EncoderConfig(model=str(tiny_model), device="cpu", batch_size=4, compile=True)
    if error == "device":
        with pytest.raises(torch.AcceleratorError):
            load_encoder(cfg)
        return
    encoder = load_encoder(cfg)
    assert "could not compile the model (RuntimeError: InvalidCxxCompiler" in caplog.text
    assert encoder.compile_s is None and not encoder.static_batch
    images = _images(5)
    assert np.allclose(encoder.embed(images), tiny_encoder.embed(images), atol=1e-6)


def test_a_compiled_encoder_once_dropped_frees_its_model_without_the_cyclic_collector(tiny_model, tiny_encoder):
    """A GPU's memory comes back when the encoder goes, not at some later full collection (the benchmark drops
    one model before it loads the next, and a batch size fitted meanwhile would see less free memory)."""
    import gc
    import weakref

    pixels = np.zeros((4, tiny_encoder.preprocess.height, tiny_encoder.preprocess.width, 3), np.uint8)
    gc.disable()
    try:
        encoder = load_encoder(EncoderConfig(model=str(tiny_model), device="cpu", batch_size=4, compile=True))
        encoder.embed_prepared(pixels)
        model = weakref.ref(encoder.vision_model)
        del encoder
        assert model() is None
    finally:
        gc.enable()


@pytest.mark.gcs
def test_loads_from_gcs_into_a_cache(tiny_model, tiny_encoder, gcs_emulator, gcs_bucket, tmp_path):
    from tests.conftest import upload_dir

    uri = upload_dir(gcs_emulator, tiny_model, gcs_bucket, "models/tiny")
    cfg = EncoderConfig(model=uri, device="cpu", cache_dir=str(tmp_path / "cache"))
    remote = load_encoder(cfg)
    assert remote.model_version == tiny_encoder.model_version
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    load_encoder(cfg)  # second load reuses the cached copy
    assert list((tmp_path / "cache").iterdir()) == cached


@pytest.mark.gpu
def test_cuda_bf16_close_to_cpu_fp32(tiny_model, tiny_encoder):
    gpu = load_encoder(EncoderConfig(model=str(tiny_model), device="cuda"))
    images = _images(16)
    cosine = (gpu.embed(images) * tiny_encoder.embed(images)).sum(axis=1)
    assert cosine.min() > 0.99, f"bf16 CUDA vs fp32 CPU cosine as low as {cosine.min()}"


@pytest.mark.gpu
def test_a_compiled_step_on_the_gpu_keeps_one_graph_and_never_synchronises(tiny_model):
    """The whole step compiled on CUDA: a batch made on the device outside inference mode (as the GPU decoder's
    are), a host batch and its padded remainder meet one graph, give the eager model's vectors, and launching
    one never waits for the GPU (the copy that makes the first kind of batch like the others included)."""
    import torch
    from torch._dynamo.utils import counters

    eager = load_encoder(EncoderConfig(model=str(tiny_model), device="cuda", batch_size=8))
    torch.compiler.reset()
    counters.clear()
    gpu = load_encoder(EncoderConfig(model=str(tiny_model), device="cuda", batch_size=8, compile=True))
    size = (gpu.preprocess.height, gpu.preprocess.width, 3)
    on_device = torch.randint(0, 256, (gpu.batch_size, *size), dtype=torch.uint8, device="cuda")
    host = np.random.default_rng(0).integers(0, 256, (gpu.batch_size + 3, *size), dtype=np.uint8)
    for pixels in (on_device, host):
        cosine = (gpu.embed_prepared(pixels) * eager.embed_prepared(pixels)).sum(axis=1)
        assert cosine.min() > 0.999, cosine.min()
    piece = gpu.launch(on_device[:3], eager=True).result()  # a failed batch's piece: eager, unpadded
    assert np.allclose(piece, eager.embed_prepared(on_device[:3]), atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = gpu.launch(on_device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert np.allclose(pending.result(), gpu.embed_prepared(on_device), atol=1e-6)
    torch.compiler.reset()


@pytest.mark.gpu
def test_launching_a_batch_on_the_gpu_does_not_wait_for_the_gpu(tiny_model):
    """Two batches in flight need a launch that never synchronises (a blocking copy would wait for the queue)."""
    import torch

    gpu = load_encoder(EncoderConfig(model=str(tiny_model), device="cuda"))
    size = (gpu.preprocess.height, gpu.preprocess.width, 3)
    pixels = torch.randint(0, 256, (32, *size), dtype=torch.uint8, device="cuda")
    expected = gpu.embed_prepared(pixels)  # the first call may synchronise (allocator, library handles)
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = [gpu.launch(pixels), gpu.launch(pixels)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for p in pending:
        assert np.allclose(p.result(), expected, atol=1e-6)


@pytest.mark.parametrize(("size", "patch", "bias"), [(224, 16, True), (30, 14, True), (384, 14, False)])
def test_a_patch_embedding_as_one_matmul_is_the_convolution(size, patch, bias):
    """`PatchEmbedding` against `Conv2d` on the same weights, whole patches (base/16-224) or pixels past the last
    whole patch left out (so400m/14-384: 27 a side)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 32, patch, patch, bias=bias)
    swapped = PatchEmbedding(3, 32, patch, patch, bias=bias)
    swapped.weight, swapped.bias = conv.weight, conv.bias
    x = torch.randn(2, 3, size, size)
    assert swapped(x).shape == conv(x).shape == (2, 32, size // patch, size // patch)
    assert torch.allclose(swapped(x), conv(x), atol=1e-5)
    # Training takes it too: the same gradients reach the shared weights (and the pixels).
    upstream = torch.randn(2, 32, size // patch, size // patch)
    grads = []
    for module in (conv, swapped):
        pixels = x.clone().requires_grad_()
        (module(pixels) * upstream).sum().backward()
        grads.append([pixels.grad, conv.weight.grad.clone()] + ([conv.bias.grad.clone()] if bias else []))
        conv.zero_grad()
    for by_conv, by_matmul in zip(*grads, strict=True):
        assert torch.allclose(by_matmul, by_conv, atol=1e-4)


def test_the_loaded_tower_embeds_its_patches_with_one_matmul_and_the_same_vectors(tiny_model, tiny_encoder,
                                                                                  monkeypatch):  # fmt: skip
    """`load_encoder` swaps the tower's patch convolution for `PatchEmbedding` on the same parameters: the state
    dict (and so the model version) is unchanged, the vectors are the convolution's, compiled or not."""

    def patches(encoder: ImageEncoder) -> torch.nn.Module:  # transformers 5 keeps no inner `vision_model`
        tower = encoder.vision_model
        return getattr(tower, "vision_model", tower).embeddings.patch_embedding

    assert type(patches(tiny_encoder)) is PatchEmbedding
    monkeypatch.setattr(model_module, "PATCHES_AS_MATMUL", False)
    conv = load_encoder(EncoderConfig(model=str(tiny_model), device="cpu"))
    assert type(patches(conv)) is torch.nn.Conv2d
    assert conv.model_version == tiny_encoder.model_version
    assert list(conv.vision_model.state_dict()) == list(tiny_encoder.vision_model.state_dict())
    images = _images(5)
    assert np.abs(conv.embed(images) - tiny_encoder.embed(images)).max() < 1e-5
    assert not patch_embedding_as_matmul(torch.nn.Linear(2, 2))  # nothing to swap: left as it is
    strided = torch.nn.Module()
    strided.embeddings = torch.nn.Module()
    strided.embeddings.patch_embedding = overlapping = torch.nn.Conv2d(3, 8, 16, 8)  # overlapping patches
    assert not patch_embedding_as_matmul(strided) and strided.embeddings.patch_embedding is overlapping


def _cuda_addmm_gelu(bias, mat1, mat2, *, use_gelu):
    """`torch._addmm_activation` as CUDA computes it (GELU's tanh approximation); on the CPU the op takes erf."""
    assert use_gelu
    return torch.nn.functional.gelu(torch.addmm(bias, mat1, mat2), approximate="tanh")


def test_the_mlps_gelu_moves_into_the_products_epilogue_on_cuda_only(tiny_encoder, monkeypatch):
    """`gelu_in_epilogue` swaps each tanh-GELU MLP (every layer's and the pooling head's) for `EpilogueMLP` on the
    same linears: the state dict and the vectors are unchanged. Not on the CPU (the fused op computes another
    GELU there), nor an MLP of another activation."""
    import copy

    tower = copy.deepcopy(tiny_encoder.vision_model)
    torch.manual_seed(0)
    for name, parameter in tower.named_parameters():
        if ".fc1." in name or ".fc2." in name:  # biases start near 0: make a bias left out show
            parameter.data.normal_(0.0, 0.2 if name.endswith("bias") else 0.05)
    layers = len(getattr(tower, "vision_model", tower).encoder.layers)
    assert gelu_in_epilogue(copy.deepcopy(tower), torch.device("cpu")) == 0
    swapped = copy.deepcopy(tower)
    assert gelu_in_epilogue(swapped, torch.device("cuda")) == layers + 1  # the layers' MLPs and the head's
    assert sum(isinstance(m, EpilogueMLP) for m in swapped.modules()) == layers + 1
    assert list(swapped.state_dict()) == list(tower.state_dict())
    assert gelu_in_epilogue(swapped, torch.device("cuda")) == 0  # nothing left to swap
    monkeypatch.setattr(torch, "_addmm_activation", _cuda_addmm_gelu)  # CUDA's arithmetic, on this CPU
    pixels = torch.rand(3, 3, tiny_encoder.preprocess.height, tiny_encoder.preprocess.width) * 2 - 1
    with torch.inference_mode():
        before, after = tower(pixel_values=pixels).pooler_output, swapped(pixel_values=pixels).pooler_output
    assert torch.allclose(after, before, atol=1e-5)
    exact = copy.deepcopy(tower)
    for module in exact.modules():
        if hasattr(module, "config") and hasattr(module, "fc1"):
            module.config = SimpleNamespace(hidden_act="gelu")  # erf: the epilogue's tanh would change it
    assert gelu_in_epilogue(exact, torch.device("cuda")) == 0


def test_an_epilogue_mlp_compiles_as_one_graph_with_the_fused_op_kept():
    """torch.compile traces the fused op (no graph break) and keeps it: inductor calls it, not a decomposition
    into a product and a GELU kernel (the CPU's op, with erf, stands in for CUDA's here)."""
    from torch._inductor.utils import run_and_get_code

    mlp = EpilogueMLP(torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)).requires_grad_(False)  # no backward
    x = torch.randn(2, 5, 16)
    assert torch._dynamo.explain(mlp)(x).graph_break_count == 0
    torch.compiler.reset()
    out, code = run_and_get_code(torch.compile(mlp), x)
    assert "_addmm_activation" in "".join(code)
    assert torch.allclose(out, mlp(x), atol=1e-5)
    torch.compiler.reset()


def test_the_cpu_encoder_keeps_transformers_mlp(tiny_encoder):
    assert not any(isinstance(m, EpilogueMLP) for m in tiny_encoder.vision_model.modules())


@pytest.mark.gpu
def test_on_cuda_the_gelu_runs_in_the_epilogue_with_the_same_vectors(tiny_model, monkeypatch):
    import torch

    fused = load_encoder(EncoderConfig(model=str(tiny_model), device="cuda"))
    assert any(isinstance(m, EpilogueMLP) for m in fused.vision_model.modules())
    monkeypatch.setattr(model_module, "GELU_IN_EPILOGUE", False)
    separate = load_encoder(EncoderConfig(model=str(tiny_model), device="cuda"))
    assert not any(isinstance(m, EpilogueMLP) for m in separate.vision_model.modules())
    size = (fused.preprocess.height, fused.preprocess.width, 3)
    pixels = torch.randint(0, 256, (32, *size), dtype=torch.uint8, device="cuda")
    cosine = (fused.embed_prepared(pixels) * separate.embed_prepared(pixels)).sum(axis=1)
    assert cosine.min() > 0.9999, cosine.min()
