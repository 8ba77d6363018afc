"""The GPU image path's logic on the CPU: resize parity with PIL, routing, fallback, order; and on CUDA for real."""

from __future__ import annotations

import io
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from benchmarks.common import realistic_jpegs
from encoder import DecodeLimits, PreprocessConfig, decode_image
from encoder.gpu_images import (
    ClosingDecoder,
    DecodedBatch,
    GpuImages,
    batches_progressive,
    byte_tensors,
    nvimgcodec_decoder,
    outputs_held,
    pil_decoder,
    sample_jpeg,
)
from encoder.jpeg import cpu_reason
from encoder.preprocess import draft_scale
from encoder.resize import (
    PackedImages,
    _chunks,
    _plane_by_plane,
    dense_weights,
    pack_images,
    pil_taps,
    resize_like_pil,
)
from tests.support.fake_cuda import FakeCuda
from tests.support.hostile_jpegs import each_kind, routed_batches

CFG = PreprocessConfig(height=224, width=224)
FULL = DecodeLimits(draft=False)  # the GPU decodes at full size; compare with the CPU doing the same


def _pil_decoder(calls: list[int] | None = None):
    """Stands in for nvJPEG on the CPU (`pil_decoder`), counting its calls; refuses a batch with b'REJECT' in it."""
    pil = pil_decoder()

    def decode(datas: list[bytes], device: torch.device) -> list[torch.Tensor]:
        if calls is not None:
            calls.append(len(datas))
        if any(b"REJECT" in data for data in datas):
            raise RuntimeError("nvjpeg: unsupported")
        return pil(datas, device)

    return decode


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[bytes]:
    return [p.read_bytes() for p in realistic_jpegs(tmp_path_factory.mktemp("jpegs"), 12, width=320)]


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 50, 4), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # float16: what CUDA runs
@pytest.mark.parametrize(("resample", "size", "worst"), [(3, 224, 4), (3, 384, 10), (2, 224, 1), (2, 400, 1)])
def test_resize_matches_pil_to_about_one_level(jpegs, resample, size, worst, dtype):
    images = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in jpegs] + [np.full((5, 7, 3), 200, np.uint8)]
    cfg = PreprocessConfig(height=size, width=size, resample=resample)
    tensors = [torch.from_numpy(i.copy()).permute(2, 0, 1) for i in images]
    ours = resize_like_pil(tensors, cfg, chunk=5, dtype=dtype).numpy()  # chunks of mixed sizes
    pil = np.stack([np.asarray(Image.fromarray(i).resize((size, size), resample)) for i in images])
    diff = np.abs(ours.astype(int) - pil.astype(int))
    # PIL rounds and clips to uint8 between its horizontal and vertical passes; we do not. Measured on these
    # photos: > 99.99% of values within one level; bicubic overshoot at sharp edges differs by up to 3 when
    # shrinking, up to 9 when enlarging (these test photos are 320 px); bilinear never by more than 1.
    assert diff.max() <= worst and (diff <= 1).mean() > 0.9999, f"max {diff.max()}, within 1: {(diff <= 1).mean()}"


def test_images_grouped_by_size_come_back_in_input_order_as_if_resized_alone():
    rng = np.random.default_rng(1)
    sizes = [(30, 40), (50, 20), (30, 40), (31, 40), (50, 20), (30, 40), (8, 9), (50, 20)]  # repeats, out of order
    tensors = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in sizes]
    cfg = PreprocessConfig(height=16, width=16, resample=3)
    alone = torch.cat([resize_like_pil([t], cfg) for t in tensors])
    for chunk in (3, 64):  # runs of one size split across chunks, and one chunk
        assert torch.equal(resize_like_pil(tensors, cfg, chunk=chunk), alone)
    same = [tensors[0], tensors[2], tensors[5]]  # one size: stacked without padding
    assert torch.equal(resize_like_pil(same, cfg), alone[[0, 2, 5]])


def _packed(tensors: list[torch.Tensor], slack: bool = True, planar: bool = False) -> PackedImages:
    """`tensors` side by side in one buffer, as `encoder.nvimgcodec` decodes a batch (interleaved) or `pack_images`
    packs one (planar), with room after the last image for the gather's windows or without."""
    parts = [(t if planar else t.permute(1, 2, 0)).reshape(-1) for t in tensors]
    room = max(t.shape[2] for t in tensors) * (1 if planar else 3)
    buffer = torch.cat([*parts, torch.full((room if slack else 0,), 77, dtype=torch.uint8)])
    offsets = np.cumsum([0] + [p.numel() for p in parts[:-1]]).tolist()
    return PackedImages(buffer, tuple(offsets), tuple((t.shape[1], t.shape[2]) for t in tensors), planar)


@pytest.mark.parametrize("planar", [False, True], ids=["interleaved", "planar"])
@pytest.mark.parametrize("slack", [True, False])  # without room for the gather's windows: image by image
def test_packed_images_resize_bit_for_bit_as_separate_ones(slack, planar):
    rng = np.random.default_rng(3)
    sizes = [(30, 40), (50, 20), (30, 40), (31, 41), (8, 9), (50, 20), (400, 30), (2, 60), (1, 1)]
    tensors = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in sizes]
    packed = _packed(tensors, slack, planar)
    assert all(torch.equal(packed[k], t) for k, t in enumerate(tensors)) and packed.windows_fit(60) == slack
    for resample in (2, 3):
        cfg = PreprocessConfig(height=16, width=24, resample=resample)
        for chunk, budget in ((64, 1 << 28), (3, 1 << 28), (64, 3 * 50 * 41 * 4)):  # one chunk, several, a budget
            expected = resize_like_pil(tensors, cfg, chunk=chunk, max_canvas_bytes=budget)
            got = resize_like_pil(packed, cfg, chunk=chunk, max_canvas_bytes=budget, interleaved=False)
            assert torch.equal(got, expected)  # channel by channel: the same products
            if not planar and slack:  # as they lie (the default): other products, within a level
                got = resize_like_pil(packed, cfg, chunk=chunk, max_canvas_bytes=budget)
                assert (got.int() - expected.int()).abs().max() <= 1
    assert torch.equal(resize_like_pil(packed[2:4], cfg, interleaved=False), resize_like_pil(tensors[2:4], cfg))


@pytest.mark.parametrize(("sizes", "planar", "word"), [
    ([(30, 40), (17, 48), (5, 8)], False, 8), ([(30, 44), (7, 12)], False, 4), ([(30, 42), (9, 10)], False, 2),
    ([(30, 41), (9, 10)], False, 1), ([(30, 40), (16, 48)], True, 8), ([(30, 44), (7, 12)], True, 4),
])  # fmt: skip
def test_a_packed_batchs_rows_are_gathered_in_the_widest_words_that_fit_with_the_same_pixels(sizes, planar, word,
                                                                                              monkeypatch):  # fmt: skip
    """Rows whose starts and lengths are multiples of 8, 4 or 2 bytes are gathered as such words: the same
    canvas, bit for bit, as byte by byte and as separate images."""
    rng = np.random.default_rng(5)
    tensors = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in sizes]
    packed = _packed(tensors, True, planar)
    assert packed.word_bytes() == word
    shifted = PackedImages(torch.cat([torch.zeros(1, dtype=torch.uint8), packed.buffer])[1:], packed.offsets,
                           packed.shapes, planar)  # fmt: skip
    assert shifted.buffer.data_ptr() % 2 == 1 and shifted.word_bytes() == 1  # an odd address: bytes
    cfg = PreprocessConfig(height=16, width=24)
    modes = [False, True] if not planar else [False]  # interleaved as they lie, or channel by channel
    results = [resize_like_pil(packed, cfg, chunk=2, interleaved=mode) for mode in modes]
    monkeypatch.setattr(PackedImages, "word_bytes", lambda self: 1)
    for result, mode in zip(results, modes, strict=True):
        assert torch.equal(result, resize_like_pil(packed, cfg, chunk=2, interleaved=mode))
    assert torch.equal(results[0], resize_like_pil(tensors, cfg, chunk=2))


