"""How far each decode path's model input lies from the CPU path's, in draft mode and without.

    python benchmarks/draft_parity.py [--images 300] [--sizes 96,224,384] [--json F]

The CPU path decodes JPEGs in draft mode by default (libjpeg's scaled inverse DCT at 1/2, 1/4 or
1/8, whichever still covers the model's input); the GPU decoders decode at full size, and the GPU
resize (`encoder.resize.resize_like_pil`, in float16 as on CUDA) then reduces each photo as draft
mode would (`draft_taps`) unless `--no-draft` is set. For each model input size, on realistic
640-px JPEGs (quality 90) from scikit-image's photos, this compares with the CPU path's draft
decode (the default):

- the CPU path with `--no-draft` (README's draft table);
- a full-size decode resized without the reduction (the GPU path before it);
- a full-size decode resized through the reduction (the GPU path in draft mode).

Pillow's full-size decode stands in for the GPU decoders (nvJPEG's IDCT differs from libjpeg's by
a level here and there: the `gpu` tests bound it). Differences in uint8 levels and in normalised
units (× 2/255, the model's input range of 2). CPU only: half a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import level_diff, machine, realistic_jpegs  # noqa: E402
from encoder.preprocess import DecodeLimits, PreprocessConfig, decode_image, draft_scale  # noqa: E402
from encoder.resize import resize_like_pil  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--sizes", default="96,224,384", help="model input sizes (square)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        datas = [p.read_bytes() for p in realistic_jpegs(Path(tmp), args.images)]
    full = [torch.from_numpy(np.asarray(Image.open(io.BytesIO(d)).convert("RGB")).copy()).permute(2, 0, 1)
            for d in datas]  # fmt: skip
    results: dict = {"machine": machine(), "photos": f"{len(datas)} JPEGs, 640 px wide, quality 90", "sizes": {}}
    for size in (int(s) for s in args.sizes.split(",")):
        cfg = PreprocessConfig(height=size, width=size)
        cpu_draft = np.stack([decode_image(d, cfg, DecodeLimits()) for d in datas])
        scales = [draft_scale(int(t.shape[1]), int(t.shape[2]), cfg) for t in full]
        rows = {
            "cpu, --no-draft": np.stack([decode_image(d, cfg, DecodeLimits(draft=False)) for d in datas]),
            "gpu resize of a full-size decode, not reduced": resize_like_pil(full, cfg, dtype=torch.float16).numpy(),
            "gpu resize of a full-size decode, reduced as draft mode": resize_like_pil(
                full, cfg, dtype=torch.float16, draft=True
            ).numpy(),
        }
        results["sizes"][size] = {
            "draft_scales": {f"1/{k}": scales.count(k) for k in sorted(set(scales))},
            **{name: level_diff(pixels, cpu_draft) for name, pixels in rows.items()},
        }
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nagainst the CPU path's draft decode (the default); {results['photos']}; {results['machine']}")
    print(
        "| input | draft scales | model input from | mean (levels) | p99 | max | mean (normalised) | max (normalised) |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for size, found in results["sizes"].items():
        scales = ", ".join(f"{k}: {v}" for k, v in found["draft_scales"].items())
        for name, d in ((k, v) for k, v in found.items() if k != "draft_scales"):
            print(f"| {size} px | {scales} | {name} | {d['mean_levels']:.3f} | {d['p99_levels']} | {d['max_levels']} |"
                  f" {d['mean_normalised']:.4f} | {d['max_normalised']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
