"""The sigmoid loss: a plain reference, SiglipModel's own loss, and two gloo processes vs one."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from encoder.loss import INIT_LOGIT_BIAS, INIT_LOGIT_SCALE, distributed_sigmoid_loss, sigmoid_loss
from tests.conftest import free_port as _free_port


def _features(n: int, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1)


def _reference(x: np.ndarray, y: np.ndarray, t: float, b: float) -> float:
    """The paper's formula, element by element."""
    total = 0.0
    for i in range(len(x)):
        for j in range(len(y)):
            label = 1.0 if i == j else -1.0
            logit = math.exp(t) * float(x[i] @ y[j]) + b
            total += -math.log(1.0 / (1.0 + math.exp(-label * logit)))
    return total / len(x)


def test_equals_the_plain_formula():
    x, y = _features(7)
    t, b = torch.tensor(INIT_LOGIT_SCALE, dtype=torch.float64), torch.tensor(INIT_LOGIT_BIAS, dtype=torch.float64)
    assert sigmoid_loss(x, y, t, b).item() == pytest.approx(
        _reference(x.numpy(), y.numpy(), t.item(), b.item()), abs=1e-9
    )


def test_equals_siglip_models_own_loss(tiny_model):
    from transformers import AutoTokenizer, SiglipModel

    model = SiglipModel.from_pretrained(tiny_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    pixels = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    tokens = tokenizer([f"a striped mug number {i}" for i in range(6)], padding="max_length", max_length=32,
                       truncation=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        out = model(pixel_values=pixels, input_ids=tokens["input_ids"], return_loss=True)
        images = torch.nn.functional.normalize(out.image_embeds, dim=-1)
        texts = torch.nn.functional.normalize(out.text_embeds, dim=-1)
        ours = sigmoid_loss(images, texts, model.logit_scale, model.logit_bias)
    assert abs(ours.item() - out.loss.item()) < 1e-5


def test_shape_mismatch_is_an_error():
    x, y = _features(4)
    with pytest.raises(ValueError, match="same shape"):
        sigmoid_loss(x, y[:3], torch.tensor(0.0), torch.tensor(0.0))


def _worker(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = _features(8)
        n = len(x) // world
        local_x = x[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        local_y = y[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        t = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
        loss = distributed_sigmoid_loss(local_x, local_y, t, b)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        for scalar in (t.grad, b.grad):
            dist.all_reduce(scalar)
        results[rank] = (total.item(), local_x.grad.numpy(), local_y.grad.numpy(), t.grad.item(), b.grad.item())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process():
    world = 2
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(_worker, args=(world, _free_port(), results), nprocs=world, join=True, start_method="spawn")

    x, y = _features(8)
    x.requires_grad_(True)
    y.requires_grad_(True)
    t = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    single = sigmoid_loss(x, y, t, b)
    single.backward()

    assert results[0][0] == pytest.approx(single.item(), abs=1e-10)
    np.testing.assert_allclose(np.concatenate([results[r][1] for r in range(world)]), x.grad.numpy(), atol=1e-10)
    np.testing.assert_allclose(np.concatenate([results[r][2] for r in range(world)]), y.grad.numpy(), atol=1e-10)
    assert results[0][3] == pytest.approx(t.grad.item(), abs=1e-10)
    assert results[0][4] == pytest.approx(b.grad.item(), abs=1e-10)
