"""Fine-tuning SigLIP on catalog image–title pairs with the sigmoid loss, and exporting the image encoder.

Names load lazily (PEP 562), as in `encoder`: the command line checks a `TrainConfig` (`training.config`) before
torch is imported, so a wrong flag is reported at once.
"""

from __future__ import annotations

from encoder.lazy import lazy_names

_EXPORTS = {
    "ResumeError": "training.checkpoint",
    "TrainConfig": "training.config",
    "export_model": "training.export",
    "TrainingError": "training.loop",
    "TrainingStopped": "training.loop",
    "TrainResult": "training.loop",
    "train": "training.loop",
    "PairError": "training.pairs",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, globals())
