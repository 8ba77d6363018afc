"""Training checkpoints: complete or invisible, self-describing, and checked before resuming.

    OUT/checkpoints/step-00000300/
        model/            the two-tower SigLIP (save_pretrained, safetensors) + tokenizer + preprocessing
        trainer_state.pt  optimizer, LR schedule and RNG states (tensors and plain containers only;
                          loaded with torch.load(weights_only=True), so no pickled code runs)
        trainer.json      step, the settings that must match to resume, pairs digest, architecture

A checkpoint is written under `step-N.partial/` and renamed when complete, so a crash
mid-write leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from training.config import RESUME_KEYS, TrainConfig

__all__ = [
    "CHECKPOINT_PREFIX",
    "Checkpoint",
    "ResumeError",
    "architecture_of",
    "latest_checkpoint",
    "load_state",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX, _PARTIAL = "step-", ".partial"


class ResumeError(ValueError):
    """A checkpoint cannot continue this run; the message names what differs."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    info: dict

    @property
    def model_dir(self) -> Path:
        return self.path / "model"


def architecture_of(model: torch.nn.Module) -> str:
    """Hash of every parameter's name and shape: equal iff one model's weights load into the other."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
    return digest.hexdigest()[:16]


def _checkpoints_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: str | Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first; partial ones are ignored."""
    found = []
    root = _checkpoints_dir(out)
    for path in root.glob(f"{CHECKPOINT_PREFIX}*") if root.is_dir() else []:
        info_file = path / "trainer.json"
        if path.name.endswith(_PARTIAL) or not info_file.is_file():
            continue
        info = json.loads(info_file.read_text())
        found.append(Checkpoint(path, int(info["step"]), info))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(out: str | Path) -> Checkpoint | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def save_checkpoint(out: str | Path, step: int, model, tokenizer, preprocessor_files: list[Path],
                    state: dict, info: dict, keep: int) -> Checkpoint:  # fmt: skip
    """Write a complete checkpoint atomically, then delete all but the newest `keep`."""
    root = _checkpoints_dir(out)
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    partial = final.with_name(final.name + _PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "model").mkdir(parents=True)
    model.save_pretrained(partial / "model", safe_serialization=True)
    tokenizer.save_pretrained(partial / "model")
    for source in preprocessor_files:
        shutil.copy2(source, partial / "model" / source.name)
    torch.save(state, partial / "trainer_state.pt")
    (partial / "trainer.json").write_text(json.dumps({**info, "step": step}, indent=2, sort_keys=True))
    if final.exists():  # the same step written again (a resumed run re-reaching it): replace it
        shutil.rmtree(final)
    os.replace(partial, final)
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    log.info("checkpoint at step %d: %s", step, final)
    return Checkpoint(final, step, {**info, "step": step})


def resume_info(cfg: TrainConfig, pairs_digest: str, architecture: str) -> dict:
    """What a checkpoint records so that a later run can tell whether it may resume from it."""
    return {
        "settings": {key: getattr(cfg, key) for key in RESUME_KEYS},
        "pairs_digest": pairs_digest,
        "architecture": architecture,
        "source_model": cfg.model,
    }


def check_resumable(checkpoint: Checkpoint, cfg: TrainConfig, pairs_digest: str, architecture: str,
                    where: str | None = None) -> None:  # fmt: skip
    """Raise ResumeError naming every difference that would make resuming inexact (`where`: the checkpoint as the
    user knows it, when its local path is a copy)."""
    info = checkpoint.info
    differences = [
        f"{key} was {old!r}, now {getattr(cfg, key)!r}"
        for key, old in info.get("settings", {}).items()
        if key in RESUME_KEYS and old != getattr(cfg, key)
    ]
    if info.get("pairs_digest") != pairs_digest:
        differences.append("the training pairs differ (another catalog, or pairs.parquet changed)")
    if info.get("architecture") != architecture:
        differences.append(f"--model {cfg.model!r} has another architecture than the checkpoint's "
                           f"({info.get('source_model')!r})")  # fmt: skip
    if differences:
        raise ResumeError(
            f"cannot resume from {where or checkpoint.path}: "
            + "; ".join(differences)
            + ". Rerun with the original settings, or train into a new --out."
        )


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state(checkpoint: Checkpoint, where: str | None = None) -> dict:
    """The optimizer, schedule and RNG state of a checkpoint (tensors and plain containers only)."""
    path = checkpoint.path / "trainer_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file: say which and what to do
        copy = f"{where} and this machine's copy, {checkpoint.path}," if where and where != str(checkpoint.path) else ""
        raise ResumeError(f"cannot read {path} ({type(err).__name__}: {err}); delete {copy or checkpoint.path} "
                          "to resume from the one before") from err  # fmt: skip
