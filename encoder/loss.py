"""The SigLIP sigmoid loss, in one process and across processes without the global n×n matrix.

    logits = exp(t') · x · yᵀ + b      x, y: L2-normalised image and text features
    label  = +1 on matching pairs, −1 elsewhere
    loss   = −Σ log σ(label · logit) / n     (n = global batch size)

Fresh heads start at t' = log 10, b = −10 (the paper's choice: the many negatives
would otherwise dominate the first steps); a fine-tuned checkpoint keeps its own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["INIT_LOGIT_BIAS", "INIT_LOGIT_SCALE", "distributed_sigmoid_loss", "sigmoid_loss"]

INIT_LOGIT_SCALE = math.log(10.0)
INIT_LOGIT_BIAS = -10.0


def _block_loss(images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                positives_on_diagonal: bool) -> torch.Tensor:  # fmt: skip
    """−Σ log σ(label · logit) over one (images × texts) block."""
    logits = images @ texts.t() * logit_scale.exp() + logit_bias
    labels = -torch.ones_like(logits)
    if positives_on_diagonal:
        labels = labels + 2 * torch.eye(len(images), device=logits.device, dtype=logits.dtype)
    return -F.logsigmoid(labels * logits).sum()


def sigmoid_loss(images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Loss of one batch held by one process.

    Args:
        images, texts: (n, d) L2-normalised features; row i of each is a matching pair.
        logit_scale: t' (the scale is exp(t')); logit_bias: b. Scalars or shape (1,).
    """
    if images.shape != texts.shape:
        raise ValueError(f"image and text features must have the same shape, got {images.shape} and {texts.shape}")
    return _block_loss(images, texts, logit_scale, logit_bias, positives_on_diagonal=True) / len(images)


def distributed_sigmoid_loss(images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor,
                             logit_bias: torch.Tensor, group=None) -> torch.Tensor:  # fmt: skip
    """This rank's share of the loss of the global batch spread over all ranks.

    Text features (n_global × d, small) are exchanged with one autograd-aware all_gather;
    each rank then scores its own images against one rank's chunk at a time, so no rank
    holds more than an (n_local × n_local) logit block, never the global n × n matrix.
    (One collective, not one per chunk: separate per-chunk collectives would run their
    backward passes in an order autograd does not guarantee to match across ranks.)

    Returns:
        Σ over this rank's images of the per-pair losses, divided by the global batch size.
        Summed over ranks this equals `sigmoid_loss` of the global batch, and so do the
        gradients when every rank calls backward (DDP averages: multiply by the world size).
    """
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    if images.shape != texts.shape:
        raise ValueError(f"image and text features must have the same shape, got {images.shape} and {texts.shape}")
    rank = dist.get_rank(group)
    chunks = all_gather(texts, group=group or dist.group.WORLD)
    total = images.new_zeros(())
    for source, chunk in enumerate(chunks):
        total = total + _block_loss(images, chunk, logit_scale, logit_bias, positives_on_diagonal=source == rank)
    return total / (len(images) * len(chunks))
