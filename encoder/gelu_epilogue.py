"""The tower's MLPs with GELU inside the first product's epilogue (cuBLASLt), on CUDA.

Each layer's MLP is `fc2(gelu(fc1(x)))`. Compiled or not, the GELU runs as a pointwise kernel of its own: on an
H200 it was 11% of SigLIP base/16-224's GPU time (run D, BENCHMARKS.md), since it reads and writes the
(n·196, 3072) intermediate once more per layer (~0.6 GB per layer for a batch of 256 in bf16) after the product has
written it. `torch._addmm_activation(bias, x, W.t(), use_gelu=True)` is the product, its bias and GELU in one
cuBLASLt call (epilogue GELU_BIAS), and torch.compile keeps it as that call. On CUDA it computes GELU's tanh
approximation, the one SigLIP's `gelu_pytorch_tanh` is; on the CPU the same op computes GELU exactly (erf), which
SigLIP's does not, so only CUDA towers are swapped. The op has no backward: for inference only (`load_encoder`'s
towers; training keeps transformers' MLP).
"""

from __future__ import annotations

import torch

__all__ = ["EpilogueMLP", "TANH_GELUS", "gelu_in_epilogue"]

TANH_GELUS = frozenset({"gelu_pytorch_tanh", "gelu_new"})  # transformers' names for GELU's tanh approximation


class EpilogueMLP(torch.nn.Module):
    """`fc2(gelu_tanh(fc1(x)))` with the GELU in `fc1`'s epilogue; the same `fc1` and `fc2` (and state dict) as
    the MLP it replaces."""

    def __init__(self, fc1: torch.nn.Linear, fc2: torch.nn.Linear) -> None:
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        inner = torch._addmm_activation(self.fc1.bias, flat, self.fc1.weight.t(), use_gelu=True)
        return self.fc2(inner.view(*hidden_states.shape[:-1], inner.shape[-1]))


def _fusable(module: torch.nn.Module) -> bool:
    """A transformers MLP of two biased linears around GELU's tanh approximation."""
    fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
    act = getattr(getattr(module, "config", None), "hidden_act", None)
    return (
        isinstance(fc1, torch.nn.Linear)
        and isinstance(fc2, torch.nn.Linear)
        and fc1.bias is not None
        and act in TANH_GELUS
        and set(dict(module.named_children())) <= {"fc1", "fc2", "activation_fn"}
    )


def gelu_in_epilogue(model: torch.nn.Module, device: torch.device) -> int:
    """Swap every MLP of `model` that computes GELU's tanh approximation for an `EpilogueMLP` on the same
    linears, where `device` is CUDA (elsewhere the fused op computes another GELU: nothing is swapped). Returns
    how many were swapped."""
    if device.type != "cuda":
        return 0
    found = [(name, module) for name, module in model.named_modules() if name and _fusable(module)]
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, EpilogueMLP(module.fc1, module.fc2))
    return len(found)
