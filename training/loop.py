"""The fine-tuning loop: SigLIP's two towers trained with the sigmoid loss on catalog pairs.

One process or many (`torchrun`): every process reads its slice of each global batch,
text features are exchanged for the loss (`distributed_sigmoid_loss`), DDP averages
gradients. Rank 0 alone validates, checkpoints, logs and exports; the others wait.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from encoder.loss import distributed_sigmoid_loss, sigmoid_loss
from encoder.model import quiet_transformers, read_preprocess, resolve_checkpoint
from encoder.patch_embedding import patch_embedding_as_matmul
from encoder.preprocess import PreprocessConfig
from encoder.run_lock import LockHeld, run_lock
from encoder.throttled import progress as progress_of
from training import checkpoint as ckpt
from training.config import TrainConfig
from training.data import EpochBatches, PairDataset, augment_size, decode_all, steps_per_epoch
from training.distributed import Dist, start_distributed
from training.export import export_model
from training.outputs import Outputs
from training.pairs import PairError, Pairs, collect_pairs, read_pairs, write_pairs
from training.plot import draw_loss_curve
from training.towers import TwoTower, autocast_for, freeze, lr_factor, make_optimizer
from training.validate import embed_pairs, item_ndcg, pair_metrics

__all__ = ["TrainResult", "TrainingError", "TrainingStopped", "train"]

log = logging.getLogger(__name__)

_PREPROCESSOR_FILES = ("preprocessor_config.json",)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient); the message names the last good checkpoint."""


class TrainingStopped(SystemExit):
    """SIGTERM stopped the run after its step and a checkpoint (exit code 143); `--resume` goes on from it."""


class _Stop:
    """SIGTERM (a VM's preemption notice, an orchestrator's time limit, `docker stop`) asks the loop to stop after
    its step, with a checkpoint, instead of dying mid-step and losing the steps since the last one. A second SIGTERM
    acts as it would have without the run. Only the main thread may set a handler: elsewhere, nothing is caught."""

    def __init__(self) -> None:
        self.asked = False
        self._previous = None
        self._here = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> _Stop:
        if self._here:
            self._previous = signal.signal(signal.SIGTERM, self._asked)
        return self

    def _asked(self, signum, frame) -> None:
        self.asked = True
        signal.signal(signal.SIGTERM, self._previous)

    def __exit__(self, *exc) -> None:
        if self._here:
            signal.signal(signal.SIGTERM, self._previous)


PROGRESS_S = 60.0  # where no progress bar is drawn (stderr not a terminal: an orchestrator's log), a line this often
LOCK_TTL_H = 1 / 6  # a dead run's lock on OUT expires within 10 minutes (a live one moves it every 2.5)


@contextlib.contextmanager
def _locked(out: str, dist: Dist):
    """One training run per OUT (`OUT/LOCK`, `encoder.run_lock`): two runs on one OUT (an orchestrator's retry
    beside a first attempt still running) wrote over each other's checkpoints, and on gs:// each copy deleted the
    other's. Rank 0 holds it; every rank learns whether it could."""
    with contextlib.ExitStack() as stack:
        held = None
        if dist.main:
            try:
                stack.enter_context(run_lock(out, "train", LOCK_TTL_H, name="LOCK"))
            except LockHeld as err:
                held = err
        if int(dist.sum(torch.tensor(int(held is not None)))):
            raise held or LockHeld(f"{out}: rank 0 could not take the run's lock")
        yield


