"""A ViT's patch embedding as one matrix product over the flattened patches, not a convolution.

SigLIP cuts an image into patches with a `Conv2d` whose stride is its kernel: each output is one patch's pixels
times a (hidden, 3·p·p) matrix. cuDNN runs that as a convolution, with a layout change on each side: on an H200
(run D, BENCHMARKS.md) SigLIP base/16-224's patch embedding took ~2.1 ms of a batch of 256's ~21 ms in the tower
(its kernel at ~39 TFLOP/s, and `nchwToNhwc` / `nhwcToNchw` around it). As a product of the (n·patches, 3·p·p)
patch matrix and the weights it is one plain GEMM, and the reshuffle into patches fuses, compiled, into the kernel
that already rescales and normalises the pixels.
"""

from __future__ import annotations

import torch

__all__ = ["PatchEmbedding", "patch_embedding_as_matmul"]


class PatchEmbedding(torch.nn.Conv2d):
    """A `Conv2d` with stride equal to its kernel, no padding, dilation or groups, computed as a matrix product.
    Same parameters, same names (a checkpoint's state dict loads into it), same output: (n, hidden, rows, cols),
    here a view of the product's (n, patches, hidden), which is the layout the tower reads next. As the
    convolution does, pixels past the last whole patch are left out (so400m/14 at 384 px: 27 patches a side)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, channels, height, width = x.shape
        ph, pw = self.kernel_size
        rows, cols = height // ph, width // pw
        patches = (
            x[:, :, : rows * ph, : cols * pw]
            .reshape(n, channels, rows, ph, cols, pw)
            .permute(0, 2, 4, 1, 3, 5)  # patch by patch, each channel, row and column in the weights' order
            .reshape(n, rows * cols, channels * ph * pw)
        )
        out = torch.nn.functional.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
        return out.transpose(1, 2).view(n, self.out_channels, rows, cols)


def _plain_patches(conv: torch.nn.Conv2d) -> bool:
    """Whether `conv` only cuts its input into patches (stride = kernel, no padding, dilation or groups)."""
    return (
        conv.stride == conv.kernel_size
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def patch_embedding_as_matmul(vision_model: torch.nn.Module) -> bool:
    """Swap the tower's patch-embedding convolution for a `PatchEmbedding` sharing its weight and bias (the
    model's state dict is unchanged). Returns whether it did: a tower without a plain patch convolution is left
    as it is."""
    embeddings = getattr(getattr(vision_model, "vision_model", vision_model), "embeddings", None)
    conv = getattr(embeddings, "patch_embedding", None)
    if type(conv) is not torch.nn.Conv2d or not _plain_patches(conv):
        return False
    swapped = PatchEmbedding(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                             bias=conv.bias is not None, device="meta")  # fmt: skip
    swapped.weight, swapped.bias = conv.weight, conv.bias
    embeddings.patch_embedding = swapped
    return True