@pytest.mark.parametrize("planar", [False, True], ids=["interleaved", "planar"])
def test_a_chunk_of_one_size_at_even_steps_is_resized_from_a_view_of_the_buffer_not_gathered(planar, monkeypatch):
    """A decoder's batch of uniform photos lies at even steps in its buffer: its canvas is a strided view of it,
    the same pixels bit for bit as gathered, without the gather (one index op fewer, and its copy). Sizes that
    differ, or steps that do not, are gathered."""
    import encoder.resize as resize

    rng = np.random.default_rng(6)
    cfg = PreprocessConfig(height=16, width=24)
    uniform = [torch.from_numpy(rng.integers(0, 256, (3, 30, 40), dtype=np.uint8)) for _ in range(5)]
    mixed = [*uniform[:4], torch.from_numpy(rng.integers(0, 256, (3, 31, 40), dtype=np.uint8))]
    gap = _packed(uniform, planar=planar)  # one more image's worth of bytes between the 2nd and the 3rd: uneven
    step = uniform[0].numel()
    gap = PackedImages(torch.cat([gap.buffer, torch.zeros(step, dtype=torch.uint8)]),
                       (0, step, 3 * step, 4 * step, 5 * step), gap.shapes, planar)  # fmt: skip
    gap.buffer[3 * step :] = _packed(uniform, planar=planar).buffer[2 * step :].clone()
    cases = {"uniform": (_packed(uniform, planar=planar), True), "mixed": (_packed(mixed, planar=planar), False),
             "uneven": (gap, False)}  # fmt: skip
    for name, (packed, in_place) in cases.items():
        assert (resize._in_place(packed, range(len(packed))) is not None) == in_place, name
        with_views = resize_like_pil(packed, cfg)
        ops = _aten_ops(lambda p=packed: resize_like_pil(p, cfg))
        with monkeypatch.context() as patched:
            patched.setattr(resize, "_in_place", lambda *args: None)  # gathered whatever the layout
            assert torch.equal(with_views, resize_like_pil(packed, cfg)), name
            assert (_aten_ops(lambda p=packed: resize_like_pil(p, cfg)) > ops) == in_place, name
    separate = resize_like_pil(uniform, cfg, interleaved=False)
    assert (resize_like_pil(cases["uniform"][0], cfg).int() - separate.int()).abs().max() <= 1
    packed = cases["uniform"][0]  # a buffer that is itself a view past the start of its storage: views stay right
    shifted = PackedImages(torch.cat([torch.zeros(5, dtype=torch.uint8), packed.buffer])[5:], packed.offsets,
                           packed.shapes, planar)  # fmt: skip
    assert shifted.buffer.storage_offset() == 5 and all(torch.equal(shifted[k], t) for k, t in enumerate(uniform))
    assert torch.equal(resize_like_pil(shifted, cfg), resize_like_pil(packed, cfg))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_planes_resize_alike_with_the_filters_broadcast_or_the_horizontal_pass_transposed(dtype):
    """`_plane_by_plane`'s two orders of the same products (broadcast over the channels on CUDA, the horizontal pass
    transposed on the CPU): each is every plane's vertical filter · plane · horizontal filter, in (n, h, w, 3)."""
    g = torch.Generator().manual_seed(0)
    n, h, w, height, width = 3, 37, 53, 24, 20
    rows, cols = torch.rand(n, height, h, generator=g), torch.rand(n, w, width, generator=g)
    rows, cols = (
        rows / rows.sum(2, keepdim=True),
        cols / cols.sum(1, keepdim=True),
    )  # as a resize's: values stay in 0-255
    canvas = torch.randint(0, 256, (n, 3, h, w), generator=g).float()
    expected = torch.einsum("nyh,nchw,nwx->nyxc", rows.double(), canvas.double(), cols.double())
    rows, canvas, cols = rows.to(dtype), canvas.to(dtype), cols.to(dtype)
    for broadcast in (True, False, None):  # None: as the device says (the CPU: transposed)
        x = _plane_by_plane(rows, canvas, cols, broadcast)
        assert x.shape == (n, height, width, 3) and x.dtype == dtype
        torch.testing.assert_close(x.double(), expected, rtol=0, atol=0.5 if dtype == torch.float16 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # float16: what CUDA runs
@pytest.mark.parametrize(("resample", "size", "worst"), [(3, 224, 4), (2, 224, 1), (3, 384, 10)])
def test_interleaved_images_resized_as_they_lie_match_pil_and_the_channel_by_channel_path(jpegs, resample, size,
                                                                                          worst, dtype):  # fmt: skip
    """nvImageCodec's (h, w, 3) batches resized without a transposed copy (`interleaved`, the default): the
    vertical pass first, made transposed, so the horizontal one is a plain product. Within PIL's tolerance above,
    and within a level of the channel-by-channel products (in float16 one value in ~70 rounds the other way: the
    intermediate between the passes is another one)."""
    images = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in jpegs] + [np.full((5, 7, 3), 200, np.uint8)]
    cfg = PreprocessConfig(height=size, width=size, resample=resample)
    packed = _packed([torch.from_numpy(i.copy()).permute(2, 0, 1) for i in images])
    ours = resize_like_pil(packed, cfg, chunk=5, dtype=dtype, interleaved=True).numpy()
    channels = resize_like_pil(packed, cfg, chunk=5, dtype=dtype, interleaved=False).numpy()
    pil = np.stack([np.asarray(Image.fromarray(i).resize((size, size), resample)) for i in images])
    diff, apart = np.abs(ours.astype(int) - pil.astype(int)), np.abs(ours.astype(int) - channels.astype(int))
    assert diff.max() <= worst and (diff <= 1).mean() > 0.9999, f"max {diff.max()}, within 1: {(diff <= 1).mean()}"
    assert apart.max() <= 1 and (apart == 0).mean() > 0.97, (apart.max(), (apart == 0).mean())  # float16: 98.4%


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("resample", [3, 2])
def test_a_drafted_resize_is_pils_resize_of_the_image_reduced_as_draft_mode_would(jpegs, resample, dtype):
    """`draft=True`: each full-size image is resized as from its reduction by Pillow's draft scale (a box mean,
    what libjpeg's scaled inverse DCT nearly is), in one batch of scales 1 to 8, odd sides (the far edge's
    pixels cover fewer), every layout; within PIL's rounding between its steps of `Image.reduce`'s then resize."""
    photos = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in jpegs]
    sizes = [(30, 37), (50, 61), (101, 99), (199, 250), (47, 300), (200, 193), (5, 7), (64, 48), (97, 121)]
    images = [np.ascontiguousarray(np.resize(photos[k], (max(h, 200), max(w, 320), 3))[:h, :w])
              for k, (h, w) in enumerate(sizes)]  # fmt: skip
    cfg = PreprocessConfig(height=24, width=24, resample=resample)
    scales = [draft_scale(h, w, cfg) for h, w in sizes]
    assert set(scales) == {1, 2, 4, 8}
    pil = np.stack([np.asarray(Image.fromarray(i).reduce(k).resize((24, 24), resample))
                    for i, k in zip(images, scales, strict=True)]).astype(int)  # fmt: skip
    tensors = [torch.from_numpy(i.copy()).permute(2, 0, 1) for i in images]
    layouts = [(tensors, True), (_packed(tensors, True, True), True), (_packed(tensors, True, False), False),
               (_packed(tensors, True, False), True)]  # fmt: skip
    for images_in, interleaved in layouts:
        ours = resize_like_pil(images_in, cfg, chunk=4, dtype=dtype, interleaved=interleaved, draft=True).numpy()
        diff = np.abs(ours.astype(int) - pil)
        assert diff.max() <= 2 and (diff <= 1).mean() > 0.9999, f"max {diff.max()}, within 1: {(diff <= 1).mean()}"
    undrafted = resize_like_pil(tensors, cfg, chunk=4, dtype=dtype).numpy()
    at_scale_1 = resize_like_pil(tensors[6:7], cfg, dtype=dtype, draft=True).numpy()
    assert np.array_equal(at_scale_1, undrafted[6:7])  # nothing to reduce: the plain resize
    assert np.abs(undrafted.astype(int) - pil).max() > 10  # a reduction changes pixels: the test can tell


