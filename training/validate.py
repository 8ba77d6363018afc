"""Validation while training: image→title recall@1 on held-out pairs, item-to-item nDCG@5 on interactions."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from encoder.loss import sigmoid_loss
from evaluation.evaluate import VectorRanker, evaluate
from evaluation.logs import Judgments

__all__ = ["embed_pairs", "item_ndcg", "pair_metrics"]

log = logging.getLogger(__name__)


@torch.no_grad()
def embed_pairs(features: Callable, loader, device: torch.device, autocast=contextlib.nullcontext,
                texts: bool = True) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """L2-normalised image (and title) features of every batch of `loader`, in order.

    Args:
        features: (pixel uint8 batch on device, token ids on device) → (image, text) features;
            text may be None when `texts` is False.

    Returns:
        (n, d) float32 image features and (n, d) float32 text features or None.
    """
    images, titles = [], []
    for pixels, input_ids, _ in loader:
        with autocast():
            image, text = features(pixels.to(device), input_ids.to(device) if texts else None)
        images.append(image.float().cpu())
        if texts:
            titles.append(text.float().cpu())
    image_out = torch.cat(images).numpy()
    return image_out, torch.cat(titles).numpy() if texts else None


def pair_metrics(images: np.ndarray, texts: np.ndarray, titles: Sequence[str], logit_scale: float,
                 logit_bias: float) -> dict[str, float]:  # fmt: skip
    """Image→title recall@1 over the held-out pairs, and the sigmoid loss on all of them at once.

    A retrieved title counts as right when its text equals the item's own title, so two
    items listed under the same words do not count against the model.
    """
    best = (images @ texts.T).argmax(axis=1)
    truth = np.asarray(titles, dtype=object)
    recall = float(np.mean(truth[best] == truth))
    loss = sigmoid_loss(torch.from_numpy(images), torch.from_numpy(texts), torch.tensor(logit_scale),
                        torch.tensor(logit_bias))  # fmt: skip
    return {"val_recall_at_1": recall, "val_loss": float(loss)}


def item_ndcg(item_ids: Sequence[str], vectors: np.ndarray, judgments: Judgments, k: int = 5) -> dict[str, float]:
    """Item-to-item metrics@k of exact neighbours over `vectors`, on the judged queries among `item_ids`."""
    ranker = VectorRanker("validation", item_ids, vectors)
    try:
        result = evaluate(judgments, [ranker], k=k)
    except ValueError as err:  # no judged query among these items: nothing to report, say so once
        log.warning("item nDCG@%d skipped: %s", k, err)
        return {}
    return {
        f"val_ndcg_at_{k}": result.mean("validation", "ndcg"),
        f"val_recall_at_{k}": result.mean("validation", "recall"),
        "val_queries": float(len(result.queries)),
    }
