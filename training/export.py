"""Export a trained two-tower model: the image encoder `lookalike embed --model` takes, and the full model.

OUT/encoder/   SiglipVisionModel (config + safetensors), preprocessor_config.json,
               lookalike_encoder.json (model_version, base model, step, validation metrics)
OUT/model/     the two-tower SiglipModel + tokenizer + preprocessing, for further training
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from encoder.model import model_version
from encoder.preprocess import PreprocessConfig

__all__ = ["ENCODER_INFO", "export_model"]

log = logging.getLogger(__name__)

ENCODER_INFO = "lookalike_encoder.json"


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def export_model(checkpoint_model_dir: Path, out: str | Path, preprocess: PreprocessConfig, info: dict) -> dict:
    """Write OUT/encoder and OUT/model from a checkpoint's model directory.

    Returns:
        {"encoder": path, "model": path, "model_version": str}
    """
    from transformers import SiglipModel, SiglipVisionModel

    out = Path(out)
    model = SiglipModel.from_pretrained(checkpoint_model_dir, use_safetensors=True)
    vision = SiglipVisionModel(model.config.vision_config)
    vision.load_state_dict(model.vision_model.state_dict())  # transformers 5: the vision model is the tower itself
    version = model_version(vision.state_dict(), preprocess)

    encoder_tmp = out / "encoder.partial"
    shutil.rmtree(encoder_tmp, ignore_errors=True)
    vision.save_pretrained(encoder_tmp, safe_serialization=True)
    shutil.copy2(checkpoint_model_dir / "preprocessor_config.json", encoder_tmp / "preprocessor_config.json")
    (encoder_tmp / ENCODER_INFO).write_text(json.dumps({"model_version": version, **info}, indent=2, sort_keys=True))
    _replace_dir(encoder_tmp, out / "encoder")

    model_tmp = out / "model.partial"
    shutil.rmtree(model_tmp, ignore_errors=True)
    shutil.copytree(checkpoint_model_dir, model_tmp)
    _replace_dir(model_tmp, out / "model")
    log.info("exported image encoder %s to %s", version, out / "encoder")
    return {"encoder": str(out / "encoder"), "model": str(out / "model"), "model_version": version}