def test_gpu_images_resize_near_the_cpu_paths_draft_decode_as_its_limits_say(jpegs):
    """The GPU path decodes at full size; in draft mode (the default) its resize reduces as libjpeg's draft decode
    would, so a JPEG's model input is near the CPU path's whichever path decodes it (README, "Preprocessing")."""
    cfg = PreprocessConfig(height=96, width=96)  # these 320-px photos: 1/2 in draft mode
    gpu, cpu = {}, {}
    for name, limits in (("draft", DecodeLimits()), ("full", FULL)):
        batch = GpuImages(cfg, "cpu", limits, decoder=_pil_decoder()).prepare(jpegs)
        gpu[name] = batch.pixels.numpy().astype(int)
        cpu[name] = np.stack([decode_image(d, cfg, limits) for d in jpegs]).astype(int)
        diff = np.abs(gpu[name] - cpu[name])
        assert batch.on_gpu == len(jpegs) and diff.mean() < 0.5 and np.percentile(diff, 99) <= 3, (name, diff.mean())
    drafted, undrafted = (np.abs(gpu[name] - cpu["draft"]).mean() for name in ("draft", "full"))
    assert undrafted > 2 * drafted, (drafted, undrafted)  # without the reduction: several times as far


def test_pack_images_packs_separate_images_in_one_call_with_room_for_the_windows():
    rng = np.random.default_rng(5)
    sizes = [(30, 40), (50, 20), (1, 1), (400, 60)]
    tensors = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in sizes]
    tensors[1] = tensors[1].permute(0, 2, 1).contiguous().permute(0, 2, 1)  # not contiguous: copied as it reads
    packed = pack_images(tensors)
    assert packed.planar and packed.shapes == tuple(sizes) and packed.windows_fit(60)
    assert all(torch.equal(packed[k], t) for k, t in enumerate(tensors))
    assert packed.buffer.numel() == sum(3 * h * w for h, w in sizes) + 60  # a widest row's room, no more
    assert _aten_ops(lambda: pack_images(tensors * 8)) == _aten_ops(lambda: pack_images(tensors))
    grey = torch.from_numpy(rng.integers(0, 256, (1, 20, 30), dtype=np.uint8))  # a decoder's one-channel image
    packed = pack_images([grey, tensors[0]])
    assert torch.equal(packed[0], grey.expand(3, -1, -1)) and torch.equal(packed[1], tensors[0])


def _aten_ops(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)


def test_a_packed_batch_costs_the_same_ops_however_many_sizes_it_holds():
    """Each op releases and retakes the interpreter lock (and on CUDA is a launch); a copy per image into the
    canvas made a batch of all-different sizes cost ops in proportion to its images."""
    rng = np.random.default_rng(4)
    cfg = PreprocessConfig(height=16, width=16, resample=3)

    def images(n: int) -> list[torch.Tensor]:
        return [torch.from_numpy(rng.integers(0, 256, (3, 20 + k, 30), dtype=np.uint8)) for k in range(n)]

    few, many = images(8), images(48)
    for planar in (False, True):
        packed_few, packed_many = _packed(few, planar=planar), _packed(many, planar=planar)
        packed_few, packed_many = (_aten_ops(lambda b=b: resize_like_pil(b, cfg)) for b in (packed_few, packed_many))
        separate_few, separate_many = (_aten_ops(lambda b=b: resize_like_pil(b, cfg)) for b in (few, many))
        assert packed_many == packed_few < separate_many, (planar, packed_few, packed_many, separate_many)
    packed = [_packed(few), _packed(many)]
    as_rows = [_aten_ops(lambda b=b: resize_like_pil(b, cfg, interleaved=True)) for b in packed]
    assert as_rows[0] == as_rows[1], as_rows  # resized as they lie: as few ops whatever the sizes
    assert separate_many - separate_few >= 40, (separate_few, separate_many)  # at least one more per image


def _weights_every_pair(in_sizes: torch.Tensor, out_size: int, resample: int, length: int) -> torch.Tensor:
    """PIL's coefficients computed for every (output, input) pair and masked to each filter's window: the
    reference the windowed taps (`pil_taps`, laid out by `dense_weights`) must reproduce exactly."""
    from encoder.resize import _FILTERS

    kernel, support = _FILTERS[resample]
    size = in_sizes.to(torch.float64).view(-1, 1, 1)
    scale = size / out_size
    filter_scale = scale.clamp(min=1.0)
    support = support * filter_scale
    centre = (torch.arange(out_size, dtype=torch.float64).view(1, -1, 1) + 0.5) * scale
    x = torch.arange(length, dtype=torch.float64).view(1, 1, -1)
    lo = torch.floor(centre - support + 0.5).clamp(min=0)
    hi = torch.minimum(torch.floor(centre + support + 0.5), size)
    taps = kernel((x - centre + 0.5) / filter_scale) * ((x >= lo) & (x < hi))
    total = taps.sum(dim=-1, keepdim=True)
    return (taps / torch.where(total == 0, 1.0, total)).to(torch.float32)


@pytest.mark.parametrize("resample", [Image.Resampling.BILINEAR, Image.Resampling.BICUBIC])
@pytest.mark.parametrize("out_size", [16, 224, 384])
def test_windowed_weights_equal_the_weights_of_every_pair(resample, out_size):
    sizes = torch.tensor([1, 2, 7, 16, 17, 223, 224, 225, 383, 385, 480, 640, 999, 4001])
    for length in (4001, 4010):  # as long as the largest input, and longer (a padded canvas)
        expected = _weights_every_pair(sizes, out_size, resample, length)
        assert torch.equal(dense_weights(*pil_taps(sizes, out_size, resample, length), length), expected)


@settings(max_examples=80, derandomize=True, deadline=None)
@given(images=st.lists(st.tuples(st.integers(1, 700), st.sampled_from([1, 2, 4, 8])), min_size=1, max_size=5),
       out_size=st.integers(4, 120), resample=st.sampled_from([2, 3]))  # fmt: skip
