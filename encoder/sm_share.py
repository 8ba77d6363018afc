"""The model's kernels on part of the GPU's SMs, the rest left free for decoding and resizing (a CUDA green context).

Run D's timeline (BENCHMARKS.md) found the GPU worker's decode and resize kernels waiting for the model's: its GEMMs
fill every SM, so nvImageCodec's kernels and the resize's run in the gaps between theirs, their GPU time adds to the
model's instead of hiding under it, and the decode thread's time per image doubled beside the model (69 → 130 µs),
which set (d)'s pace. A green context holds the kernels of the model's stream to a fixed set of SMs. Kernels of every
other stream (the decoders' own, the resize's) still run on any SM, so those the model is kept from are free for them
the moment they are launched; the model gives up that share of its SMs in return.

The SM counts a partition may take depend on the architecture (the driver's `cuDevSmResourceSplitByCount`): the
model's count is rounded down to one it can take, so at least `decode_sms` are left.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

__all__ = ["SmShare", "SmShareError", "model_sm_count", "share_sms"]

log = logging.getLogger(__name__)


class SmShareError(RuntimeError):
    """This torch build or driver cannot give the model a share of the SMs (no green contexts)."""


@dataclass(frozen=True)
class SmShare:
    """A stream whose kernels run on `model_sms` of the device's `total_sms` SMs; `context` keeps it valid."""

    stream: torch.cuda.Stream
    model_sms: int
    total_sms: int
    context: object

    @property
    def decode_sms(self) -> int:
        return self.total_sms - self.model_sms


def _granule(capability: tuple[int, int]) -> tuple[int, int]:
    """(multiple, least) SM counts of a partition on a compute capability, per the CUDA driver guide for green
    contexts: 9.0 and later in eights; 8.x in twos, at least four; 7.x in twos; earlier, any."""
    major = capability[0]
    return (8, 8) if major >= 9 else (2, 4) if major == 8 else (2, 2) if major == 7 else (1, 1)


def model_sm_count(total_sms: int, decode_sms: int, capability: tuple[int, int]) -> int:
    """The SMs the model's kernels may take so that at least `decode_sms` of `total_sms` are left to the rest.

    Raises:
        ValueError: `decode_sms` is not positive, or leaves the model fewer SMs than a partition can have.
    """
    multiple, least = _granule(capability)
    model = (total_sms - decode_sms) // multiple * multiple
    if decode_sms < 1 or model < least:
        raise ValueError(f"decode_sms must be 1 to {total_sms - least} on this GPU ({total_sms} SMs, the model "
                         f"keeping at least {least}), got {decode_sms}")  # fmt: skip
    return model


def share_sms(device: torch.device, decode_sms: int) -> SmShare:
    """A stream for the model's kernels on `device` that leaves at least `decode_sms` SMs to other streams.

    Raises:
        ValueError: `decode_sms` does not fit the device (`model_sm_count`).
        SmShareError: not a CUDA device, or no green contexts in this torch build or driver.
    """
    if device.type != "cuda":
        raise SmShareError(f"needs a CUDA device, not {device}")
    from torch.cuda import green_contexts

    if not green_contexts.SUPPORTED:
        raise SmShareError(f"torch {torch.__version__} was built without CUDA green contexts")
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).multi_processor_count
    model = model_sm_count(total, decode_sms, torch.cuda.get_device_capability(index))
    try:
        context = green_contexts.GreenContext.create(num_sms=model, device_id=index)
        stream = _stream_of(context, index)
    except RuntimeError as err:  # the driver refused: too old for green contexts, or the partition
        raise SmShareError(f"the driver gave no green context of {model} SMs ({err})") from None
    log.info("the model's kernels on %d of %d SMs on %s; the other %d for decoding and resizing", model, total,
             device, total - model)  # fmt: skip
    return SmShare(stream, model, total, context)


def _stream_of(context, index: int) -> torch.cuda.Stream:
    """A stream in the green context: its own (`Stream()`), or one made while it is current, where torch's binding
    has no `Stream()`."""
    try:
        return context.Stream()
    except AttributeError:
        pass
    context.set_context()
    try:
        return torch.cuda.Stream(index)
    finally:
        context.pop_context()
