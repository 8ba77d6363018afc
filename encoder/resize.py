"""PIL's antialiased resize as batched matrix products, for images already on a device (the GPU image path).

Pillow resizes each image in two passes, horizontal then vertical, each a weighted sum
over a filter window per output pixel. Here each pass is one matrix per input size and a
batch of images of any sizes is a few batched products: the same weights, the same order,
uint8 rounding as Pillow's, within a level of it on ~all values
(tests/encoder/test_gpu_images.py). For a JPEG the CPU path would decode in draft mode, the
same matrices also make draft mode's reduction (`draft_taps`), so a full-size GPU decode is
resized as from the draft decode.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from encoder.preprocess import PreprocessConfig, draft_scale, draft_size

__all__ = ["PackedImages", "dense_weights", "draft_taps", "gpu_resizes", "pack_images", "pil_taps", "resize_like_pil"]


@dataclass(frozen=True)
class PackedImages:
    """Decoded images side by side in one flat uint8 buffer, image k from `offsets[k]`: (h, w, 3) interleaved
    (`encoder.nvimgcodec` decodes a batch so), or (3, h, w) planar (`pack_images`). The buffer has room for a
    row of the widest image after each image's last row start, so every canvas row of a chunk is a window of it:
    the resize gathers a chunk's canvas in one indexing op instead of a copy (and its launch, and its turn at the
    interpreter lock) per image."""

    buffer: torch.Tensor  # 1-D uint8
    offsets: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]  # (height, width) per image
    planar: bool = False  # (3, h, w), channel after channel; else (h, w, 3)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, k: int | slice) -> torch.Tensor | PackedImages:
        """Image k as a (3, h, w) view, or a slice of the images (same buffer)."""
        if isinstance(k, slice):
            return PackedImages(self.buffer, self.offsets[k], self.shapes[k], self.planar)
        (h, w), offset = self.shapes[k], self.offsets[k]
        strides = (h * w, w, 1) if self.planar else (1, 3 * w, 3)
        return self.buffer.as_strided((3, h, w), strides, self.buffer.storage_offset() + offset)  # absolute

    def select(self, keep: Sequence[int]) -> PackedImages:
        return PackedImages(self.buffer, tuple(self.offsets[k] for k in keep), tuple(self.shapes[k] for k in keep),
                            self.planar)  # fmt: skip

    def row_bytes(self, width: int) -> int:
        """Bytes of one canvas row `width` pixels wide: a row of one channel, planar, or of all three."""
        return width if self.planar else 3 * width

    def word_bytes(self) -> int:
        """The widest word (8, 4, 2 or 1 bytes) that every canvas row's start and every row's length are whole
        multiples of, the buffer's address included: the resize gathers its rows in such words, not byte by byte
        (photos whose widths are multiples of 8 and so most catalog images: a gather of an eighth the elements)."""
        sizes = [self.buffer.data_ptr(), *self.offsets, *(self.row_bytes(w) for _, w in self.shapes)]
        if self.planar:  # channel c starts c·h·w bytes into its image
            sizes += [h * w for h, w in self.shapes]
        return next(k for k in (8, 4, 2, 1) if all(size % k == 0 for size in sizes))

    def windows_fit(self, width: int) -> bool:
        """Whether a canvas row `width` pixels wide from every image's last row start stays inside the buffer."""
        last_row = (lambda o, h, w: o + 3 * h * w - w) if self.planar else (lambda o, h, w: o + (h - 1) * w * 3)
        return all(last_row(o, h, w) + self.row_bytes(width) <= self.buffer.numel()
                   for o, (h, w) in zip(self.offsets, self.shapes, strict=True))  # fmt: skip


