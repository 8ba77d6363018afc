"""Fine-tuning throughput: one training step (both towers, sigmoid loss, AdamW) in images/s.

    python benchmarks/train_bench.py                # CPU: the tiny models, compute alone and with the data loader
    python benchmarks/train_bench.py --gpu          # CUDA: SigLIP base/16-224 config, 64 text tokens, batch 256
    python benchmarks/train_bench.py --smoke        # seconds on the CPU: checks the script itself

Measured in one process on the same inputs: (a) the step as a user first writes it
(fp32, eager attention); (b) lookalike's step (SDPA; bf16 autocast on CUDA; the patch
embedding as one matrix product), and on CUDA (b) with the patch embedding as the
checkpoint's convolution, as before; (c) on CUDA, (b) + torch.compile (compile time
printed apart); (d) `lookalike train` end to end, with its data loader decoding and
augmenting real-photo JPEGs (~640 px) every step, and (CPU) with the images decoded once
into memory (`--cache-mb`). Peak GPU memory per path on CUDA. Results go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import images_per_s, machine, print_table, realistic_jpegs, scratch_dir  # noqa: E402
from encoder.loss import sigmoid_loss  # noqa: E402
from encoder.tiny import TinyModelConfig, init_tiny_model  # noqa: E402

_WORDS = "red blue green round square tall wide mug bottle vase lamp chair clock striped dotted matte glossy".split()
CPU_MODELS = {  # name → tiny config; the first is the demo's, chosen in README "Fine-tuning"
    "tiny 32 px (demo)": TinyModelConfig(image_size=32, patch_size=4, width=64, layers=3, heads=2, max_text_tokens=16),
    "tiny 96 px (default)": TinyModelConfig(max_text_tokens=16),
}
SMOKE = {"smoke 32 px": TinyModelConfig(image_size=32, patch_size=16, width=32, layers=1, heads=2, max_text_tokens=8)}


def _titles(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=5)) for _ in range(n)]


def _base_checkpoint(folder: Path) -> Path:
    """SigLIP base/16-224's shape (random init; same FLOPs), 64 text tokens, with a small tokenizer."""
    from transformers import AutoTokenizer, SiglipConfig, SiglipImageProcessorPil, SiglipModel

    tiny = init_tiny_model(_titles(200), folder / "tok", TinyModelConfig(max_text_tokens=64))
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    tower = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    config = SiglipConfig(
        text_config=dict(tower, vocab_size=32000, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                         bos_token_id=None, projection_size=768),
        vision_config=dict(tower, image_size=224, patch_size=16),
    )  # fmt: skip
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    SiglipImageProcessorPil(size={"height": 224, "width": 224}).save_pretrained(folder / "base")
    return folder / "base"


