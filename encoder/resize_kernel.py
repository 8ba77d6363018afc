"""The GPU resize as two gathering kernels (Triton) instead of dense matrix products.

`resize_like_pil` multiplies each image by dense (224, h) and (w, 224) resampling matrices: on an H200 that took
14.5 µs of GPU time per 640-px photo (run E's timeline, BENCHMARKS.md), mostly data movement around the products
(a uint8 → float16 copy of the canvas, 14.1 ms of 59.3 per 4,096 photos; the products on cuBLAS's sm75 kernels,
13.0 ms; the rounding's pointwise kernels, 6.5 ms). That time adds to the model's instead of hiding under it. Here
each output value is the sum of its dozen taps, read straight from the decoder's packed uint8 buffer:

- the vertical pass: one program per image, output row and block of the row's 3·w values, each a weighted sum of
  `taps` input rows (whole rows read in order: coalesced), into a float32 buffer of (n, height, 3·w_max);
- the horizontal pass: one program per image and 4 output rows, each of their width · 3 values a weighted sum
  of `taps` values of that buffer's row, rounded and clamped into the (n, height, width, 3) uint8 output.

The same taps as the products (`pil_taps`, and `draft_taps` in draft mode), in float32 throughout: the result is
within a level of `resize_like_pil`'s float32 products (the sums' order differs), ties rounded to even as there.
Interleaved (h, w, 3) images as nvImageCodec packs them, or planar as nvJPEG's are packed. On a CPU the kernels run
through Triton's interpreter (`TRITON_INTERPRET=1`, set before `triton.language` is first imported): what the tests
check. Needs Triton (torch's CUDA builds bring it).
"""

from __future__ import annotations

import functools

import torch

from encoder.preprocess import PreprocessConfig
from encoder.resize import PackedImages, batch_taps

__all__ = ["available", "resize_packed"]

ROW_BLOCK = 512  # values of an input row per program of the vertical pass
OUT_ROWS = 4  # output rows per program of the horizontal pass: each tap's columns and weights read once for them


