"""SigLIP's image tower in plain torch, loaded straight from a checkpoint's config.json and safetensors.

transformers' `SiglipVisionModel` computes the same vectors, but importing its modelling code costs every process
~2.3 s on this project's 2-core CPU (it brings in torch's compiler stack, distributed tensors and sympy): a third of
a 200-image `lookalike embed`, paid again by each local worker process and each Dataflow worker. This tower has the
same modules under the same names, so a checkpoint's tensors load into it as they are, its state dict (and so its
`model_version`) is the one transformers' tower has, and `encoder.patch_embedding` / `encoder.gelu_epilogue` swap
its parts as they do transformers'. Inference only: fine-tuning keeps transformers' two-tower model.

The arithmetic is transformers' SDPA path op for op (pre-norm layers, tanh GELU, attention pooling over a probe):
on the CPU the vectors are the same to the last bit in fp32 and bf16, and a `gpu` test compares them on CUDA
(tests/encoder/test_siglip_tower.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from encoder.configs import ACTIVATIONS, TowerConfig, tower_config

__all__ = ["SiglipImageTower", "TowerConfig", "TowerOutput", "load_tower", "read_tower_config"]

_PREFIX = "vision_model."  # the image tower's names in a checkpoint file, alone or beside the text tower


def not_a_checkpoint(path: Path) -> FileNotFoundError:
    """The error for a folder without config.json, naming the checkpoints just inside it: a training run's output
    holds its image encoder in `encoder/` and the two towers in `model/`."""
    inside = sorted(p.name for p in path.iterdir() if (p / "config.json").is_file()) if path.is_dir() else []
    hint = f" (checkpoints inside it: {', '.join(str(path / name) for name in inside)})" if inside else ""
    return FileNotFoundError(f"{path} has no config.json; not a Hugging Face checkpoint{hint}")


def read_tower_config(path: Path) -> TowerConfig:
    """The image tower's config from a checkpoint directory's config.json.

    Raises:
        FileNotFoundError: no config.json.
        ValueError: not a SigLIP checkpoint, or a tower this module cannot compute.
    """
    config_file = path / "config.json"
    if not config_file.is_file():
        raise not_a_checkpoint(path)
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not JSON ({err})") from err
    return tower_config(config, str(path), str(config_file))


class TowerOutput(NamedTuple):
    """What the tower returns: named as transformers' output is, so `ImageEncoder` runs either tower."""

    pooler_output: torch.Tensor  # (n, hidden) the attention-pooling head's output


class Embeddings(nn.Module):
    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                         padding="valid")  # fmt: skip
        # its weight given, not drawn: a random init on the meta device imports torch's compiler stack (~1.5 s)
        self.position_embedding = nn.Embedding(
            cfg.grid**2, cfg.hidden_size, _weight=torch.empty(cfg.grid**2, cfg.hidden_size)
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        return patches.flatten(2).transpose(1, 2) + self.position_embedding.weight  # every position, in order


class Attention(nn.Module):
    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.heads, self.scale = cfg.num_attention_heads, (cfg.hidden_size // cfg.num_attention_heads) ** -0.5
        # transformers' order: the state dict lists them so, and the version hash sorts names anyway
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(cfg.hidden_size, cfg.hidden_size)
                                                                for _ in range(4))  # fmt: skip

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = (*hidden.shape[:-1], self.heads, -1)
        q, k, v = (proj(hidden).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(*hidden.shape[:-1], -1))


class MLP(nn.Module):
    """`fc2(gelu(fc1(x)))`; carries its `config`, as transformers' does, for `encoder.gelu_epilogue` to read."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.activation_fn = nn.GELU(approximate=ACTIVATIONS[cfg.hidden_act])
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden))
        return hidden + self.mlp(self.layer_norm2(hidden))


class Encoder(nn.Module):
    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


class PoolingHead(nn.Module):
    """Attention from one learned probe over every patch, then an MLP on the result (SigLIP's MAP head)."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.attention = nn.MultiheadAttention(cfg.hidden_size, cfg.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        pooled = self.attention(self.probe.repeat(hidden.shape[0], 1, 1), hidden, hidden)[0]  # as transformers calls it
        return (pooled + self.mlp(self.layernorm(pooled)))[:, 0]


class SiglipImageTower(nn.Module):
    """Pixels (n, channels, size, size), normalised → `TowerOutput` with the pooled (n, hidden) features."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = PoolingHead(cfg)

    def forward(self, pixel_values: torch.Tensor) -> TowerOutput:
        hidden = self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
        return TowerOutput(self.head(hidden))


def _weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files, as transformers picks them: the shards its index names, else
    model.safetensors, else every .safetensors file in the directory."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index} is not a safetensors index ({type(err).__name__}: {err})") from err
        outside = [name for name in names if not isinstance(name, str) or name in ("", ".", "..") or "/" in name
                   or "\\" in name]  # fmt: skip
        if outside:  # a shard is a file of this directory: never one elsewhere on the machine
            raise ValueError(f"{index} names files outside the checkpoint: {outside[:3]}")
        return [path / name for name in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    return sorted(path.glob("*.safetensors"))


def _tower_name(name: str) -> str:
    """A file's tensor name as the tower's would be: without the prefix, which a tower saved alone may have or not.
    The other tensors of a two-tower file (`text_model.*`, the logit scale and bias) match none of the tower's."""
    return name.removeprefix(_PREFIX)


def load_tower(path: Path, config: TowerConfig | None = None) -> SiglipImageTower:
    """The image tower of the checkpoint directory `path`, on the CPU, each weight in the dtype its file stores it
    in (as transformers loads it, so the version hashed from it is transformers' too). `config`: the directory's
    `read_tower_config`, where the caller has read it already.

    Raises:
        FileNotFoundError: no config.json or no safetensors file.
        ValueError: not SigLIP, a tower this module cannot compute, or weights missing or of another shape.
    """
    from safetensors import SafetensorError, safe_open

    cfg = config or read_tower_config(path)
    files = _weight_files(path)
    if not files:
        raise FileNotFoundError(f"{path} has no .safetensors weights")
    with torch.device("meta"):
        tower = SiglipImageTower(cfg)
    wanted = tower.state_dict()
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as weights:
                for name in weights.keys():  # noqa: SIM118 - a safe_open handle is not a mapping
                    ours = _tower_name(name)
                    if ours in wanted:
                        state[ours] = weights.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read {file} as safetensors ({err})") from err
    missing = sorted(set(wanted) - set(state))
    if missing:  # would otherwise be left on the meta device, or random
        raise ValueError(f"{path} lacks image-tower weights: {missing[:5]}{' …' if len(missing) > 5 else ''}")
    wrong = [f"{name} {tuple(state[name].shape)} (config: {tuple(wanted[name].shape)})"
             for name in wanted if state[name].shape != wanted[name].shape]  # fmt: skip
    if wrong:
        raise ValueError(f"{path}'s weights do not fit its config.json: {', '.join(wrong[:3])}")
    tower.load_state_dict(state, assign=True)
    return tower.eval().requires_grad_(False)