def test_draft_taps_are_pils_filter_over_the_box_means_of_each_scale(images, out_size, resample):
    """The weights `draft_taps` lays over a full-size row: PIL's filter over the row reduced at its scale (each side
    rounded up), times the box mean that makes each reduced pixel from the up to `scale` pixels it covers."""
    from encoder.resize import draft_taps

    sizes, scales = torch.tensor([s for s, _ in images]), torch.tensor([k for _, k in images])
    reduced = -(-sizes // scales)
    length = int(sizes.max())
    got = dense_weights(*draft_taps(sizes, scales, out_size, resample, int(reduced.max()), int(scales.max())), length)
    for k, (size, scale) in enumerate(images):
        box = torch.zeros(int(reduced[k]), length, dtype=torch.float64)
        for r in range(box.shape[0]):
            covers = range(r * scale, min(size, (r + 1) * scale))
            box[r, covers.start : covers.stop] = 1 / len(covers)
        pil = _weights_every_pair(reduced[k : k + 1], out_size, resample, int(reduced[k]))[0].to(torch.float64)
        torch.testing.assert_close(got[k].to(torch.float64), pil @ box, atol=1e-6, rtol=0)


def test_a_chunk_ends_before_its_canvas_outgrows_the_limit():
    small, large = (10, 10), (100, 100)
    assert _chunks([small] * 5 + [large], 64, 1000) == [(0, 5), (5, 6)]  # 5 small: 500 pixels; with the large one
    assert _chunks([small] * 5 + [large], 2, 10**9) == [(0, 2), (2, 4), (4, 6)]  # at most 2 per chunk
    assert _chunks([large, large], 64, 10) == [(0, 1), (1, 2)]  # over the limit alone: a chunk of its own
    assert _chunks([(10, 50), (20, 10)], 64, 700) == [(0, 1), (1, 2)]  # padded to the tallest and widest: 2 × 20 × 50


def test_one_large_photo_among_small_ones_is_resized_as_if_alone():
    rng = np.random.default_rng(2)
    sizes = [(40, 30)] * 6 + [(400, 300), (41, 30)]
    tensors = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in sizes]
    cfg = PreprocessConfig(height=16, width=16, resample=3)
    alone = torch.cat([resize_like_pil([t], cfg) for t in tensors])
    assert torch.equal(resize_like_pil(tensors, cfg, max_canvas_bytes=3 * 41 * 30 * 7), alone)


def test_every_input_is_kept_in_order_or_failed_with_a_reason(jpegs):
    calls: list[int] = []
    images = GpuImages(CFG, "cpu", FULL, decoder=_pil_decoder(calls))
    corrupt = jpegs[0][:200] + b"\0" * 50 + b"\xff\xd9"  # a JPEG header, garbage, an end: both decoders refuse it
    rejected = jpegs[1][:2] + b"\xff\xfe\x00\x08REJECT" + jpegs[1][2:]  # (a comment) the GPU refuses it, the CPU not
    datas = [jpegs[2], _png(0), corrupt, rejected, jpegs[3], b"", jpegs[4]]
    batch = images.prepare(datas)
    assert batch.kept == [0, 1, 3, 4, 6]
    assert [i for i, _ in batch.failed] == [2, 5]
    assert "corrupt" in dict(batch.failed)[2] and "empty" in dict(batch.failed)[5]
    assert batch.on_gpu == 3 and calls == [5, 2, 3, 1, 2, 1, 1]  # one batched call, then halves down to the culprits
    assert batch.retried  # counted in the run's manifest (`batches.retried`)
    for row, i in enumerate(batch.kept):
        expected = decode_image(datas[i], CFG, FULL)
        close = np.abs(batch.pixels[row].numpy().astype(int) - expected.astype(int)) <= 2
        assert close.mean() > 0.999, f"input {i} differs from the CPU decode"


def test_a_decoders_separate_images_of_several_sizes_are_packed_for_the_resize(jpegs):
    images = GpuImages(CFG, "cpu", FULL, decoder=_pil_decoder())
    mixed = images.decode(jpegs[:6])  # realistic photos: 320 px wide, heights of their own
    assert isinstance(mixed.images, PackedImages) and mixed.images.planar and len(mixed.images) == 6
    separate = pil_decoder()(jpegs[:6], torch.device("cpu"))
    assert all(torch.equal(mixed.images[k], image) for k, image in enumerate(separate))
    assert torch.equal(images.finish(mixed).pixels, resize_like_pil(separate, CFG))
    same = images.decode([jpegs[0]] * 3)  # one size: stacked a chunk at a time, nothing to pack
    assert isinstance(same.images, list) and len(same.images) == 3


def test_a_batch_too_large_to_pack_or_that_fails_to_pack_is_resized_as_it_is(jpegs, monkeypatch, caplog):
    import encoder.gpu_images as gpu_images

    images = GpuImages(CFG, "cpu", FULL, decoder=_pil_decoder())
    expected = images.prepare(jpegs[:6]).pixels
    monkeypatch.setattr(gpu_images, "PACK_MAX_BYTES", 3 * 320 * 100)  # smaller than these photos together
    big = images.decode(jpegs[:6])
    assert isinstance(big.images, list) and torch.equal(images.finish(big).pixels, expected)
    monkeypatch.undo()

    def out_of_memory(_):
        raise RuntimeError("CUDA out of memory. Tried to allocate 9.20 GiB")

    monkeypatch.setattr(gpu_images, "pack_images", out_of_memory)
    with caplog.at_level("WARNING", logger="encoder.gpu_images"):
        failed = images.decode(jpegs[:6])
    assert isinstance(failed.images, list) and torch.equal(images.finish(failed).pixels, expected)
    assert "could not pack a batch of 6" in caplog.text and "out of memory" in caplog.text


def _progressive(data: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, "JPEG", quality=90, progressive=True)
    return buffer.getvalue()


def test_progressive_jpegs_go_to_the_cpu_threads_with_torchvisions_decoder_only(jpegs, monkeypatch):
    import encoder.gpu_images as gpu_images

    calls: list[int] = []
    monkeypatch.setitem(gpu_images.DECODERS, "nvjpeg", lambda device: _pil_decoder(calls))
    datas = [jpegs[0], _progressive(jpegs[1]), jpegs[2], _progressive(jpegs[3])]
    batch = GpuImages(CFG, "cpu", FULL, decoder="nvjpeg").prepare(datas)
    assert batch.kept == [0, 1, 2, 3] and batch.on_gpu == 2 and calls == [2]  # the baseline pair, in one call
    for row, data in enumerate(datas):
        expected = decode_image(data, CFG, FULL)
        assert (np.abs(batch.pixels[row].numpy().astype(int) - expected.astype(int)) <= 2).mean() > 0.999
    assert GpuImages(CFG, "cpu", FULL, decoder=_pil_decoder()).prepare(datas).on_gpu == 4  # one that batches them
    assert batches_progressive("nvimgcodec") and batches_progressive(None) and not batches_progressive("nvjpeg")