def available() -> bool:
    """Whether Triton can be imported here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernels():
    """The two kernels, made on first use (and so only where the GPU resize asks for them)."""
    import triton
    import triton.language as tl

    @triton.jit
    def vertical(buf, offsets, heights, widths, row_at, row_taps, tmp, taps, out_rows, row_len,
                 PLANAR: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        k, y, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        h, w, base = tl.load(heights + k), tl.load(widths + k), tl.load(offsets + k)
        e = block * BLOCK + tl.arange(0, BLOCK)  # value e of the output row: (column, channel) or (channel, column)
        valid = e < 3 * w
        if PLANAR:
            channel = e // w
            within, step = channel.to(tl.int64) * h * w + (e - channel * w), w
        else:
            within, step = e.to(tl.int64), 3 * w
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        at = (k * out_rows + y) * taps
        for i in range(taps):
            row, weight = tl.load(row_at + at + i), tl.load(row_taps + at + i)
            inside = valid & (e * 0 + row < h)  # as a block: Triton's interpreter takes no scalar in a mask
            pixels = tl.load(buf + base + row.to(tl.int64) * step + within, mask=inside, other=0)
            acc += weight * pixels.to(tl.float32)
        tl.store(tmp + (k * out_rows + y).to(tl.int64) * row_len + e, acc, mask=valid)

    @triton.jit
    def horizontal(tmp, widths, col_at, col_taps, out, taps, out_rows, out_cols, row_len,
                   PLANAR: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        k, first = tl.program_id(0), tl.program_id(1) * ROWS
        w = tl.load(widths + k)
        i = tl.arange(0, BLOCK)  # output value i: column i // 3, channel i % 3
        valid = i < 3 * out_cols
        x = i // 3
        channel = i - 3 * x
        y = first + tl.arange(0, ROWS)[:, None]  # ROWS output rows share each tap's columns and weights
        rows = tmp + (k * out_rows + y).to(tl.int64) * row_len
        inside = valid[None, :] & (y < out_rows)
        acc = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        at = (k * out_cols + x) * taps
        for j in range(taps):
            col = tl.load(col_at + at + j, mask=valid, other=0)
            weight = tl.load(col_taps + at + j, mask=valid, other=0.0)
            if PLANAR:
                src = channel * w + col
            else:
                src = 3 * col + channel
            acc += weight[None, :] * tl.load(rows + src[None, :], mask=inside & (col < w)[None, :], other=0.0)
        level = tl.floor(acc + 0.5)
        tie_to_odd = (level - acc == 0.5) & (level - 2 * tl.floor(level * 0.5) == 1)
        level = tl.minimum(tl.maximum(tl.where(tie_to_odd, level - 1, level), 0.0), 255.0)  # ties to even, as torch
        tl.store(out + (k * out_rows + y).to(tl.int64) * (3 * out_cols) + i[None, :], level.to(tl.uint8), mask=inside)

    return vertical, horizontal


def resize_packed(images: PackedImages, cfg: PreprocessConfig, draft: bool = False,
                  max_buffer_bytes: int = 1 << 28) -> torch.Tensor:  # fmt: skip
    """`PackedImages` (uint8, interleaved or planar) → (n, height, width, 3) uint8, PIL's antialiased filter as
    `resize_like_pil` computes it (`draft`: each image resized as from Pillow's draft decode of it). The vertical
    pass's float32 buffer holds at most `max_buffer_bytes` (images in as many runs as that takes, one at least)."""
    import triton

    vertical, horizontal = _kernels()
    n, device = len(images), images.buffer.device
    out = torch.empty((n, cfg.height, cfg.width, 3), dtype=torch.uint8, device=device)
    if n == 0:
        return out
    uploaded, (row_at, row_taps), (col_at, col_taps) = batch_taps(images.shapes, cfg, draft, device, images.offsets)
    # Every array the kernels take starts 16-byte aligned, whatever n: Triton compiles a kernel once per alignment
    # of its pointers, and a batch of another count (images routed to the CPU, dead letters) would compile another
    # mid-run. The heights and widths as rows of a multiple of 4, the offsets copied where n is odd, runs of a
    # multiple of 4 images (where the buffer holds 4: ~24 of 12-MP photos at 224 px).
    sizes = torch.empty((2, n + -n % 4), dtype=torch.int32, device=device)
    sizes[:, :n] = uploaded[: 2 * n].view(2, n)
    heights, widths = sizes[0], sizes[1]
    offsets = uploaded[3 * n :] if n % 2 == 0 else uploaded[3 * n :].clone()
    row_at, col_at = row_at.int().contiguous(), col_at.int().contiguous()
    row_taps, col_taps = row_taps.contiguous(), col_taps.contiguous()
    row_len = 3 * max(w for _, w in images.shapes)
    per_run = max(1, min(n, max_buffer_bytes // (4 * cfg.height * row_len)))
    if per_run < n:
        per_run = per_run // 4 * 4 or per_run
    tmp = torch.empty((per_run, cfg.height, row_len), dtype=torch.float32, device=device)
    blocks, out_block = triton.cdiv(row_len, ROW_BLOCK), triton.next_power_of_2(3 * cfg.width)
    for start in range(0, n, per_run):
        count = min(per_run, n - start)
        vertical[(count, cfg.height, blocks)](images.buffer, offsets[start:], heights[start:], widths[start:],
                                              row_at[start:], row_taps[start:], tmp, row_at.shape[2], cfg.height,
                                              row_len, PLANAR=images.planar, BLOCK=ROW_BLOCK)  # fmt: skip
        horizontal[(count, triton.cdiv(cfg.height, OUT_ROWS))](tmp, widths[start:], col_at[start:],
                                                               col_taps[start:], out[start:], col_at.shape[2],
                                                               cfg.height, cfg.width, row_len, PLANAR=images.planar,
                                                               ROWS=OUT_ROWS, BLOCK=out_block)  # fmt: skip
    return out
