"""A tiny SigLIP made offline: random weights and a tokenizer trained on catalog titles.

Saved exactly like a Hub checkpoint (`save_pretrained`, safetensors, tokenizer
and preprocessor files), so tests and the demo go through the same loading code
as `google/siglip-base-patch16-224`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["TinyModelConfig", "init_tiny_model"]

log = logging.getLogger(__name__)

_PAD, _EOS, _UNK = "<pad>", "</s>", "<unk>"


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the tiny two-tower model: seconds to run on a laptop CPU."""

    width: int = 128
    layers: int = 4
    heads: int = 4
    patch_size: int = 16
    image_size: int = 96  # 6x6 patches: enough to see stripes and dots on a product
    max_text_tokens: int = 32
    vocab_size: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("width", "layers", "heads", "patch_size", "image_size", "max_text_tokens", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")


def _train_tokenizer(titles: list[str], cfg: TinyModelConfig):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=cfg.vocab_size, special_tokens=[_PAD, _EOS, _UNK], unk_token=_UNK, show_progress=False
    )
    tokenizer.train_from_iterator(titles, trainer=trainer)
    eos_id = tokenizer.token_to_id(_EOS)
    # SigLIP's text tower pools the last position, so every sequence ends in </s> and is padded to full length.
    tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {_EOS}", special_tokens=[(_EOS, eos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=_PAD,
        eos_token=_EOS,
        unk_token=_UNK,
        model_max_length=cfg.max_text_tokens,
    )


def init_tiny_model(titles: Iterable[str], out: str | Path, cfg: TinyModelConfig = TinyModelConfig()) -> Path:
    """Write a randomly initialised tiny SigLIP checkpoint with a tokenizer trained on `titles`.

    Raises:
        ValueError: no non-empty titles to train the tokenizer on.
    """
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    texts = [t for t in (str(t).strip() for t in titles if t is not None) if t]
    if not texts:
        raise ValueError("no non-empty titles to train the tokenizer on")
    tokenizer = _train_tokenizer(texts, cfg)
    tower = dict(
        hidden_size=cfg.width,
        intermediate_size=4 * cfg.width,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
    )
    config = SiglipConfig(
        text_config=dict(
            tower,
            vocab_size=len(tokenizer),
            max_position_embeddings=cfg.max_text_tokens,
            projection_size=cfg.width,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        ),
        vision_config=dict(tower, image_size=cfg.image_size, patch_size=cfg.patch_size),
    )
    torch.manual_seed(cfg.seed)
    model = SiglipModel(config)
    with torch.no_grad():  # the sigmoid loss's recommended start: t' = log 10, b = -10
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    SiglipImageProcessorPil(size={"height": cfg.image_size, "width": cfg.image_size}).save_pretrained(out)
    log.info("wrote tiny SigLIP (%d parameters, vocab %d) to %s", model.num_parameters(), len(tokenizer), out)
    return out
