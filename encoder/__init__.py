"""The model: loading SigLIP checkpoints, image preprocessing, batch embedding; plus the shared object store.

Names load lazily (PEP 562), so `from encoder import storage` — what the index
client uses — does not import torch or transformers.
"""

from __future__ import annotations

import importlib

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


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'encoder' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
