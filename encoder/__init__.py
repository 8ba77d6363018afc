"""The model: loading SigLIP checkpoints, image preprocessing, batch embedding; plus the shared object store.

Names load lazily (PEP 562), so `from encoder import storage` — what the index
client uses — does not import torch or transformers.
"""

from __future__ import annotations

from encoder.lazy import lazy_names

_EXPORTS = {
    "EncoderConfig": "encoder.configs",
    "ImageEncoder": "encoder.model",
    "load_encoder": "encoder.model",
    "model_version": "encoder.model",
    "resolve_checkpoint": "encoder.model",
    "DecodeLimits": "encoder.configs",
    "ImageDecodeError": "encoder.preprocess",
    "PreprocessConfig": "encoder.preprocess",
    "decode_image": "encoder.preprocess",
    "prepare_image": "encoder.preprocess",
    "to_pixel_values": "encoder.preprocess",
    "TinyModelConfig": "encoder.tiny",
    "init_tiny_model": "encoder.tiny",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, globals())
