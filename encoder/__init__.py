"""The model: loading SigLIP checkpoints, image preprocessing, batch embedding."""

from encoder.model import EncoderConfig, ImageEncoder, load_encoder, model_version, resolve_checkpoint
from encoder.preprocess import (
    DecodeLimits,
    ImageDecodeError,
    PreprocessConfig,
    decode_image,
    prepare_image,
    to_pixel_values,
)
from encoder.tiny import TinyModelConfig, init_tiny_model

__all__ = [
    "DecodeLimits",
    "EncoderConfig",
    "ImageDecodeError",
    "ImageEncoder",
    "PreprocessConfig",
    "TinyModelConfig",
    "decode_image",
    "init_tiny_model",
    "load_encoder",
    "model_version",
    "prepare_image",
    "resolve_checkpoint",
    "to_pixel_values",
]