def _step_rate(path: Path, batch: int, seconds: float, device: torch.device, *, attention: str, bf16: bool,
               compile: bool = False, patches_as_matmul: bool = False) -> tuple[float, float]:  # fmt: skip
    """Images/s and peak GPU GiB of forward + backward + AdamW on fixed tensors (compute alone).
    `patches_as_matmul`: the patch embedding as one matrix product, as `lookalike train` runs it."""
    from transformers import SiglipModel

    from encoder.model import read_preprocess
    from encoder.patch_embedding import patch_embedding_as_matmul
    from training.towers import TwoTower

    model = SiglipModel.from_pretrained(path, attn_implementation=attention).to(device).train()
    if patches_as_matmul:
        patch_embedding_as_matmul(model)
    net = TwoTower(model, read_preprocess(path))
    forward = torch.compile(net) if compile else net
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    size, tokens = model.config.vision_config.image_size, model.config.text_config.max_position_embeddings
    pixels = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
    ids = torch.randint(2, model.config.text_config.vocab_size, (batch, tokens), device=device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step() -> None:
        with autocast():
            image, text = forward(pixels, ids)
        loss = sigmoid_loss(image, text, model.logit_scale, model.logit_bias)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    step()  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if compile:
        print(f"torch.compile warm-up (2 steps): {time.perf_counter() - start:.1f} s")
    rate = images_per_s(step, batch, seconds, device, warmup=0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return rate, peak


def _train_rate(path: Path, images: list[Path], batch: int, epochs: int, workers: int, device: str,
                compile: bool, cache_mb: int) -> float:  # fmt: skip
    """`lookalike train` end to end (data loader, decode + augmentation, checkpoints off the clock)."""
    from training import TrainConfig, train

    folder = scratch_dir("lookalike-train-bench-")
    pq.write_table(pa.table({"item_id": [p.stem for p in images], "image_uri": [str(p) for p in images],
                             "title": _titles(len(images), seed=1)}), folder / "manifest.parquet")  # fmt: skip
    cfg = TrainConfig(catalog=str(folder / "manifest.parquet"), model=str(path), out=str(folder / "out"),
                      epochs=epochs, batch_size=batch, lr=1e-4, val_fraction=0.01, max_val_items=64,
                      checkpoint_every=10**9, workers=workers, device=device, compile=compile,
                      cache_mb=cache_mb)  # fmt: skip
    return train(cfg).images_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="SigLIP base/16-224 on CUDA")
    parser.add_argument("--smoke", action="store_true", help="a tiny config on the CPU, a second per path")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 64 on the CPU")
    parser.add_argument("--images", type=int, default=None, help="JPEGs for the end-to-end run")
    parser.add_argument("--workers", type=int, default=None, help="data-loader processes (default: cores - 1, >= 1)")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        sys.exit("error: --gpu needs CUDA")
    device = torch.device("cuda" if args.gpu else "cpu")
    batch = args.batch_size or (256 if args.gpu else 16 if args.smoke else 64)
    seconds = 1.0 if args.smoke else args.seconds
    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) - 1)
    count = args.images or (batch * 2 if args.smoke else batch * 20)
    folder = scratch_dir("lookalike-train-bench-")
    images = realistic_jpegs(folder / "jpegs", count)
    print(f"device: {torch.cuda.get_device_name() if args.gpu else machine()}; torch {torch.__version__}; "
          f"batch {batch}; {count} JPEGs for the end-to-end run; {workers} loader worker(s)")  # fmt: skip

    if args.gpu:
        models = {"SigLIP base/16-224, 64 tokens": _base_checkpoint(folder)}
    else:
        models = {name: init_tiny_model(_titles(200), folder / f"m{i}", cfg)
                  for i, (name, cfg) in enumerate((SMOKE if args.smoke else CPU_MODELS).items())}  # fmt: skip
    for name, path in models.items():
        results: dict[str, float] = {}
        peaks: dict[str, float] = {}
        paths = [("fp32, eager attention", dict(attention="eager", bf16=False))]
        paths.append(("lookalike step (bf16 + SDPA)" if args.gpu else "lookalike step (fp32 + SDPA)",
                      dict(attention="sdpa", bf16=args.gpu, patches_as_matmul=True)))  # fmt: skip
        if args.gpu:  # the convolution's row eager: a second compile would cost another minute of the lease
            paths += [("lookalike step (bf16 + SDPA), the patch embedding as a convolution (before)",
                       dict(attention="sdpa", bf16=True)),
                      ("lookalike step (bf16 + SDPA + torch.compile)",
                       dict(attention="sdpa", bf16=True, compile=True, patches_as_matmul=True))]  # fmt: skip
        for label, options in paths:
            results[label], peaks[label] = _step_rate(path, batch, seconds, device, **options)
            print(f"{label}: {results[label]:,.0f} images/s", flush=True)  # as it lands: a cut-short run says how far
        epochs = 1 if args.smoke else 2
        ends = [(f"lookalike train end to end, JPEGs decoded every step ({workers} loader workers)", args.gpu, 0)]
        if not args.gpu:  # a catalog this size fits in memory: decoded once, augmented every step
            ends.append(("lookalike train end to end, decoded once into memory", False, 2048))
        for label, compile_, cache_mb in ends:
            results[label] = _train_rate(path, images, batch, epochs, workers, device.type, compile_, cache_mb)
            print(f"{label}: {results[label]:,.0f} images/s", flush=True)
        print(f"\n### {name}\n")
        print_table(results, baseline="fp32 eager")
        if args.gpu:
            print("\npeak GPU memory (compute-only paths): " + ", ".join(f"{k} {v:.1f} GiB" for k, v in peaks.items()))


if __name__ == "__main__":
    main()
