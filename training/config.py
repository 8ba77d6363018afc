"""What a fine-tuning run does, as one typed config saved beside its outputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from encoder.storage import cache_dir, check_location

__all__ = ["TrainConfig", "RESUME_KEYS"]

# Fields that decide which batches are seen in which order and how each updates the
# weights: a checkpoint resumes exactly only if these are the same. The rest (workers,
# logging, checkpoint cadence, devices, the number of processes) may change on resume.
RESUME_KEYS = (
    "epochs", "batch_size", "lr", "weight_decay", "warmup_fraction", "grad_clip", "freeze_text",
    "freeze_vision_layers", "augment", "val_fraction", "max_text_tokens", "seed",
)  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """How catalog image–title pairs fine-tune a SigLIP checkpoint with the sigmoid loss."""

    catalog: str  # manifest with item_id, image_uri, title (local or gs://)
    model: str  # two-tower SigLIP: Hub id, local or gs:// directory
    out: str  # local or gs:// folder for checkpoints, metrics and the exported encoder (training.outputs)
    interactions: str | None = None  # logs for item-to-item nDCG@5 at each validation
    epochs: int = 5
    batch_size: int = 256  # global: summed over processes; the sigmoid loss sees all of it
    lr: float = 1e-5  # fine-tuning a pretrained checkpoint; a random init wants ~5e-4
    weight_decay: float = 0.05  # AdamW, on matrices only (not biases, norms, logit scale/bias)
    warmup_fraction: float = 0.05  # linear warmup over this share of the steps, then cosine to 0
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    freeze_text: bool = False  # train the image tower only (and the logit scale and bias)
    freeze_vision_layers: int = 0  # keep patch embedding and the lowest N vision layers fixed
    augment: bool = True  # random resized crop (85–100% side) and horizontal flip
    val_fraction: float = 0.05  # held-out items, chosen by a hash of item_id (stable across runs)
    max_val_items: int = 5000  # cap on held-out items (validation embeds them each epoch)
    eval_items: int = 20000  # items ranked for the nDCG@5 validation (judged items first)
    max_text_tokens: int | None = None  # default: the text tower's position count
    checkpoint_every: int = 500  # steps; every epoch end also checkpoints
    keep_checkpoints: int = 2  # older ones are deleted once a newer one is complete
    log_every: int = 10  # steps between metrics.jsonl rows
    cache_mb: int = 2048  # keep decoded training images in memory when they fit: decode once, not every epoch
    workers: int | None = None  # data-loading processes per training process; None: cores per process - 1 (max 16)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (torchrun: cuda:LOCAL_RANK)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the two towers (CUDA)
    seed: int = 0
    resume: bool = False  # continue from the latest checkpoint in `out`
    auto_resume: bool = False  # continue from it if there is one, else start: one command for a run and its retries
    cache_dir: str = field(default_factory=lambda: cache_dir("models"))  # gs:// checkpoints (encoder.storage)

    def __post_init__(self) -> None:
        rules = {
            "epochs": (self.epochs >= 1, ">= 1"),
            "batch_size": (self.batch_size >= 2, ">= 2 (the loss needs negatives)"),
            "lr": (self.lr > 0, "> 0"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "warmup_fraction": (0 <= self.warmup_fraction < 1, "in [0, 1)"),
            "grad_clip": (self.grad_clip >= 0, ">= 0"),
            "freeze_vision_layers": (self.freeze_vision_layers >= 0, ">= 0"),
            "val_fraction": (0 < self.val_fraction < 1, "in (0, 1)"),
            "max_val_items": (self.max_val_items >= 2, ">= 2"),
            "eval_items": (self.eval_items >= 2, ">= 2"),
            "max_text_tokens": (self.max_text_tokens is None or self.max_text_tokens >= 2, ">= 2"),
            "checkpoint_every": (self.checkpoint_every >= 1, ">= 1"),
            "keep_checkpoints": (self.keep_checkpoints >= 1, ">= 1"),
            "log_every": (self.log_every >= 1, ">= 1"),
            "cache_mb": (self.cache_mb >= 0, ">= 0"),
            "workers": (self.workers is None or self.workers >= 0, ">= 0"),
            "precision": (self.precision in ("auto", "fp32", "bf16"), "auto, fp32 or bf16"),
            "device": (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                       "auto, cpu, cuda or cuda:N"),
        }  # fmt: skip
        for name, (ok, requirement) in rules.items():
            if not ok:
                raise ValueError(f"{name} must be {requirement}, got {getattr(self, name)!r}")
        for name in ("catalog", "model", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required")
        check_location(self.out, "out")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
