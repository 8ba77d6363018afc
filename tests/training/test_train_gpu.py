"""The CUDA path: bf16 autocast, fused AdamW, pinned memory, torch.compile (skipped without a GPU)."""

import math

import pytest
import torch

from training import train

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_training_on_cuda(train_config, compile):
    result = train(train_config(epochs=1, device="cuda", compile=compile, workers=2))
    assert result.steps > 0 and result.images_per_s > 0
    assert math.isfinite(result.validation["val_loss"])