def test_a_batch_that_fails_to_resize_is_resized_in_halves_and_only_the_culprit_fails(jpegs, monkeypatch):
    """As when one very large photo leaves too little GPU memory for its batch and for itself."""
    import encoder.gpu_images as gpu_images

    big = Image.open(io.BytesIO(jpegs[1])).resize((700, 500))
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=90)
    resize = gpu_images.resize_like_pil

    def short_of_memory(images, cfg, **kwargs):
        if any(image.shape[-1] == 700 for image in images):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return resize(images, cfg, **kwargs)

    monkeypatch.setattr(gpu_images, "resize_like_pil", short_of_memory)
    datas = [jpegs[0], buffer.getvalue(), jpegs[2], _png(7)]
    batch = GpuImages(CFG, "cpu", FULL, decoder=_pil_decoder()).prepare(datas)
    assert batch.kept == [0, 2, 3] and batch.on_gpu == 3
    assert batch.failed == [(1, "resize failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 GiB")]
    assert batch.retried
    expected = GpuImages(CFG, "cpu", FULL, decoder=_pil_decoder()).prepare([jpegs[0], jpegs[2], _png(7)])
    assert torch.equal(batch.pixels, expected.pixels)
    everything = GpuImages(CFG, "cpu", FULL, decoder=_pil_decoder()).prepare([buffer.getvalue()])
    assert everything.kept == [] and everything.pixels.shape == (0, 224, 224, 3) and len(everything.failed) == 1


def test_a_batch_the_gpu_decoder_fails_whole_is_counted_and_warned_about(jpegs, monkeypatch, caplog):
    """As the model's and the resize's: a run whose every batch the decoder fails (out of memory: a batch of very
    large photos) says so in its manifest and in one warning a minute, not in silence."""
    import encoder.gpu_images as gpu_images
    from encoder.failures import Throttled

    monkeypatch.setattr(gpu_images, "_DECODE_RETRIES", Throttled(gpu_images.log))
    images = GpuImages(CFG, "cpu", FULL, decoder=_pil_decoder())
    assert not images.prepare(jpegs[:4]).retried
    rejected = jpegs[1][:2] + b"\xff\xfe\x00\x08REJECT" + jpegs[1][2:]  # the stand-in GPU decoder raises for it
    with caplog.at_level("WARNING", logger="encoder.gpu_images"):
        batches = [images.prepare([jpegs[0], rejected, jpegs[2]]) for _ in range(3)]
    assert all(batch.retried and batch.kept == [0, 1, 2] for batch in batches)
    [warning] = [r.getMessage() for r in caplog.records]  # one for the three
    assert "the GPU decoder failed a batch of 3 (RuntimeError: nvjpeg: unsupported)" in warning
    assert caplog.records[0].filename == "gpu_images.py"  # where the retry is, not the throttle's module


def _short_of_memory(fn, fits: list[int], calls: list[int]):
    """`fn`, counting each call's batch size, out of GPU memory for a batch of more than `fits[0]`."""

    def call(items, *args, **kwargs):
        calls.append(len(items))
        if len(items) > fits[0]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return fn(items, *args, **kwargs)

    return call


def test_once_the_gpu_decoder_runs_out_of_memory_the_next_batches_go_in_pieces_until_a_whole_one_fits(jpegs):
    """As the model's step: a failed whole attempt (and the allocator emptying its cache) on every batch would
    otherwise follow; the decode threads share what was learned."""
    from encoder.failures import MemoryBackoff

    fits, calls = [4], []
    images = GpuImages(CFG, "cpu", FULL, decoder=_short_of_memory(_pil_decoder(), fits, calls))
    images._decode_backoff = MemoryBackoff(probe_every=2, stage="the GPU decoder")
    expected = GpuImages(CFG, "cpu", FULL, decoder=_pil_decoder()).prepare(jpegs[:8])
    first = images.prepare(jpegs[:8])
    assert calls == [8, 4, 4] and first.retried and first.kept == list(range(8)) and first.on_gpu == 8
    assert torch.equal(first.pixels, expected.pixels) and not first.in_pieces  # in halves, not in pieces
    calls.clear()
    second = images.prepare(jpegs[:8])  # straight to pieces: no whole attempt to fail first
    assert calls == [4, 4] and not second.retried and torch.equal(second.pixels, expected.pixels)
    assert second.in_pieces  # counted with the model's pieces (`batches.in_pieces`)
    calls.clear()
    images.prepare(jpegs[:8])  # a probe is due: whole, fails, in halves
    images.prepare(jpegs[:3])  # short of a piece: at its own size, never a probe
    assert calls == [8, 4, 4, 3]
    fits[0], calls[:] = 8, []
    for _ in range(5):  # a probe every 4th batch now: the next one fits, and batches go whole from then on
        images.prepare(jpegs[:8])
    assert calls == [4, 4, 4, 4, 4, 4, 8, 8], calls
    assert not images._decode_backoff.backing_off and not images.prepare(jpegs[:8]).in_pieces


def test_once_the_resize_runs_out_of_memory_the_next_batches_are_resized_in_pieces(jpegs, monkeypatch):
    import encoder.gpu_images as gpu_images

    calls: list[int] = []
    expected = GpuImages(CFG, "cpu", FULL, decoder=_pil_decoder()).prepare(jpegs[:4])
    monkeypatch.setattr(gpu_images, "resize_like_pil", _short_of_memory(gpu_images.resize_like_pil, [2], calls))
    images = GpuImages(CFG, "cpu", FULL, decoder=_pil_decoder())
    first = images.prepare(jpegs[:4])
    assert calls == [4, 2, 2] and first.retried and first.kept == [0, 1, 2, 3]
    calls.clear()
    second = images.prepare(jpegs[:4])
    assert calls == [2, 2] and not second.retried and torch.equal(second.pixels, expected.pixels)
    assert second.in_pieces and not first.in_pieces
    failing = GpuImages(CFG, "cpu", FULL, decoder=_pil_decoder(calls=[]))
    failing._resize_backoff.failed(4, "RuntimeError: kernel failed")  # not memory: nothing learned
    assert not failing._resize_backoff.backing_off


def test_a_decoder_that_does_not_size_its_batch_gets_only_what_fits_its_limit(jpegs, monkeypatch):
    """As torchvision's nvJPEG is given its batch (`within_budget`): sized from the headers, what is past
    `DECODE_MAX_BYTES` goes to the CPU threads, in its place; a batch that fits is one call as before."""
    import encoder.gpu_images as gpu_images

    calls: list[int] = []
    decoder = gpu_images.within_budget(_pil_decoder(calls))
    sizes = [np.asarray(Image.open(io.BytesIO(data))).nbytes for data in jpegs[:5]]
    monkeypatch.setattr(gpu_images, "DECODE_MAX_BYTES", sizes[0] + sizes[2] + sizes[3] + sizes[4] - 1)
    datas = [jpegs[0], jpegs[1], jpegs[2], _png(3), jpegs[3], jpegs[4]]  # the PNG: the CPU's from the start
    batch = GpuImages(CFG, "cpu", FULL, decoder=decoder).prepare(datas)
    taken = gpu_images.decoded_within([sizes[0], sizes[1], sizes[2], sizes[3], sizes[4]], gpu_images.DECODE_MAX_BYTES)
    assert batch.kept == [0, 1, 2, 3, 4, 5] and batch.failed == [] and calls == [sum(taken)] and sum(taken) < 5
    assert batch.on_gpu == sum(taken)
    for row, data in enumerate(datas):
        close = np.abs(batch.pixels[row].numpy().astype(int) - decode_image(data, CFG, FULL).astype(int)) <= 2
        assert close.mean() > 0.999, row
    calls.clear()
    monkeypatch.setattr(gpu_images, "DECODE_MAX_BYTES", sum(sizes))
    assert GpuImages(CFG, "cpu", FULL, decoder=decoder).prepare(datas).on_gpu == 5 and calls == [5]
    monkeypatch.setattr(gpu_images, "DECODE_MAX_BYTES", 0)
    calls.clear()
    assert GpuImages(CFG, "cpu", FULL, decoder=decoder).prepare(datas).on_gpu == 0 and calls == []