def _keep_running_on_sigterm(worker_id: int) -> None:
    """Data-loading processes: a SIGTERM sent to the whole process group (a VM shutting down) must not kill them
    under the loop's last step; they end with the loop."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@dataclass
class TrainResult:
    """What a finished run produced and measured."""

    out: str
    steps: int
    epochs: int
    seconds: float
    images_per_s: float  # training steps only (not validation or checkpoints)
    counts: dict[str, int]
    validation: dict[str, float]  # the last epoch's
    encoder: str
    model: str
    model_version: str
    resumed_from_step: int | None = None
    history: list[dict] = field(default_factory=list)  # one row per epoch


def _load_source(cfg: TrainConfig, dist: Dist) -> Path:
    from transformers import AutoConfig

    if dist.main:  # one download into the shared cache, then everyone reads it
        source = resolve_checkpoint(cfg.model, cfg.cache_dir)
    dist.barrier()
    if not dist.main:
        source = resolve_checkpoint(cfg.model, cfg.cache_dir)
    with quiet_transformers():
        model_type = AutoConfig.from_pretrained(source, trust_remote_code=False).model_type
    if model_type != "siglip":
        raise ValueError(f"{cfg.model} is a {model_type!r} checkpoint; training needs a two-tower SigLIP "
                         "(an image encoder alone has no text tower; use the OUT/model of a training run)")  # fmt: skip
    return source


def _architecture(source: Path) -> str:
    from transformers import SiglipConfig, SiglipModel

    with torch.device("meta"), quiet_transformers():
        return ckpt.architecture_of(SiglipModel(SiglipConfig.from_pretrained(source)))


def _pairs(cfg: TrainConfig, dist: Dist, preprocess: PreprocessConfig, out: Path) -> Pairs:
    path = out / "pairs.parquet"
    if cfg.resume and path.is_file():
        return read_pairs(str(path))
    if dist.main:
        with progress_of(log, "checking pairs", unit="img", every_s=PROGRESS_S) as checked:
            pairs = collect_pairs(cfg.catalog, preprocess, val_fraction=cfg.val_fraction,
                                  max_val_items=cfg.max_val_items, progress=checked)  # fmt: skip
        write_pairs(pairs, str(path))
    dist.barrier()
    return pairs if dist.main else read_pairs(str(path))


def _tokenize(tokenizer, titles: list[str], length: int) -> np.ndarray:
    encoded = tokenizer(titles, padding="max_length", truncation=True, max_length=length,
                        return_attention_mask=False)  # fmt: skip
    return np.asarray(encoded["input_ids"], dtype=np.int64)


class _Metrics:
    """metrics.jsonl: appended by rank 0; a resumed run first drops rows past its checkpoint."""

    def __init__(self, path: Path, keep_through_step: int | None) -> None:
        self.path = path
        self.rows: list[dict] = []
        if keep_through_step is not None and path.is_file():
            self.rows = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= keep_through_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self, path: Path) -> None:
        train = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.rows if "val_loss" in r]
        draw_loss_curve(train, val, path)


def train(cfg: TrainConfig, on_step=None) -> TrainResult:
    """Fine-tune `cfg.model` on the catalog's image–title pairs; export the image encoder.

    Args:
        on_step: optional callable(step) after every optimizer step (rank 0 and others).

    Raises:
        PairError: no usable pairs, or fewer than one global batch.
        ResumeError: nothing to resume, or a checkpoint made with other settings.
        TrainingError: the loss or gradient became non-finite.
        ValueError, FileNotFoundError: a bad --model or option.
    """
    dist, device = start_distributed(cfg)
    outputs = Outputs(cfg.out)
    try:
        with _Stop() as stop, _locked(cfg.out, dist):
            return _Run(cfg, dist, device, outputs, stop).run(on_step)
    finally:
        outputs.close()
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class _Run:
    """One call of `train`: set-up in __init__, the epochs in `run`."""

    def __init__(self, cfg: TrainConfig, dist: Dist, device: torch.device, outputs: Outputs, stop: _Stop) -> None:
        from transformers import AutoTokenizer, SiglipModel

        # --auto-resume: resume where OUT holds a checkpoint; from here on, `cfg.resume` says whether this run does.
        resume = outputs.prepare(True if cfg.resume else None if cfg.auto_resume else False, dist.main)
        cfg = replace(cfg, resume=resume)
        self.cfg, self.dist, self.device, self.outputs, self.stop = cfg, dist, device, outputs, stop
        self.out = outputs.local  # where the loop writes; `outputs` copies it to a gs:// --out
        if dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        latest = ckpt.latest_checkpoint(self.out)
        if cfg.resume and latest is None:
            raise ckpt.ResumeError(f"--resume: no complete checkpoint under {cfg.out.rstrip('/')}/checkpoints")
        if not cfg.resume and latest is not None:
            raise ckpt.ResumeError(f"{cfg.out} already holds checkpoints (latest: step {latest.step}); "
                                   "pass --resume to continue that run, or choose an empty --out")  # fmt: skip
        source = _load_source(cfg, dist)
        self.judgments = self._judgments()  # a bad --interactions fails now, not after checking every image
        self.preprocess = read_preprocess(source)
        self.preprocessor_files = [source / name for name in _PREPROCESSOR_FILES]
        with quiet_transformers():
            self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.pairs = _pairs(cfg, dist, self.preprocess, self.out)
        self.train_pairs, self.val_pairs = self.pairs.split("train"), self.pairs.split("val")
        if self.train_pairs.num_rows < cfg.batch_size:
            skipped = "; ".join(f"{e['item_id']}: {e['reason']}" for e in self.pairs.skipped_examples[:3])
            raise PairError(
                f"{self.train_pairs.num_rows} usable training pair(s) is fewer than one batch of {cfg.batch_size}; "
                f"lower --batch-size or add items (counts: {self.pairs.counts})"
                + (f"; skipped, e.g. {skipped}" if skipped else "")
            )
        self.architecture = _architecture(source)
        with quiet_transformers():
            model = SiglipModel.from_pretrained(latest.model_dir if cfg.resume else source, use_safetensors=True,
                                                attn_implementation="sdpa")  # fmt: skip
        patch_embedding_as_matmul(model)  # as the encoder embeds: one GEMM, same parameters and state dict
        freeze(model, cfg)
        self.model = model.to(device).train()
        self.length = cfg.max_text_tokens or int(model.config.text_config.max_position_embeddings)
        if self.length > model.config.text_config.max_position_embeddings:
            raise ValueError(f"max_text_tokens={self.length} exceeds the text tower's "
                             f"{model.config.text_config.max_position_embeddings} positions")  # fmt: skip
        self.net = TwoTower(self.model, self.preprocess)
        forward = torch.compile(self.net) if cfg.compile else self.net
        if dist.world > 1:
            forward = torch.nn.parallel.DistributedDataParallel(
                forward, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.forward = forward
        self.autocast = autocast_for(cfg, device)
        # JPEG decoding, not the model, limits a GPU step: leave one core per process for the loop itself.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.workers = cfg.workers if cfg.workers is not None else max(1, min(16, cores // dist.world - 1))
        self.steps_per_epoch = steps_per_epoch(self.train_pairs.num_rows, cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        warmup = int(self.total_steps * cfg.warmup_fraction)
        self.optimizer = make_optimizer(self.model, cfg, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup, self.total_steps)
        )
        self.step, self.unreadable, self.resumed_from, self.checkpointed = 0, 0, None, None
        if cfg.resume:
            ckpt.check_resumable(latest, cfg, self.pairs.digest, self.architecture, outputs.uri_of(latest.path))
            self._restore(latest)
        uris = self.train_pairs.column("image_uri")
        self.train_data = PairDataset(
            uris, _tokenize(self.tokenizer, self.train_pairs.column("title").to_pylist(), self.length),
            self.preprocess, decoded=self._decode_once(uris),
        )  # fmt: skip
        if dist.main:
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
        self.metrics = _Metrics(self.out / "metrics.jsonl", self.step if cfg.resume else None) if dist.main else None

    def _decode_once(self, uris: pa.ChunkedArray) -> np.ndarray | None:
        """All training images decoded up front when they fit in `cache_mb` (same pixels as decoding each time)."""
        size = augment_size(self.preprocess)
        need_mb = len(uris) * size.height * size.width * 3 / 2**20
        if not self.cfg.augment or need_mb > self.cfg.cache_mb:
            return None
        start = time.perf_counter()
        try:
            decoded = decode_all(uris.to_pylist(), self.preprocess)
        except Exception as err:  # noqa: BLE001 - the loader decodes per step instead, replacing what fails
            log.warning("not caching decoded images (%s: %s); decoding every step instead", type(err).__name__, err)
            return None
        log.info("decoded %d training images into memory once (%.0f MB, %.1f s)", len(uris), need_mb,
                 time.perf_counter() - start)  # fmt: skip
        return decoded

    def _restore(self, latest: ckpt.Checkpoint) -> None:
        state = ckpt.load_state(latest, self.outputs.uri_of(latest.path))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError) as err:
            raise ckpt.ResumeError(f"optimizer state in {latest.path} does not fit this model: {err}") from err
        ckpt.set_rng_state(state["rng"])
        self.step, self.unreadable, self.resumed_from = latest.step, int(state.get("unreadable", 0)), latest.step
        log.info("resuming from %s (step %d of %d)", self.outputs.uri_of(latest.path), self.step, self.total_steps)

    def _judgments(self):
        if not (self.cfg.interactions and self.dist.main):
            return None
        from evaluation.logs import read_judgments

        return read_judgments(self.cfg.interactions)

    def _loader(self, dataset: PairDataset, batch_sampler) -> torch.utils.data.DataLoader:
        workers = self.workers
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers else None, worker_init_fn=_keep_running_on_sigterm if workers else None,
        )  # fmt: skip

    # -- the epochs -----------------------------------------------------------------------

    def run(self, on_step) -> TrainResult:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="training",
                   disable=not (self.dist.main and sys.stderr.isatty()))  # fmt: skip
        with logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext(), bar:
            return self._epochs(bar, on_step)

    def _epochs(self, bar, on_step) -> TrainResult:
        cfg, dist = self.cfg, self.dist
        started, train_seconds, trained_steps = time.perf_counter(), 0.0, 0
        history: list[dict] = []
        validation: dict[str, float] = {}
        window_start, window_steps = time.perf_counter(), 0
        said, said_step = time.perf_counter(), self.step  # without a bar, a line every PROGRESS_S for the log
        for epoch in range(self.step // self.steps_per_epoch, cfg.epochs):
            batches = EpochBatches(self.train_pairs.num_rows, cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                   rank=dist.rank, world=dist.world, start_step=self.step % self.steps_per_epoch,
                                   augment=cfg.augment)  # fmt: skip
            tick = time.perf_counter()
            for pixels, input_ids, replaced in self._loader(self.train_data, batches):
                loss, grad_norm, lr = self._step(pixels, input_ids, epoch)
                self.unreadable += int(replaced.sum())
                self.step += 1
                trained_steps += 1
                window_steps += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    rate = window_steps * cfg.batch_size / max(now - window_start, 1e-9)
                    window_start, window_steps = now, 0
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:,.0f}")
                    self._log({"step": self.step, "epoch": epoch + 1, "loss": loss, "lr": lr,
                               "grad_norm": grad_norm, "images_per_s": rate, **self._logit_params()})  # fmt: skip
                if bar.disable and dist.main and time.perf_counter() - said >= PROGRESS_S:
                    now = time.perf_counter()
                    log.info("step %d of %d (%.0f%%), epoch %d, loss %.4f, %.0f images/s", self.step, self.total_steps,
                             100 * self.step / self.total_steps, epoch + 1, loss,
                             (self.step - said_step) * cfg.batch_size / max(now - said, 1e-9))  # fmt: skip
                    said, said_step = now, self.step
                if self.step % cfg.checkpoint_every == 0 and self.step % self.steps_per_epoch:
                    self._checkpoint()
                if on_step:
                    on_step(self.step)
                if self._stop_asked():
                    self._stopped(epoch)
            train_seconds += time.perf_counter() - tick
            validation = self._validate()
            row = {"step": self.step, "epoch": epoch + 1, **validation}
            history.append(row)
            self._log(row)
            if dist.main and validation:
                log.info(
                    "epoch %d/%d: %s", epoch + 1, cfg.epochs, ", ".join(f"{k} {v:.4f}" for k, v in validation.items())
                )
            self._checkpoint()
            if self.step < self.total_steps and self._stop_asked():  # (asked during validation)
                self._stopped(epoch)
            window_start = time.perf_counter()  # images/s counts training steps, not validation
        return self._finish(started, train_seconds, trained_steps, validation, history)

    def _logit_params(self) -> dict[str, float]:
        return {"logit_scale": float(self.model.logit_scale.exp()), "logit_bias": float(self.model.logit_bias)}

    def _step(self, pixels: torch.Tensor, input_ids: torch.Tensor, epoch: int) -> tuple[float, float, float]:
        pixels = pixels.to(self.device, non_blocking=True)
        input_ids = input_ids.to(self.device, non_blocking=True)
        with self.autocast():
            image, text = self.forward(pixels, input_ids)
        scale, bias = self.model.logit_scale, self.model.logit_bias
        if self.dist.world > 1:
            share = distributed_sigmoid_loss(image, text, scale, bias)
            loss_value = self.dist.sum(share.detach())
            loss = share * self.dist.world  # DDP averages gradients over ranks; the global loss is the sum
        else:
            loss = sigmoid_loss(image, text, scale, bias)
            loss_value = loss.detach()
        value = float(loss_value)
        if not math.isfinite(value):
            self._diverged(f"loss is {value}", epoch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip or float("inf")))
        if not math.isfinite(grad_norm):
            self._diverged(f"gradient norm is {grad_norm}", epoch)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        self.optimizer.step()
        self.scheduler.step()
        return value, grad_norm, lr

    def _diverged(self, what: str, epoch: int) -> None:
        last = ckpt.latest_checkpoint(self.out)
        where = (
            f"{self.outputs.uri_of(last.path)} (step {last.step})" if last else "none yet (no checkpoint was written)"
        )
        raise TrainingError(
            f"{what} at step {self.step + 1} (epoch {epoch + 1}); stopped before updating the weights. "
            f"Last good checkpoint: {where}. Check the data, or lower --lr / raise --warmup-fraction "
            "in a new --out (--resume keeps the original settings)."
        )

    def _stop_asked(self) -> bool:
        """Whether any process got a SIGTERM: all of them stop after the same step."""
        if self.dist.world == 1:
            return self.stop.asked
        return bool(self.dist.sum(torch.tensor(int(self.stop.asked))))

    def _stopped(self, epoch: int) -> None:
        if self.checkpointed != self.step:
            self._checkpoint()
        if self.dist.main:
            self.outputs.wait(final=True)
            last = self.outputs.uri_of(ckpt.latest_checkpoint(self.out).path)
            log.warning("stopped by SIGTERM after step %d of %d (epoch %d): checkpoint %s; the same command with "
                        "--resume or --auto-resume goes on from it", self.step, self.total_steps, epoch + 1,
                        last)  # fmt: skip
        raise TrainingStopped(128 + signal.SIGTERM)

    def _log(self, row: dict) -> None:
        if self.metrics is not None:
            self.metrics.add(row)

    # -- rank 0's side jobs -----------------------------------------------------------------

    def _validate(self) -> dict[str, float]:
        if not self.dist.main:
            self.dist.barrier()
            return {}
        self.model.eval()
        try:
            results = self._validate_pairs()
            results.update(self._validate_items())
        finally:
            self.model.train()
        self.dist.barrier()
        return results

    def _eval_loader(self, uris: list[str], titles: list[str] | None) -> torch.utils.data.DataLoader:
        ids = _tokenize(self.tokenizer, titles, self.length) if titles else np.zeros((len(uris), 1), np.int64)
        dataset = PairDataset(uris, ids, self.preprocess)
        batch = max(1, min(256, self.cfg.batch_size))
        chunks = [list(range(i, min(i + batch, len(uris)))) for i in range(0, len(uris), batch)]
        return self._loader(dataset, chunks)

    def _validate_pairs(self) -> dict[str, float]:
        if self.val_pairs.num_rows < 2:
            return {}
        titles = self.val_pairs.column("title").to_pylist()
        loader = self._eval_loader(self.val_pairs.column("image_uri").to_pylist(), titles)
        images, texts = embed_pairs(self.net, loader, self.device, self.autocast)
        params = self._logit_params()
        return pair_metrics(images, texts, titles, math.log(params["logit_scale"]), params["logit_bias"])

    def _validate_items(self) -> dict[str, float]:
        if self.judgments is None:
            return {}
        ids = self.pairs.table.column("item_id").to_pylist()
        uris = self.pairs.table.column("image_uri").to_pylist()
        judged = pc.is_in(pa.array(ids, pa.large_string()), value_set=self.judgments.items()).to_pylist()
        order = sorted(range(len(ids)), key=lambda i: not judged[i])[: self.cfg.eval_items]
        loader = self._eval_loader([uris[i] for i in order], None)
        images, _ = embed_pairs(self.net, loader, self.device, self.autocast, texts=False)
        return item_ndcg([ids[i] for i in order], images, self.judgments)

    def _checkpoint(self) -> None:
        unreadable = int(self.dist.sum(torch.tensor(self.unreadable)))
        if self.dist.main:
            self.outputs.wait()  # the last checkpoint's copy, before keep_checkpoints deletes any of its files
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "rng": ckpt.rng_state(), "unreadable": unreadable}  # fmt: skip
            info = ckpt.resume_info(self.cfg, self.pairs.digest, self.architecture)
            ckpt.save_checkpoint(self.out, self.step, self.model, self.tokenizer,
                                               self.preprocessor_files, state, info, self.cfg.keep_checkpoints)  # fmt: skip
            self.metrics.plot(self.out / "loss_curve.png")
            self.outputs.sync()
        self.checkpointed = self.step
        self.dist.barrier()

    def _finish(self, started: float, train_seconds: float, trained_steps: int, validation: dict,
                history: list[dict]) -> TrainResult:  # fmt: skip
        cfg = self.cfg
        counts = {**self.pairs.counts, "unreadable_during_training": int(self.dist.sum(torch.tensor(self.unreadable)))}
        exported = {"encoder": "", "model": "", "model_version": ""}
        if self.dist.main:
            latest = ckpt.latest_checkpoint(self.out)
            info = {"base_model": cfg.model, "step": self.step, "epochs": cfg.epochs, "validation": validation}
            exported = export_model(latest.model_dir, self.out, self.preprocess, info)
            exported |= {name: self.outputs.uri_of(exported[name]) for name in ("encoder", "model")}
        self.dist.barrier()
        seconds = time.perf_counter() - started
        result = TrainResult(
            out=cfg.out, steps=self.step, epochs=cfg.epochs, seconds=seconds,
            images_per_s=trained_steps * cfg.batch_size / train_seconds if train_seconds else 0.0,
            counts=counts, validation=validation, resumed_from_step=self.resumed_from, history=history,
            **exported,
        )  # fmt: skip
        if self.dist.main:
            (self.out / "report.json").write_text(json.dumps(asdict(result), indent=2, sort_keys=True))
            self.outputs.finish()
        return result