def pack_images(images: Sequence[torch.Tensor]) -> PackedImages:
    """(3, h, w) uint8 images (nvJPEG's, through torchvision) → one planar `PackedImages`, with a widest row's room
    after the last, in one call into torch whatever their number: the resize then gathers them as it does
    nvImageCodec's batches, instead of copying them into its canvas one call per image."""
    # A one-channel image (grey) becomes three, as a copy into the canvas would broadcast it; its offset must not
    # count one plane where the buffer holds three.
    images = [image if image.shape[0] == 3 else image.expand(3, -1, -1) for image in images]
    shapes = tuple((int(image.shape[1]), int(image.shape[2])) for image in images)
    room = images[0].new_zeros(max(w for _, w in shapes))
    buffer = torch._utils._flatten_dense_tensors([*images, room])  # one cat in C++, not a flatten per image
    offsets = tuple(itertools.accumulate((3 * h * w for h, w in shapes[:-1]), initial=0))
    return PackedImages(buffer, offsets, shapes, planar=True)


def _cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _triangle(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x.abs()).clamp(min=0.0)


_FILTERS = {2: (_triangle, 1.0), 3: (_cubic, 2.0)}  # PIL resample → (filter, support)


def pil_taps(in_sizes: torch.Tensor, out_size: int, resample: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's antialiased resampling coefficients (its `precompute_coeffs`) for each input size (each at most
    `length`), built on the sizes' device in a few vectorised ops: (n, out_size, window) input positions (int64)
    and their float32 weights, zero past each window's end. `window` is PIL's `ksize` for the widest filter:
    a dozen taps for 640 → 224. Computing every (output, input) pair in float64 and masking most of them away,
    as this once did, made some thirty passes over 0.75 GB for a batch of 256 photos (rows and columns)."""
    kernel, support = _FILTERS[resample]
    device = in_sizes.device
    window = 2 * math.ceil(support * max(1.0, length / out_size)) + 1
    size = in_sizes.to(torch.float64).view(-1, 1, 1)
    scale = size / out_size
    filter_scale = scale.clamp(min=1.0)
    support = support * filter_scale
    centre = (torch.arange(out_size, device=device, dtype=torch.float64).view(1, -1, 1) + 0.5) * scale
    lo = torch.floor(centre - support + 0.5).clamp(min=0)
    hi = torch.minimum(torch.floor(centre + support + 0.5), size)
    x = lo + torch.arange(window, device=device, dtype=torch.float64)
    taps = kernel((x - centre + 0.5) / filter_scale) * (x < hi)
    total = taps.sum(dim=-1, keepdim=True)
    return x.long(), (taps / torch.where(total == 0, 1.0, total)).to(torch.float32)


def draft_taps(in_sizes: torch.Tensor, scales: torch.Tensor, out_size: int, resample: int, reduced_length: int,
               most: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`pil_taps` for full-size images that stand in for their draft decodes (the CPU path's JPEG draft mode):
    PIL's filter over each image reduced by its scale (1, 2, 4 or 8 in `scales`; each side ceil(size / scale),
    `reduced_length` the largest), each reduced pixel the mean of the pixels it covers (fewer at the far edge), as
    taps over the full-size image: `most` (the largest scale) times the window. The resize then costs the same.

    A box mean is what libjpeg's scaled inverse DCT nearly is: on 300 photos of 640 px (benchmarks/draft_parity.py),
    a 224-px model input (mostly 1/2) is within 0.29 levels on average of the CPU path's draft pixels (99th
    percentile 2, most 30, where chroma edges are sharp), against 0.76 (8, 90) resized from the full size without
    it; at 96 px (mostly 1/4), 0.31 (1, 18) against 1.45 (15, 111)."""
    if most == 1:  # nothing reduced
        return pil_taps(in_sizes, out_size, resample, reduced_length)
    positions, taps = pil_taps(-(-in_sizes // scales), out_size, resample, reduced_length)
    scales, offsets = scales.view(-1, 1, 1, 1), torch.arange(most, device=in_sizes.device)
    starts = positions[..., None] * scales  # the first full-size pixel each reduced one covers
    covered = torch.minimum(in_sizes.view(-1, 1, 1, 1) - starts, scales).clamp(min=1)  # fewer at the far edge
    spread = torch.where(offsets < covered, taps[..., None] / covered, 0.0)
    return (starts + offsets).flatten(2), spread.flatten(2)


def batch_taps(shapes: Sequence[tuple[int, int]], cfg: PreprocessConfig, draft: bool, device: torch.device,
               extra: Sequence[int] = ()) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor],
                                                   tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """A batch's (height, width) `shapes` → PIL's taps for every image's rows and columns (`draft_taps`; `draft`: as
    from the draft decode the CPU path would make), from one upload of the heights, widths, draft scales and `extra`
    (in that order, n each and then `extra`: the uploaded tensor is returned for what else it carries)."""
    n = len(shapes)
    scales = [draft_scale(h, w, cfg) if draft else 1 for h, w in shapes]
    host = torch.tensor([h for h, _ in shapes] + [w for _, w in shapes] + scales + list(extra), dtype=torch.int64)
    uploaded = (host.pin_memory() if device.type == "cuda" else host).to(device, non_blocking=True)
    reduced = [draft_size(h, w, s) for (h, w), s in zip(shapes, scales, strict=True)]
    rows = draft_taps(uploaded[:n], uploaded[2 * n : 3 * n], cfg.height, cfg.resample, max(h for h, _ in reduced),
                      max(scales))  # fmt: skip
    cols = draft_taps(uploaded[n : 2 * n], uploaded[2 * n : 3 * n], cfg.width, cfg.resample,
                      max(w for _, w in reduced), max(scales))  # fmt: skip
    return uploaded, rows, cols


def dense_weights(positions: torch.Tensor, taps: torch.Tensor, length: int) -> torch.Tensor:
    """(n, out, length) resampling matrices in the taps' dtype from `pil_taps`, zero elsewhere (`length` at least
    each input's size). Taps past a window's end are zeros: clamped into range they add nothing where they land."""
    weights = torch.zeros((*positions.shape[:2], length), dtype=taps.dtype, device=positions.device)
    return weights.scatter_add_(-1, positions.clamp(max=length - 1), taps)


def resize_like_pil(images: Sequence[torch.Tensor] | PackedImages, cfg: PreprocessConfig, chunk: int = 64,
                    dtype: torch.dtype | None = None, max_canvas_bytes: int = 1 << 28,
                    interleaved: bool = True, draft: bool = False, kernel: bool = False) -> torch.Tensor:  # fmt: skip
    """(3, h, w) uint8 images of any sizes, or `PackedImages` → (n, height, width, 3) uint8, PIL's antialiased
    filter. `draft`: the images are full-size decodes of JPEGs that the CPU path would decode in draft mode; each
    is resized as from the draft decode that Pillow would make of it (`draft_taps`), at no extra cost.

    The images are taken in order of size, so those of one size sit side by side: each run of
    equal sizes fills its part of a zero-padded canvas in one stacked copy (a catalog of
    uniform photos costs one copy per `chunk` images, not one per image) and each chunk pads
    only to its own largest image. A chunk also ends before its canvas would pass
    `max_canvas_bytes`, so one very large photo does not pad dozens of others to its size. The
    resize itself is two batched matrix products per chunk with PIL's filter weights (their taps
    built on the device for the whole batch at once, then laid out per chunk, zero beyond each
    image's edge), so a batch of all-different sizes costs a few kernels, not a dozen per image;
    one gather puts the rows back in input order. On CUDA the products run in float16 on the
    tensor cores (uint8 values are exact in it; weights keep 11 bits; float32 accumulation),
    ~10× less GPU time than float32. Matches PIL's uint8 resize to within a level on ~all values
    (tests/encoder/test_gpu_images.py).

    `interleaved`: nvImageCodec's (h, w, 3) images are resized as they lie, with no transposed copy
    (`_as_they_lie`): the vertical pass first, over rows of 3·w values, made transposed so that the horizontal one
    is a plain product. Channel by channel (`interleaved=False`, as planes are: `_plane_by_plane`) a batch needs a
    cast through a transposed view first; as they lie, a batch of 256 photos of 640 px takes 0.95× the time
    channel by channel takes on an H200 (run E, BENCHMARKS.md), 64 of them 0.91× on a 2-core CPU.

    `kernel`: the same taps summed by two Triton kernels straight from the packed buffer instead
    (`encoder.resize_kernel`; a list of images is packed first), in float32, within a level of these products.
    """
    if kernel:
        from encoder.resize_kernel import resize_packed

        packed_images = images if isinstance(images, PackedImages) else pack_images(images)
        return resize_packed(packed_images, cfg, draft=draft, max_buffer_bytes=max_canvas_bytes)
    packed = isinstance(images, PackedImages)
    device = images.buffer.device if packed else images[0].device
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    n = len(images)
    shapes = list(images.shapes) if packed else [(int(i.shape[1]), int(i.shape[2])) for i in images]
    gather = packed and images.windows_fit(max(w for _, w in shapes))  # else copied image by image, as lists are
    order = sorted(range(n), key=shapes.__getitem__)  # stable: already-sorted batches keep their order
    shapes = [shapes[k] for k in order]
    heights, widths = [h for h, _ in shapes], [w for _, w in shapes]
    inverse = [0] * n
    for position, k in enumerate(order):
        inverse[k] = position
    # One upload for the sizes, the way back to input order and, packed, where each image starts.
    uploaded, (row_at, row_taps), (col_at, col_taps) = batch_taps(
        shapes, cfg, draft, device, inverse + ([images.offsets[k] for k in order] if gather else [])
    )
    row_taps, col_taps = row_taps.to(dtype), col_taps.to(dtype)
    out = torch.empty((n, cfg.height, cfg.width, 3), dtype=torch.uint8, device=device)
    if gather:  # where each canvas row starts, in words, for the whole batch at once: a chunk takes its corner
        word = images.word_bytes()
        starts = _row_starts(uploaded[4 * n :], uploaded[:n], uploaded[n : 2 * n], max(heights), images.planar)
        starts = starts // word if word > 1 else starts
    as_rows = gather and not images.planar and interleaved
    for start, stop in _chunks(shapes, chunk, max_canvas_bytes // 3):
        h_max, w_max = max(heights[start:stop]), max(widths[start:stop])
        rows = dense_weights(row_at[start:stop], row_taps[start:stop], h_max)  # (n, height, h_max)
        cols = dense_weights(col_at[start:stop], col_taps[start:stop], w_max).transpose(1, 2)  # (n, w_max, width)
        if as_rows:  # (n, h_max, 3 w_max) rows as they lie → (n, height, width, 3)
            canvas_rows = _canvas_rows(images, order[start:stop], starts[start:stop, :, :h_max], w_max, word)
            x = _as_they_lie(rows, canvas_rows.to(dtype), cols)
            out[start:stop] = x.round_().clamp_(0, 255)  # cast in the copy
            continue
        if gather:
            canvas = _gathered_canvas(images, order[start:stop], starts[start:stop, :, :h_max], w_max, word)
        else:
            canvas = _canvas([images[k] for k in order[start:stop]], shapes[start:stop], h_max, w_max)
        x = _plane_by_plane(rows, canvas.to(dtype, memory_format=torch.contiguous_format), cols)
        # Rounded in the products' own dtype (its integers up to 2048 are exact: the same values as in float32),
        # cast to uint8 by the copy into `out`: no float32 copy, no uint8 one.
        out[start:stop] = x.round_().clamp_(0, 255)
    return out if order == list(range(n)) else out[uploaded[3 * n : 4 * n]]


def _chunks(shapes: list[tuple[int, int]], most: int, max_pixels: int) -> list[tuple[int, int]]:
    """[start, stop) runs of `shapes` (in order of size) of at most `most` images whose canvas, padded to the run's
    largest height and width, holds at most `max_pixels` pixels per channel (a run holds at least one image)."""
    runs, start, h_max, w_max = [], 0, 0, 0
    for k, (h, w) in enumerate(shapes):
        h_max, w_max = max(h_max, h), max(w_max, w)
        if k > start and (k - start >= most or (k + 1 - start) * h_max * w_max > max_pixels):
            runs.append((start, k))
            start, h_max, w_max = k, h, w
    return [*runs, (start, len(shapes))]


def _canvas(images: list[torch.Tensor], shapes: list[tuple[int, int]], h_max: int, w_max: int) -> torch.Tensor:
    """(n, 3, h_max, w_max) uint8: each image at the top left, zeros around it; images of one size (adjacent in
    `shapes`) are copied in together."""
    if shapes[0] == shapes[-1] == (h_max, w_max):  # all one size: nothing to pad
        return torch.stack(images)
    canvas = torch.zeros((len(images), 3, h_max, w_max), dtype=torch.uint8, device=images[0].device)
    start = 0
    for stop in range(1, len(images) + 1):
        if stop < len(images) and shapes[stop] == shapes[start]:
            continue
        h, w = shapes[start]
        if stop - start == 1:
            canvas[start, :, :h, :w] = images[start]
        else:
            canvas[start:stop, :, :h, :w] = torch.stack(images[start:stop])
        start = stop
    return canvas


def _row_starts(offsets: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor, h_max: int,
                planar: bool) -> torch.Tensor:  # fmt: skip
    """(n, 3 if planar else 1, h_max) int64: where in `PackedImages`' buffer canvas row r of each image starts, in
    each channel when planar: that image's row r, or its last row past its height."""
    heights, widths, offsets = heights.view(-1, 1, 1), widths.view(-1, 1, 1), offsets.view(-1, 1, 1)
    rows = torch.minimum(torch.arange(h_max, device=offsets.device).view(1, 1, -1), heights - 1)
    if planar:  # channel c of an image starts c * h * w bytes in
        return offsets + torch.arange(3, device=offsets.device).view(1, 3, 1) * (heights * widths) + rows * widths
    return offsets + rows * (3 * widths)


_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _gathered_rows(images: PackedImages, starts: torch.Tensor, w_max: int, word: int = 1) -> torch.Tensor:
    """(n, h_max · 3 if planar else h_max, row bytes) uint8 from `images`' buffer in a handful of ops whatever n: each
    canvas row is the row's bytes from its start (`_row_starts`, in `word`s: `PackedImages.word_bytes`), a window of
    an overlapping strided view of the buffer read as words, so one index gathers them all. What lies past an
    image's width or height is the next bytes of the buffer, not zeros: its resampling weights are zero there
    (`dense_weights`), and uint8 values are finite, so the products are the same as over a zero-padded canvas."""
    n, row_bytes, buffer = starts.shape[0], images.row_bytes(w_max), images.buffer
    words, row_words = buffer[: buffer.numel() // word * word].view(_WORDS[word]), row_bytes // word
    windows = words.as_strided((words.numel() - row_words + 1, row_words), (1, 1))
    return windows.index_select(0, starts.reshape(-1)).view(torch.uint8).view(n, -1, row_bytes)


def _in_place(images: PackedImages, positions: Sequence[int]) -> torch.Tensor | None:
    """The canvas rows of these images (`_gathered_rows`' shape) as one strided view of the buffer, where they are
    all one size and start at even steps in it, as a decoder lays out a batch of uniform photos; else None."""
    if len({images.shapes[k] for k in positions}) > 1:
        return None
    (h, w), offsets = images.shapes[positions[0]], [images.offsets[k] for k in positions]
    step = offsets[1] - offsets[0] if len(offsets) > 1 else 3 * h * w
    if step < 3 * h * w or any(b - a != step for a, b in itertools.pairwise(offsets)):
        return None
    row_bytes, buffer = images.row_bytes(w), images.buffer
    return buffer.as_strided((len(offsets), 3 * h if images.planar else h, row_bytes), (step, row_bytes, 1),
                             buffer.storage_offset() + offsets[0])  # fmt: skip


def _canvas_rows(images: PackedImages, positions: Sequence[int], starts: torch.Tensor, w_max: int,
                 word: int) -> torch.Tensor:  # fmt: skip
    """The canvas rows of the images at `positions`: a view where they lie evenly (`_in_place`: a catalog of uniform
    photos needs no gather), else `_gathered_rows`."""
    in_place = _in_place(images, positions)
    return _gathered_rows(images, starts, w_max, word) if in_place is None else in_place


def _gathered_canvas(images: PackedImages, positions: Sequence[int], starts: torch.Tensor, w_max: int,
                     word: int = 1) -> torch.Tensor:  # fmt: skip
    """(n, 3, h_max, w_max) uint8 (interleaved: a view of (n, h_max, w_max, 3)): `_canvas_rows` as a canvas."""
    n, h_max = starts.shape[0], starts.shape[2]
    rows = _canvas_rows(images, positions, starts, w_max, word)
    return rows.view(n, 3, h_max, w_max) if images.planar else rows.view(n, h_max, w_max, 3).permute(0, 3, 1, 2)


def _as_they_lie(rows: torch.Tensor, canvas_rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(n, height, h) and (n, w, width) filters over (n, h, 3 w) rows of interleaved pixels → (n, height, width, 3),
    a view. The vertical pass is made transposed, (3 w, height) per image, which is each image's (w, 3 height)
    matrix of column x against channel and output row: the horizontal pass is then one plain product over w, with no
    copy and no filter spread over the channels."""
    n, height, width = rows.shape[0], rows.shape[1], cols.shape[2]
    x = canvas_rows.transpose(1, 2) @ rows.transpose(1, 2)  # (n, 3 w, height); both transposes are the product's
    x = cols.transpose(1, 2) @ x.view(n, -1, 3 * height)  # (n, width, 3 height)
    return x.view(n, width, 3, height).permute(0, 3, 1, 2)


def _plane_by_plane(rows: torch.Tensor, canvas: torch.Tensor, cols: torch.Tensor,
                    broadcast: bool | None = None) -> torch.Tensor:  # fmt: skip
    """(n, height, h) and (n, w, width) filters over (n, 3, h, w) planes → (n, height, width, 3), a view.

    `broadcast` (None: on CUDA): both passes as batched products over (n, 3, ...), each filter broadcast over the
    channels. Otherwise the horizontal pass first, as PIL's, over the (3·h, w) matrix of each image's three planes,
    made transposed: each image's (width, 3·h) matrix, which read as (3·width, h) is the vertical pass's plain
    operand, with no filter broadcast. Each where it ran faster: on an H200 the broadcast products took 0.61× the
    transposed ones' time (run E), on a 2-core CPU the transposed ones 0.77× the broadcast ones' (BENCHMARKS.md)."""
    if canvas.is_cuda if broadcast is None else broadcast:
        return (rows[:, None] @ (canvas @ cols[:, None])).permute(0, 2, 3, 1)
    n, _, h, w = canvas.shape
    height, width = rows.shape[1], cols.shape[2]
    x = cols.transpose(1, 2) @ canvas.view(n, 3 * h, w).transpose(1, 2)  # (n, width, 3 h)
    x = x.view(n, 3 * width, h) @ rows.transpose(1, 2)  # (n, 3 width, height)
    return x.view(n, width, 3, height).permute(0, 3, 1, 2)


def gpu_resizes(cfg: PreprocessConfig) -> bool:
    """Whether the GPU path reproduces this checkpoint's resize filter (bilinear and bicubic)."""
    return cfg.resample in _FILTERS