def test_one_gpu_decode_call_takes_a_sixteenth_of_the_gpus_memory_and_at_least_1_gib(monkeypatch):
    import types

    import encoder.gpu_images as gpu_images

    memory = {}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=memory[torch.device(device).index]))  # fmt: skip
    memory.update({0: 143_771 << 20, 1: 81_559 << 20, 2: 16 << 30})  # an H200, an H100 80GB, a 16 GB T4
    limits = [gpu_images.decode_max_bytes(torch.device("cuda", i)) for i in range(3)]
    assert limits == [143_771 << 16, 81_559 << 16, 1 << 30]
    assert limits[0] > 256 * 4000 * 3000 * 3 > limits[1]  # a batch of 12-MP photos whole on the H200, not the H100
    assert gpu_images.decode_max_bytes(torch.device("cpu")) == 1 << 30
    monkeypatch.setattr(gpu_images, "DECODE_MAX_BYTES", 12345)  # set: it, wherever
    assert gpu_images.decode_max_bytes(torch.device("cuda", 0)) == gpu_images.decode_max_bytes("cpu") == 12345


@pytest.mark.parametrize("stage", ["decode", "pack", "resize"])
def test_a_device_error_is_raised_not_dead_lettered(jpegs, monkeypatch, stage):
    import encoder.gpu_images as gpu_images

    def lost(*args, **kwargs):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    decoder = lost if stage == "decode" else _pil_decoder()
    if stage in ("pack", "resize"):
        monkeypatch.setattr(gpu_images, "pack_images" if stage == "pack" else "resize_like_pil", lost)
    with pytest.raises(torch.AcceleratorError):
        GpuImages(CFG, "cpu", FULL, decoder=decoder).prepare(jpegs[:3])


def test_an_all_cpu_or_empty_batch_still_has_the_model_shape():
    images = GpuImages(CFG, "cpu", FULL, decoder=_pil_decoder())
    assert images.prepare([]).pixels.shape == (0, 224, 224, 3)
    batch = images.prepare([_png(1), _png(2)])
    assert batch.pixels.shape == (2, 224, 224, 3) and batch.on_gpu == 0 and batch.kept == [0, 1]


def test_without_a_gpu_decoder_everything_decodes_on_cpu_and_pre_decoded_pixels_pass_through(jpegs):
    images = GpuImages(CFG, "cpu", FULL, decoder=None)
    ready = decode_image(jpegs[1], CFG, FULL)
    batch = images.prepare([jpegs[0], ready, b"junk", _png(3)])
    assert batch.kept == [0, 1, 3] and [i for i, _ in batch.failed] == [2] and batch.on_gpu == 0
    np.testing.assert_array_equal(batch.pixels[0].numpy(), decode_image(jpegs[0], CFG, FULL))
    np.testing.assert_array_equal(batch.pixels[1].numpy(), ready)
    assert images.prepare([ready, ready]).pixels.shape == (2, 224, 224, 3)
    mixed = images.prepare([_png(4), ready])  # decoded here, then pre-decoded: rows stay in input order
    assert mixed.kept == [0, 1]
    np.testing.assert_array_equal(mixed.pixels[0].numpy(), decode_image(_png(4), CFG, FULL))
    np.testing.assert_array_equal(mixed.pixels[1].numpy(), ready)


def test_a_cpu_fallback_that_will_not_finish_is_failed_and_the_batch_goes_on(jpegs, stuck_decode):
    import time

    import encoder.gpu_images as gpu_images

    stuck_decode(gpu_images, _png(5))
    images = GpuImages(CFG, "cpu", FULL, decoder=_pil_decoder(), cpu_threads=2, max_decode_s=0.3)
    start = time.monotonic()
    batch = images.prepare([jpegs[0], _png(5), _png(6)])
    assert time.monotonic() - start < 5
    assert batch.kept == [0, 2] and batch.failed == [(1, "not decoded within 0.3 s")]


def test_filters_the_gpu_cannot_reproduce_are_refused():
    with pytest.raises(ValueError, match="bilinear and bicubic"):
        GpuImages(PreprocessConfig(resample=Image.Resampling.LANCZOS), "cpu")


def test_the_gpu_decoder_gets_views_of_the_bytes_not_copies(jpegs):
    tensors = byte_tensors(jpegs[:3])
    for data, tensor in zip(jpegs[:3], tensors, strict=True):
        assert tensor.dtype == torch.uint8 and tensor.dim() == 1 and tensor.is_contiguous()
        assert tensor.numpy().tobytes() == data
        assert tensor.data_ptr() == np.frombuffer(data, np.uint8).ctypes.data  # the bytes object's own buffer


@pytest.mark.gpu
@pytest.mark.parametrize(("size", "limits"), [(224, FULL), (96, DecodeLimits())], ids=["full-size", "draft"])
@pytest.mark.parametrize("decoder", ["nvjpeg", "nvimgcodec"])
def test_gpu_decoders_match_the_cpu_path(jpegs, decoder, size, limits):
    """Full-size decodes against the CPU's; and, in draft mode, resized through draft mode's reduction (1/2 for
    these 320-px photos at 96 px) against the CPU's draft decode."""
    if decoder == "nvimgcodec":
        pytest.importorskip("nvidia.nvimgcodec")
    cfg = PreprocessConfig(height=size, width=size)
    images = GpuImages(cfg, "cuda", limits, decoder=decoder)
    batch = images.prepare(jpegs)
    assert batch.on_gpu == len(jpegs) and batch.kept == list(range(len(jpegs)))
    cpu = np.stack([decode_image(d, cfg, limits) for d in jpegs]).astype(int)
    diff = np.abs(batch.pixels.cpu().numpy().astype(int) - cpu)
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg's by a level or two here and there.
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4, f"mean {diff.mean():.3f}, p99 {np.percentile(diff, 99)}"


@pytest.mark.gpu
@pytest.mark.parametrize("decoder", ["nvjpeg", "nvimgcodec"])
def test_gpu_decoders_warmed_up_then_closed_decode_as_fresh_ones(jpegs, decoder):
    """The warm-up's made-up batch leaves nothing behind in the decoders (the next real batch's pixels are a fresh
    decoder's, bit for bit), and closing frees nvImageCodec's handles without harm to decoders made later."""
    if decoder == "nvimgcodec":
        pytest.importorskip("nvidia.nvimgcodec")
    fresh = GpuImages(CFG, "cuda", FULL, decoder=decoder).prepare(jpegs).pixels.cpu()
    warmed = GpuImages(CFG, "cuda", FULL, decoder=decoder, decode_threads=2)
    warmed.start_warming(64)
    batch = warmed.prepare(jpegs)  # beside the warm-up, on whichever decoder is free
    warmed.close(in_background=True).join()
    assert warmed.warm_problem is None and warmed.warm_s > 0
    assert batch.on_gpu == len(jpegs) and torch.equal(batch.pixels.cpu(), fresh)
    later = GpuImages(CFG, "cuda", FULL, decoder=decoder)
    later.warm(8)
    assert torch.equal(later.prepare(jpegs).pixels.cpu(), fresh)


