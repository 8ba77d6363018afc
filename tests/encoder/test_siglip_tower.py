"""SigLIP's image tower in plain torch (`encoder/siglip_tower.py`): transformers' vectors, names and versions from
the same checkpoints, however they are saved; clear refusals; and no transformers import on the way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import encoder.model as model_module
from encoder import EncoderConfig, load_encoder, model_version
from encoder.preprocess import PreprocessConfig
from encoder.siglip_tower import SiglipImageTower, TowerConfig, load_tower, read_tower_config

PREPROCESS = PreprocessConfig(height=64, width=64)


def _transformers_tower(checkpoint: Path) -> torch.nn.Module:
    from transformers import SiglipVisionModel

    return SiglipVisionModel.from_pretrained(checkpoint, attn_implementation="sdpa").eval()


def save_alone(checkpoint: Path, out: Path, dtype: torch.dtype = torch.float32, state: dict | None = None,
               **save) -> Path:  # fmt: skip
    """The checkpoint's image tower saved alone by transformers, as `training.export` saves one; with `state`'s
    weights where given."""
    tower = _transformers_tower(checkpoint)
    if state is not None:
        tower.load_state_dict(state)
    tower.to(dtype).save_pretrained(out, **save)
    if not (out / "preprocessor_config.json").exists():
        shutil.copy(checkpoint / "preprocessor_config.json", out)
    return out


def _pixels(n: int = 6, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_tower_is_transformers_tower_bit_for_bit(tiny_model, dtype):
    """Same parameter names in the same order, and the same vectors to the last bit on one device and dtype."""
    ours, theirs = load_tower(tiny_model).to(dtype), _transformers_tower(tiny_model).to(dtype)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    pixels = _pixels().to(dtype)
    with torch.inference_mode():
        a, b = ours(pixel_values=pixels).pooler_output, theirs(pixel_values=pixels).pooler_output
    assert a.shape == (6, 128) and a.dtype == dtype
    assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize(
    ("image_size", "patch_size", "hidden_act", "exact"),
    [
        (44, 14, "gelu_pytorch_tanh", True),  # so400m/14-384's layout: 27 patches a side and pixels left over
        (32, 8, "gelu", True),  # exact GELU
        (32, 8, "gelu_new", False),  # transformers computes this tanh GELU in Python: the same within rounding
    ],
)
def test_other_shapes_and_activations_are_transformers_too(tmp_path, image_size, patch_size, hidden_act, exact):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=patch_size, hidden_act=hidden_act)  # fmt: skip
    SiglipVisionModel(config).save_pretrained(tmp_path)
    ours, theirs = load_tower(tmp_path), _transformers_tower(tmp_path)
    with torch.inference_mode():
        a, b = ours(_pixels(size=image_size)).pooler_output, theirs(pixel_values=_pixels(size=image_size)).pooler_output
    assert torch.equal(a, b) if exact else torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_a_trained_tower_is_transformers_tower_too(tiny_model, tmp_path):
    """Random weights far from their initial values (every bias and norm too), so none can be left out unseen."""
    theirs = _transformers_tower(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    theirs.save_pretrained(tmp_path / "trained")
    ours = load_tower(tmp_path / "trained")
    with torch.inference_mode():
        assert torch.equal(ours(_pixels()).pooler_output, theirs(pixel_values=_pixels()).pooler_output)


def test_the_version_is_transformers_whatever_the_checkpoints_layout(tiny_model, tmp_path):
    """Two towers in one file, the tower alone (with or without its names' prefix), in shards, in bfloat16: the
    weights load as stored, so the hashed version is the one transformers' loaded tower gives."""
    expected = model_version(_transformers_tower(tiny_model).state_dict(), PREPROCESS)
    alone = save_alone(tiny_model, tmp_path / "alone")
    bare = shutil.copytree(alone, tmp_path / "bare")
    weights = load_file(bare / "model.safetensors")
    assert all(name.startswith("vision_model.") for name in weights)
    save_file({name.removeprefix("vision_model."): t for name, t in weights.items()}, bare / "model.safetensors")
    sharded = save_alone(tiny_model, tmp_path / "sharded", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    for path in (tiny_model, alone, bare, sharded):
        assert model_version(load_tower(path).state_dict(), PREPROCESS) == expected, path

    half = save_alone(tiny_model, tmp_path / "bf16", dtype=torch.bfloat16)
    tower = load_tower(half)
    assert {p.dtype for p in tower.parameters()} == {torch.bfloat16}
    assert model_version(tower.state_dict(), PREPROCESS) == model_version(
        _transformers_tower(half).state_dict(), PREPROCESS
    )


def test_load_encoder_gives_transformers_vectors_and_version(tiny_model, tiny_encoder, monkeypatch):
    """`OWN_TOWER` off loads transformers' tower (to measure the two): the same version and vectors."""
    assert isinstance(tiny_encoder.vision_model, SiglipImageTower)
    monkeypatch.setattr(model_module, "OWN_TOWER", False)
    theirs = load_encoder(EncoderConfig(model=str(tiny_model), device="cpu"))
    assert not isinstance(theirs.vision_model, SiglipImageTower)
    assert theirs.model_version == tiny_encoder.model_version
    pixels = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    assert np.array_equal(theirs.embed_prepared(pixels), tiny_encoder.embed_prepared(pixels))


def test_config_defaults_are_transformers(tiny_model):
    from transformers import SiglipVisionConfig

    theirs = SiglipVisionConfig()
    for name in TowerConfig.__dataclass_fields__:
        assert getattr(TowerConfig(), name) == getattr(theirs, name), name
    assert read_tower_config(tiny_model) == TowerConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                                        num_attention_heads=4, image_size=64)  # fmt: skip


def test_the_vectors_dimension_is_read_from_the_config_alone(tiny_model, tiny_encoder, tmp_path, monkeypatch):
    """`embedding_dim` (a night's check of `index.reduce` before its embed) agrees with the loaded encoder for a
    two-tower checkpoint, its tower saved alone and a Hub id in the cache; None where the config cannot say."""
    import huggingface_hub.constants

    from encoder.configs import embedding_dim

    assert embedding_dim(str(tiny_model)) == tiny_encoder.dim == 128
    assert embedding_dim(str(save_alone(tiny_model, tmp_path / "alone"))) == 128
    snapshot = tmp_path / "hub" / "models--org--siglip" / "snapshots" / "abc123"
    shutil.copytree(tiny_model, snapshot)
    (tmp_path / "hub" / "models--org--siglip" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--siglip" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert embedding_dim("org/siglip") == 128
    assert embedding_dim("org/not-cached") is None and embedding_dim("not a hub id!") is None
    (tmp_path / "odd").mkdir()
    assert embedding_dim(str(tmp_path / "odd")) is None  # no config.json
    for text in ("{not json", "[1]", '{"model_type": "clip", "vision_config": {"hidden_size": 9}}'):
        (tmp_path / "odd" / "config.json").write_text(text)
        assert embedding_dim(str(tmp_path / "odd")) is None, text


def _edit_config(tiny_model: Path, out: Path, **vision) -> Path:
    shutil.copytree(tiny_model, out)
    config = json.loads((out / "config.json").read_text())
    config["vision_config"].update(vision)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    ("vision", "message"),
    [
        ({"vision_use_head": False}, "no pooling head"),
        ({"hidden_act": "quick_gelu"}, "hidden_act 'quick_gelu'"),
        ({"num_attention_heads": 3}, "not a multiple of its 3 attention heads"),
        ({"patch_size": 0}, "patch_size must be a positive integer"),
        ({"image_size": [64, 64]}, "image_size must be a positive integer"),
        ({"hidden_size": 64, "num_attention_heads": 4}, "do not fit its config.json"),
        ({"layer_norm_eps": "1e-6"}, "layer_norm_eps must be a number"),
        ({"hidden_act": ["gelu"]}, r"hidden_act \['gelu'\]"),
    ],
)
def test_a_tower_it_cannot_compute_is_refused(tiny_model, tmp_path, vision, message):
    with pytest.raises(ValueError, match=message):
        load_encoder(EncoderConfig(model=str(_edit_config(tiny_model, tmp_path / "edited", **vision)), device="cpu"))


def test_missing_or_unreadable_weights_are_refused(tiny_model, tmp_path):
    missing = shutil.copytree(tiny_model, tmp_path / "missing")
    weights = load_file(missing / "model.safetensors")
    del weights["vision_model.head.probe"]
    save_file(weights, missing / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks image-tower weights: \['head.probe'\]"):
        load_tower(missing)
    text_only = shutil.copytree(tiny_model, tmp_path / "text-only")
    save_file({k: v for k, v in weights.items() if k.startswith("text_model.")}, text_only / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks image-tower weights: \[.*\] …"):
        load_tower(text_only)
    corrupt = shutil.copytree(tiny_model, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ValueError, match="cannot read .* as safetensors"):
        load_tower(corrupt)
    bad_config = shutil.copytree(tiny_model, tmp_path / "bad-config")
    (bad_config / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        load_tower(bad_config)
    (bad_config / "config.json").write_text(json.dumps({"model_type": "siglip", "vision_config": [128]}))
    with pytest.raises(ValueError, match="vision_config is not an object"):
        load_tower(bad_config)
    sharded = save_alone(tiny_model, tmp_path / "sharded", max_shard_size="100KB")
    index = sharded / "model.safetensors.index.json"
    for broken in ({"weight_map": ["model-00001.safetensors"]}, {"metadata": {}}):
        index.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match="is not a safetensors index"):
            load_tower(sharded)
    index.write_text(json.dumps({"weight_map": {"head.probe": "../model/model.safetensors"}}))
    with pytest.raises(ValueError, match=r"names files outside the checkpoint: \['../model/model.safetensors'\]"):
        load_tower(sharded)
    index.write_text(json.dumps({"weight_map": {"head.probe": "model-09999-of-09999.safetensors"}}))
    with pytest.raises(ValueError, match="cannot read .*model-09999-of-09999.safetensors"):
        load_tower(sharded)


def test_a_preprocessing_the_tower_cannot_take_is_refused(tiny_model, tmp_path):
    """Images cut into another grid of patches than the position embeddings': refused at load, not at the first
    batch. A size with the same whole patches (the convolution drops the rest) is the tower's."""
    for size, fits in ((96, False), (70, True)):
        other = shutil.copytree(tiny_model, tmp_path / f"size-{size}")
        processor = json.loads((other / "preprocessor_config.json").read_text())
        processor["size"] = {"height": size, "width": size}
        (other / "preprocessor_config.json").write_text(json.dumps(processor))
        if fits:
            assert load_encoder(EncoderConfig(model=str(other), device="cpu")).preprocess.height == 70
            continue
        with pytest.raises(ValueError, match="makes 96x96 images but its tower takes 64x64"):
            load_encoder(EncoderConfig(model=str(other), device="cpu"))


def test_loading_and_embedding_imports_neither_transformers_nor_torchs_compiler(tiny_model):
    """The point of the tower: a fresh process loads a checkpoint and embeds without transformers' modelling
    code, torch's compiler stack or sympy (~2.3 s of imports on this project's CPU)."""
    script = (
        "import sys, numpy as np\n"
        "from encoder import EncoderConfig, load_encoder\n"
        f"encoder = load_encoder(EncoderConfig(model={str(tiny_model)!r}, device='cpu'))\n"
        "encoder.embed_prepared(np.zeros((2, 64, 64, 3), np.uint8))\n"
        "print(sorted(m for m in ('transformers', 'torch._dynamo', 'sympy') if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("compile_", [False, True])
def test_on_cuda_the_tower_gives_transformers_vectors(tiny_model, monkeypatch, compile_):
    """bf16 on CUDA, eager and compiled, each tower with the encoder's swaps (the patch product, the GELU epilogue):
    the same kernels in the same order, so the same vectors within bf16's rounding at most."""
    pixels = torch.randint(0, 256, (32, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    vectors = []
    for own in (True, False):
        monkeypatch.setattr(model_module, "OWN_TOWER", own)
        torch.compiler.reset()
        cfg = EncoderConfig(model=str(tiny_model), device="cuda", batch_size=32, compile=compile_)
        vectors.append(load_encoder(cfg).embed_prepared(pixels.cuda()))
    torch.compiler.reset()
    cosine = (vectors[0] * vectors[1]).sum(axis=1)
    assert cosine.min() > 0.99999, cosine.min()
