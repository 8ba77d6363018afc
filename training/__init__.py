"""Fine-tuning SigLIP on catalog image–title pairs with the sigmoid loss, and exporting the image encoder."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "training.config",
    "TrainResult": "training.loop",
    "TrainingError": "training.loop",
    "train": "training.loop",
    "PairError": "training.pairs",
    "ResumeError": "training.checkpoint",
    "export_model": "training.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'training' has no attribute {name!r}")