@pytest.mark.gpu
def test_the_resize_stage_never_waits_for_the_gpu(jpegs):
    """Resizing a decoded batch only queues work: a synchronisation there would stall the stage behind the model."""
    images = GpuImages(CFG, "cuda", FULL, decoder="nvjpeg")
    images.finish(images.decode(jpegs))  # warm: pinned buffers, kernels, handles
    decoded = images.decode(jpegs)
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = images.finish(decoded)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert batch.kept == list(range(len(jpegs))) and batch.on_gpu == len(jpegs)


def test_a_decoded_batch_names_the_tensors_that_hold_its_pixels():
    buffer = torch.zeros(100, dtype=torch.uint8)
    packed = DecodedBatch(2, [0, 1], PackedImages(buffer, (0, 12), ((2, 2), (2, 2))), [], [], {})
    assert [t.data_ptr() for t in packed.device_tensors()] == [buffer.data_ptr()]  # the buffer, not a view per image
    images = [torch.zeros(3, 2, 2, dtype=torch.uint8), torch.zeros(3, 4, 4, dtype=torch.uint8)]
    separate = DecodedBatch(2, [0, 1], images, [], [], {})
    assert [t is i for t, i in zip(separate.device_tensors(), images, strict=True)] == [True, True]
    assert DecodedBatch(1, [], [], [0], [], {}).device_tensors() == []


def test_a_decoder_with_a_stream_of_its_own_makes_and_holds_its_outputs_apart(monkeypatch):
    """`outputs_held` (for torchvision's nvJPEG), on the CPU with logging stand-ins for CUDA: the decoder runs with
    a stream of its own as the current one, the caller's stream waits for it, and every output is held for the
    caller's stream, so the allocator cannot hand its memory to the next batch while the caller still reads it."""
    cuda = FakeCuda(monkeypatch)

    def decode(datas, device):
        cuda.note(cuda.current(), "decode")
        return [torch.zeros(3, 2, 2, dtype=torch.uint8) for _ in datas]

    held = outputs_held(decode, torch.device("cuda", 0))
    with torch.cuda.stream(cuda.Stream("side")):
        assert len(held([b"a", b"b"], torch.device("cuda", 0))) == 2
    assert [step[1:] for step in cuda.log] == [
        ("stream 1", "decode"),
        ("side", "waits for", "stream 1"),
        ("side", "holds"),
        ("side", "holds"),
    ]
    assert outputs_held(decode, torch.device("cpu")) is decode


def test_a_packed_batch_is_made_apart_and_its_one_buffer_held(monkeypatch):
    """nvImageCodec's packed result through `outputs_held`: decoded on the decoder's own stream, the caller's stream
    waits for it, and the batch's one buffer (not a view per image) is held for the caller's stream."""
    cuda = FakeCuda(monkeypatch)
    buffer = torch.zeros(64, dtype=torch.uint8)
    held_tensors = []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: held_tensors.append(tensor))

    def decode(datas, device):
        cuda.note(cuda.current(), "decode")
        return PackedImages(buffer, (0, 12), ((2, 2), (2, 2))), [0, 2]

    held = outputs_held(decode, torch.device("cuda", 0))
    with torch.cuda.stream(cuda.Stream("side")):
        packed, positions = held([b"a", b"b", b"c"], torch.device("cuda", 0))
    assert positions == [0, 2] and packed.buffer is buffer
    assert [step[1:] for step in cuda.log] == [("stream 1", "decode"), ("side", "waits for", "stream 1")]
    assert [t is buffer for t in held_tensors] == [True]


def test_nvimgcodecs_decodes_are_held(monkeypatch):
    """nvImageCodec's decoder goes through `outputs_held` on CUDA, as nvJPEG's does: its header promises the
    ordering, but the race's `gpu` test failed with it on an H200."""
    import encoder.gpu_images as gpu_images

    wrapped, closed = [], []
    monkeypatch.setattr(gpu_images, "outputs_held", lambda decode, device: wrapped.append(device) or decode)
    monkeypatch.setattr("encoder.nvimgcodec.NvImageCodec",
                        lambda device, **_: SimpleNamespace(close=lambda: closed.append(device)))  # fmt: skip
    decoder = gpu_images.nvimgcodec_decoder(torch.device("cuda", 0))
    assert wrapped == [torch.device("cuda", 0)]
    decoder.close()  # its library handles freed at once, not at a collection
    assert closed == [torch.device("cuda", 0)]


@pytest.mark.gpu
@pytest.mark.parametrize("decoder", ["nvjpeg", "nvimgcodec"])
def test_a_batchs_images_are_not_overwritten_while_its_stream_still_reads_them(jpegs, decoder):
    """The race `outputs_held` closes: a batch's images are freed while a copy of them still waits on a stream
    that has fallen behind, and the next batch, of the same sizes, is decoded at once."""
    from encoder.gpu_images import DECODERS

    if decoder == "nvimgcodec":
        pytest.importorskip("nvidia.nvimgcodec")
    device = torch.device("cuda", torch.cuda.current_device())
    decode = DECODERS[decoder](device)

    def images_of(result) -> list[torch.Tensor]:
        return [result[0][k] for k in range(len(result[0]))] if isinstance(result, tuple) else result

    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpegs[0])).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(buffer, "JPEG", quality=90)
    first, second = [jpegs[0]] * 4, [buffer.getvalue()] * 4
    expected = [image.cpu() for image in images_of(decode(first, device))]
    behind = torch.cuda.Stream(device)
    with torch.cuda.stream(behind):
        result = decode(first, device)
        torch.cuda._sleep(200_000_000)  # the stream falls ~0.1 s behind the host
        copies = [image.clone() for image in images_of(result)]  # queued after the sleep
        del result
        later = decode(second, device)  # same sizes: the freed memory would fit
    torch.cuda.synchronize()
    assert all(torch.equal(copy.cpu(), image) for copy, image in zip(copies, expected, strict=True))
    assert not torch.equal(images_of(later)[0].cpu(), expected[0])  # the second batch differs


@pytest.fixture(scope="module")
def images_by_decoder():
    """One `GpuImages` per (device, decoder), kept across a property test's examples."""
    made: dict[tuple[str, str], GpuImages] = {}

    def get(device: str, decoder: str) -> GpuImages:
        if (device, decoder) not in made:
            made[device, decoder] = GpuImages(CFG, device, FULL, decoder=decoder, cpu_threads=2)
        return made[device, decoder]

    return get


def _damaged_beside_clean(images: GpuImages, damaged: list, clean: list[bytes], alone: dict[str, torch.Tensor]) -> None:
    """Damaged JPEGs that pass the route, then clean ones, in one batch: every input is a row or a dead letter
    with a reason, once; the clean ones come out as they do alone (no damaged neighbour reaches their pixels).
    `alone`: the clean ones decoded alone by each decoder that may take them in the batch; each must match one.
    (nvImageCodec's hardware decoder fails a batch whole when one image fails, and its framework hands every image
    to its CUDA decoder, whose IDCT rounds otherwise: a damaged neighbour moves clean ones to another decoder.)"""
    batch = images.prepare([*damaged, *clean])
    failed = [i for i, _ in batch.failed]
    assert sorted(batch.kept + failed) == list(range(len(damaged) + len(clean)))
    assert all(reason for _, reason in batch.failed) and len(batch.pixels) == len(batch.kept)
    assert all(len(damaged) + j in batch.kept for j in range(len(clean))), (damaged, batch.failed)
    rows = batch.pixels[[batch.kept.index(len(damaged) + j) for j in range(len(clean))]].cpu().int()
    diffs = {name: (rows - pixels.int()).abs() for name, pixels in alone.items()}
    best = torch.stack([min((d[j] for d in diffs.values()), key=lambda d: d.float().mean()) for j in range(len(clean))])
    per_image = {name: [f"{x.float().mean():.3f}/{x.max()}" for x in d] for name, d in diffs.items()}  # mean/max
    assert best.float().mean() < 0.05 and best.max() <= 2, f"clean beside {damaged!r}: mean/max {per_image}"


