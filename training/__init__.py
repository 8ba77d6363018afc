"""Fine-tuning SigLIP on catalog image–title pairs with the sigmoid loss, and exporting the image encoder."""

from training.checkpoint import ResumeError
from training.config import TrainConfig
from training.export import export_model
from training.loop import TrainingError, TrainResult, train
from training.pairs import PairError

__all__ = ["PairError", "ResumeError", "TrainConfig", "TrainResult", "TrainingError", "export_model", "train"]
