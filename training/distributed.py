"""Who this process is in a `torchrun` job, and the few collectives the loop needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from encoder.model import pick_device
from training.config import TrainConfig

__all__ = ["Dist", "process_device", "start_distributed"]


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.clone()
            torch.distributed.all_reduce(value)
        return value


def process_device(requested: str, world: int, local_rank: int) -> str:
    """Under torchrun (`world` > 1), a GPU request ("cuda", or "auto" where CUDA is) means the local rank's GPU."""
    gpu = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    return f"cuda:{local_rank}" if world > 1 and gpu else requested


def start_distributed(cfg: TrainConfig) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(process_device(cfg.device, world, local_rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        # NCCL takes CUDA tensors only: the loop's counts and flags, CPU tensors, go through gloo.
        torch.distributed.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return Dist(rank, world, local_rank), device