@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
@pytest.mark.parametrize("decoder", ["pil", "nvimgcodec"])  # nvImageCodec through its CPU backend
def test_damaged_jpegs_are_decoded_or_dead_lettered_and_spare_the_rest_of_the_batch(images_by_decoder, jpegs,
                                                                                     decoder, data):  # fmt: skip
    images = images_by_decoder("cpu", decoder)
    alone = {decoder: images.prepare(jpegs[4:7]).pixels}
    _damaged_beside_clean(images, data.draw(routed_batches(jpegs[:4])), jpegs[4:7], alone)


@pytest.mark.gpu
@pytest.mark.parametrize("decoder", ["nvjpeg", "nvimgcodec"])
def test_damaged_jpegs_on_the_gpu_are_decoded_or_dead_lettered_and_spare_the_rest(images_by_decoder, jpegs,
                                                                                  decoder):  # fmt: skip
    """As above through the GPU's decoders; the device stays usable after each batch."""
    if decoder == "nvimgcodec":
        pytest.importorskip("nvidia.nvimgcodec")
    images = images_by_decoder("cuda", decoder)
    alone = {decoder: images.prepare(jpegs[4:7]).pixels.cpu()}
    if decoder == "nvimgcodec":  # each of its decoders alone: a damaged neighbour may move the batch to another
        device = torch.device("cuda", torch.cuda.current_device())
        kinds = each_kind(
            lambda backends: GpuImages(CFG, device, FULL, decoder=nvimgcodec_decoder(device, backends=backends))
        )
        alone.update({name: kind.prepare(jpegs[4:7]).pixels.cpu() for name, kind in kinds.items()})
        assert "CUDA decoder" in alone

    @settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(routed_batches(jpegs[:4]))
    def check(damaged):
        _damaged_beside_clean(images, damaged, jpegs[4:7], alone)
        torch.cuda.synchronize()

    check()


def _counting_decoders(monkeypatch, hold: threading.Event | None = None, held: threading.Event | None = None):
    """`DECODERS["nvjpeg"]` made to hand out Pillow stand-ins that log (decoder number, batch size) per call and
    count their `close`; with `hold`, a call on the made-up photo waits for it, having set `held`."""
    import encoder.gpu_images as gpu_images

    calls: list[tuple[int, int]] = []
    closed: list[int] = []

    def make(device):
        number, pil = len(made), pil_decoder()
        made.append(number)

        def decode(datas, device):
            if hold is not None and datas[0] is sample_jpeg():
                if held is not None:
                    held.set()
                hold.wait(10)
            calls.append((number, len(datas)))
            return pil(datas, device)

        return ClosingDecoder(decode, lambda: closed.append(number))

    made: list[int] = []
    monkeypatch.setitem(gpu_images.DECODERS, "nvjpeg", make)
    return calls, closed


def test_the_sample_photo_goes_to_the_gpu_decoder_and_compresses_as_a_photo():
    data = sample_jpeg()
    assert cpu_reason(data, 50 << 20, 10**8, progressive=False) is None  # baseline, 3 channels: the GPU decoder's
    image = Image.open(io.BytesIO(data))
    assert image.size == (640, 480) and image.mode == "RGB"
    assert 30_000 < len(data) < 200_000  # about a catalog photo's bytes (~70 KB): neither flat nor noise
    assert sample_jpeg() is data  # made once


def test_warming_decodes_and_resizes_a_made_up_batch_once_on_each_decoder(monkeypatch):
    calls, _ = _counting_decoders(monkeypatch)
    images = GpuImages(CFG, "cpu", FULL, decoder="nvjpeg", decode_threads=2)
    images.warm(5)
    assert sorted(calls) == [(0, 5), (1, 5)]
    calls.clear()
    assert images.prepare([sample_jpeg()] * 3).on_gpu == 3 and len(calls) == 1  # the decoders work on after it


def test_a_batch_during_the_warm_up_waits_only_for_the_decoder_being_warmed(monkeypatch, jpegs):
    hold, held = threading.Event(), threading.Event()
    calls, _ = _counting_decoders(monkeypatch, hold, held)
    images = GpuImages(CFG, "cpu", FULL, decoder="nvjpeg", decode_threads=2)
    images.start_warming(4)
    assert held.wait(10)  # the warm-up's thread has taken a decoder (else the batch could be first to take one)
    try:
        batch = images.prepare(jpegs[:3])  # the warm-up holds decoder 0: this batch takes decoder 1
        assert batch.on_gpu == 3 and calls == [(1, 3)] and images.warm_s is None
    finally:
        hold.set()
    images.close()  # after the warm-up, which then warmed decoder 1 too
    assert sorted(calls) == [(0, 4), (1, 3), (1, 4)] and images.warm_s > 0 and images.warm_problem is None


def test_a_warm_up_that_fails_is_logged_and_kept_and_the_run_goes_on(monkeypatch, jpegs, caplog):
    def decode(datas, device):
        if any(data is sample_jpeg() for data in datas):
            raise RuntimeError("nvjpeg: not this one")
        return pil_decoder()(datas, device)

    images = GpuImages(CFG, "cpu", FULL, decoder=decode, cpu_threads=2)
    images.start_warming(2)
    images.close(in_background=True).join()
    assert "decoded 0 of 2 made-up photos" in images.warm_problem
    assert "warming the GPU decoders up failed" in caplog.text
    again = GpuImages(CFG, "cpu", FULL, decoder=decode, cpu_threads=2)
    again.start_warming(2)
    assert again.prepare(jpegs[:2]).on_gpu == 2  # real batches are not held up by it


def test_closing_frees_each_decoder_once_after_the_warm_up_and_decodes_no_more(monkeypatch, jpegs):
    hold = threading.Event()
    _, closed = _counting_decoders(monkeypatch, hold)
    images = GpuImages(CFG, "cpu", FULL, decoder="nvjpeg", decode_threads=2)
    images.start_warming(2)
    closing = images.close(in_background=True)  # in a thread of its own, not a daemon: exit waits for it
    assert closing.name == "decoder-close" and not closing.daemon
    closing.join(0.2)
    assert closing.is_alive() and closed == []  # waits for the warm-up, which holds a decoder
    hold.set()
    closing.join()
    assert sorted(closed) == [0, 1]
    with pytest.raises(RuntimeError, match="closed"):
        images.prepare(jpegs[:1])
    images.close()
    assert sorted(closed) == [0, 1]  # once each


def test_closing_stops_the_cpu_threads_it_made_but_not_a_pool_it_was_given(jpegs):
    from concurrent.futures import ThreadPoolExecutor

    given = ThreadPoolExecutor(1)
    GpuImages(CFG, "cpu", FULL, cpu_pool=given, decoder=None).close()
    assert given.submit(lambda: 1).result() == 1
    own = GpuImages(CFG, "cpu", FULL, decoder=None)
    own.close()
    with pytest.raises(RuntimeError):
        own._pool.submit(lambda: 1)
