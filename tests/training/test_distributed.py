"""Two CPU processes under torchrun (gloo) take the same steps as one process on the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from training import train

pytestmark = pytest.mark.slow


def _steps(out: str) -> list[float]:
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    return [value for r in rows if "loss" in r for value in (r["loss"], r["grad_norm"])]


def test_two_processes_train_like_one(train_config, tmp_path):
    single = train(train_config(out=str(tmp_path / "one"), epochs=1))
    cfg = train_config(out=str(tmp_path / "two"), epochs=1)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "pipelines.cli", "train", "--catalog", cfg.catalog, "--model", cfg.model, "--out", cfg.out,
        "--epochs", "1", "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr), "--val-fraction",
        str(cfg.val_fraction), "--checkpoint-every", str(cfg.checkpoint_every), "--workers", "0",
        "--warmup-fraction", str(cfg.warmup_fraction), "--log-every", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("training run") == 1  # rank 0 alone prints the summary
    # Loss and gradient norm per step (Adam hides a wrong gradient scale in the weights; the norm does not).
    assert _steps(single.out) == pytest.approx(_steps(cfg.out), rel=1e-5)
    one, two = load_file(f"{single.model}/model.safetensors"), load_file(f"{cfg.out}/model/model.safetensors")
    moved = 0
    for name, tensor in one.items():
        # Same global batch, same loss; only the order of floating-point sums differs. Adam turns
        # rounding noise in gradients that are zero in exact arithmetic (attention key biases) into
        # lr-sized steps, hence 1e-4 and not 1e-6.
        torch.testing.assert_close(two[name], tensor, rtol=1e-4, atol=1e-4, msg=name)
        moved += not torch.equal(tensor, load_file(f"{cfg.model}/model.safetensors")[name])
    assert moved > len(one) // 2


@pytest.mark.parametrize(
    ("requested", "world", "cuda", "expected"),
    [
        ("auto", 2, True, "cuda:3"),  # was "auto": every rank on the first GPU
        ("cuda", 2, True, "cuda:3"),
        ("auto", 2, False, "auto"),  # CPU processes (gloo)
        ("cpu", 2, True, "cpu"),
        ("cuda:1", 2, True, "cuda:1"),  # named by the caller: as named
        ("auto", 1, True, "auto"),  # one process: `pick_device` claims a GPU
        ("cuda", 1, True, "cuda"),
    ],
)
def test_under_torchrun_a_gpu_request_means_the_local_ranks_gpu(monkeypatch, requested, world, cuda, expected):
    from training.distributed import process_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert process_device(requested, world, local_rank=3) == expected


@pytest.mark.parametrize(("device", "backend"), [("cuda:1", "cpu:gloo,cuda:nccl"), ("cpu", "gloo")])
def test_processes_on_gpus_sum_cpu_counts_through_gloo(monkeypatch, train_config, device, backend):
    """NCCL takes CUDA tensors only: with it alone, the loop's first checkpoint (a sum of CPU counts over the
    processes) failed every multi-GPU run with "No backend type associated with device type cpu"."""
    from training import distributed

    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed, "pick_device", lambda requested: torch.device(device))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: joined.append(backend))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    dist, _ = distributed.start_distributed(train_config(device="auto"))
    assert joined == [backend] and (dist.rank, dist.world) == (1, 2)
