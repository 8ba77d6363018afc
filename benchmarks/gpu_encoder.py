"""Encoder throughput on one GPU: SigLIP base/16-224 (random init, same FLOPs as the real one).

    python benchmarks/gpu_encoder.py [--batch-size 256] [--seconds 10]
    python benchmarks/gpu_encoder.py --smoke       # tiny config on the CPU: checks the script itself

Same process, same inputs: (a) transformers fp32 with eager attention, what a user
writes first; (b) lookalike's ImageEncoder (bf16 + SDPA, uint8 batches normalised
on the device); (c) the same with torch.compile (compile time reported apart).
Target for (b)/(c): >= 10,000 images/s on an H100. Results go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import images_per_s, machine, print_table  # noqa: E402
from encoder import EncoderConfig, load_encoder  # noqa: E402

BASE = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16
)
SMOKE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16
)


def _checkpoint(folder: Path, shape: dict) -> Path:
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**shape)).save_pretrained(folder)
    size = shape["image_size"]
    SiglipImageProcessorPil(size={"height": size, "width": size}).save_pretrained(folder)
    return folder


def _eager_rate(folder: Path, batch: int, size: int, seconds: float, device: torch.device) -> float:
    from transformers import SiglipVisionModel

    eager = SiglipVisionModel.from_pretrained(folder, attn_implementation="eager").to(device).eval()
    pixels = torch.randn(batch, 3, size, size, device=device)
    with torch.inference_mode():
        return images_per_s(lambda: eager(pixel_values=pixels).pooler_output, batch, seconds, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--smoke", action="store_true", help="tiny config on the CPU, a second per path")
    args = parser.parse_args()
    shape, device_name = (SMOKE, "cpu") if args.smoke else (BASE, "cuda")
    if device_name == "cuda" and not torch.cuda.is_available():
        sys.exit("error: needs CUDA (or pass --smoke)")
    seconds = 1.0 if args.smoke else args.seconds
    device = torch.device(device_name)
    folder = _checkpoint(Path(tempfile.mkdtemp(prefix="lookalike-gpu-bench-")), shape)
    size, batch = shape["image_size"], args.batch_size
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else machine()
    print(f"device: {gpu}; torch {torch.__version__}; batch {batch}; {size} px")

    uint8 = np.random.default_rng(0).integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
    results: dict[str, float] = {}

    results["transformers fp32, eager attention"] = _eager_rate(folder, batch, size, seconds, device)

    dtype = "float32" if args.smoke else "bfloat16"
    ours = load_encoder(EncoderConfig(model=str(folder), device=device_name, dtype=dtype, batch_size=batch))
    results[f"lookalike ImageEncoder ({dtype} + SDPA, uint8 in)"] = images_per_s(
        lambda: ours.embed_prepared(uint8), batch, seconds, device
    )
    if not args.smoke:
        compiled = load_encoder(EncoderConfig(model=str(folder), device=device_name, batch_size=batch, compile=True))
        start = time.perf_counter()
        compiled.embed_prepared(uint8)
        torch.cuda.synchronize()
        print(f"torch.compile first call: {time.perf_counter() - start:.1f} s")
        results["lookalike ImageEncoder (bf16 + SDPA + torch.compile)"] = images_per_s(
            lambda: compiled.embed_prepared(uint8), batch, seconds, device
        )

    print_table(results, baseline="fp32 eager")


if __name__ == "__main__":
    main()
