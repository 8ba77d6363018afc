"""The trainable pair of towers and how they are optimised: features, freezing, AdamW, LR schedule, precision."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from encoder.preprocess import PreprocessConfig, to_pixel_values
from training.config import TrainConfig

__all__ = ["TwoTower", "autocast_for", "freeze", "lr_factor", "make_optimizer"]


class TwoTower(torch.nn.Module):
    """uint8 pixels + token ids → L2-normalised image and text features (what DDP wraps)."""

    def __init__(self, model, preprocess: PreprocessConfig) -> None:
        super().__init__()
        self.model, self.preprocess = model, preprocess

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        values = to_pixel_values(pixels, self.preprocess)
        return F.normalize(self.model.vision_model(pixel_values=values).pooler_output.float(), dim=-1)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor | None):
        image = self.image_features(pixels)
        if input_ids is None:
            return image, None
        text = F.normalize(self.model.text_model(input_ids=input_ids).pooler_output.float(), dim=-1)
        return image, text


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to the peak LR, then cosine down to 0 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def freeze(model, cfg: TrainConfig) -> None:
    layers = model.vision_model.encoder.layers
    if cfg.freeze_vision_layers > len(layers):
        raise ValueError(f"freeze_vision_layers={cfg.freeze_vision_layers} but the vision tower has {len(layers)}")
    if cfg.freeze_text:
        model.text_model.requires_grad_(False)
    if cfg.freeze_vision_layers:
        model.vision_model.embeddings.requires_grad_(False)
        for layer in layers[: cfg.freeze_vision_layers]:
            layer.requires_grad_(False)


def make_optimizer(model, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},  # biases, norms, t', b
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def autocast_for(cfg: TrainConfig, device: torch.device):
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
