"""The fine-tuning loop end to end on the tiny model: outputs, exact resume, bad input, freezing."""

import json
import os
import re
import signal

import pytest
import torch
from safetensors.torch import load_file

from encoder import EncoderConfig, load_encoder
from training import PairError, ResumeError, TrainingError, TrainingStopped, train
from training import loop as training_loop
from training.checkpoint import latest_checkpoint, list_checkpoints


def _weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(f"{model_dir}/model.safetensors")


_PATCHES = "vision_model.embeddings.patch_embedding.weight"


class _Interrupt(Exception):
    pass


def test_training_writes_encoder_model_metrics_and_curve(train_config, demo_catalog, monkeypatch, caplog):
    cfg = train_config(interactions=str(demo_catalog.interactions))
    swapped = []
    swap = training_loop.patch_embedding_as_matmul
    monkeypatch.setattr(training_loop, "patch_embedding_as_matmul", lambda model: swapped.append(swap(model)))
    monkeypatch.setattr(training_loop, "PROGRESS_S", 0.0)  # stderr is no terminal here: lines instead of bars
    with caplog.at_level("INFO", logger="training.loop"):
        result = train(cfg)
    assert swapped == [True]
    assert re.search(r"checking pairs: \d+, \d+/s$", caplog.text, re.M)
    assert re.search(
        rf"step {result.steps} of {result.steps} \(100%\), epoch 2, loss [\d.]+, \d+ images/s", caplog.text
    )
    out = result.out
    steps_per_epoch = result.counts["train"] // cfg.batch_size
    assert result.steps == 2 * steps_per_epoch > 0
    assert result.counts["skipped_broken_image"] == len(demo_catalog.broken_item_ids)
    assert result.counts["pairs"] + result.counts["skipped_broken_image"] == result.counts["rows"]
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, result.steps + 1))
    epochs = [r for r in rows if "val_recall_at_1" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert {"val_loss", "val_ndcg_at_5"} <= set(epochs[-1])
    assert open(f"{out}/loss_curve.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(f"{out}/train_config.json"))["batch_size"] == 16
    assert json.load(open(f"{out}/report.json"))["model_version"] == result.model_version
    assert not os.path.exists(f"{out}/LOCK")

    encoder = load_encoder(EncoderConfig(model=result.encoder))
    assert encoder.model_version == result.model_version
    assert json.load(open(f"{result.encoder}/lookalike_encoder.json"))["model_version"] == result.model_version
    assert load_encoder(EncoderConfig(model=result.model)).model_version == result.model_version
    assert load_encoder(EncoderConfig(model=cfg.model)).model_version != result.model_version  # it did train
    assert len(list_checkpoints(out)) == cfg.keep_checkpoints
    # The patch embedding trains as one matrix product (`encoder.patch_embedding`) under the checkpoint's names.
    before, after = _weights(cfg.model), _weights(result.model)
    assert before.keys() == after.keys()
    assert not torch.equal(before[_PATCHES], after[_PATCHES])


def _equal_weights(whole, resumed) -> None:
    a, b = _weights(whole.model), _weights(resumed.model)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert resumed.model_version == whole.model_version


def test_interrupted_then_resumed_equals_uninterrupted(train_config, tmp_path, uninterrupted):
    def stop_after_four(step: int) -> None:
        if step == 4:  # one step past the checkpoint at 3: that step is lost and redone
            raise _Interrupt

    cut = train_config(out=str(tmp_path / "cut"))
    with pytest.raises(_Interrupt):
        train(cut, on_step=stop_after_four)
    assert latest_checkpoint(cut.out).step == 3
    resumed = train(train_config(out=str(tmp_path / "cut"), resume=True))
    assert resumed.resumed_from_step == 3 and resumed.steps == uninterrupted.steps
    _equal_weights(uninterrupted, resumed)
    steps = [json.loads(line)["step"] for line in open(f"{cut.out}/metrics.jsonl") if '"loss"' in line]
    assert steps == list(range(1, uninterrupted.steps + 1))  # the lost step's row was dropped, not duplicated


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_the_resume_equals_uninterrupted(
    train_config, tmp_path, caplog, uninterrupted
):
    """A preempted VM, an orchestrator's time limit or `docker stop` sends SIGTERM: the run stopped where it was and
    lost every step since its last checkpoint. Now the step ends, a checkpoint is written, and the exit code is 143."""
    before = signal.getsignal(signal.SIGTERM)
    cut = train_config(out=str(tmp_path / "cut"))
    with pytest.raises(TrainingStopped) as stopped:
        train(cut, on_step=lambda step: step == 4 and os.kill(os.getpid(), signal.SIGTERM))
    assert stopped.value.code == 143
    assert [c.step for c in list_checkpoints(cut.out)] == [3, 4]  # 4: not a checkpoint step, written for the stop
    assert "stopped by SIGTERM after step 4" in caplog.text and "--resume" in caplog.text
    assert signal.getsignal(signal.SIGTERM) == before
    assert not os.path.exists(f"{cut.out}/LOCK")  # released on the way out: a resume elsewhere need not wait
    resumed = train(train_config(out=cut.out, auto_resume=True))  # an orchestrator's retry: the same command
    assert resumed.resumed_from_step == 4
    _equal_weights(uninterrupted, resumed)


def test_a_second_run_on_an_out_in_use_is_refused(train_config):
    """Two runs on one OUT (an orchestrator's retry beside a first attempt still running) wrote over each other's
    checkpoints; the second is now refused before it loads anything."""
    from encoder.run_lock import LockHeld, run_lock

    cfg = train_config()
    with run_lock(cfg.out, "train", ttl_h=1, name="LOCK"), pytest.raises(LockHeld, match="is locked by run train"):
        train(cfg)
    assert not os.path.exists(f"{cfg.out}/checkpoints")


def test_fewer_pairs_than_a_batch_is_a_clear_error(train_config):
    with pytest.raises(PairError, match="fewer than one batch of 512") as raised:
        train(train_config(batch_size=512))
    assert re.search(r"; skipped, e\.g\. \S+: (broken|unreadable) image", str(raised.value)), raised.value  # why


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(train_config, monkeypatch):
    real = training_loop.sigmoid_loss
    calls = []

    def poisoned(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(training_loop, "sigmoid_loss", poisoned)
    cfg = train_config()
    with pytest.raises(TrainingError, match=r"loss is nan at step 4 .*step-00000003 \(step 3\)"):
        train(cfg)
    good = latest_checkpoint(cfg.out)
    assert good.step == 3
    weights = _weights(good.model_dir)
    assert all(torch.isfinite(t).all() for t in weights.values())
    monkeypatch.setattr(training_loop, "sigmoid_loss", real)
    assert train(train_config(resume=True)).resumed_from_step == 3


def test_resume_refuses_other_settings_and_missing_checkpoints(train_config):
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        train(train_config(resume=True))
    train(train_config(epochs=1))
    with pytest.raises(ResumeError, match="already holds checkpoints"):
        train(train_config(epochs=1))
    with pytest.raises(ResumeError, match=r"lr was 0.001, now 0.002; batch_size|batch_size was 16, now 8.*lr was"):
        train(train_config(epochs=1, resume=True, lr=2e-3, batch_size=8))


def test_resume_refuses_another_architecture(train_config, tmp_path, demo_catalog):
    from encoder import TinyModelConfig, init_tiny_model

    other = init_tiny_model(["a red shirt", "blue shoes"], tmp_path / "other", TinyModelConfig(image_size=64, layers=2))
    train(train_config(epochs=1))
    with pytest.raises(ResumeError, match="another architecture"):
        train(train_config(epochs=1, resume=True, model=str(other)))


def test_an_image_encoder_alone_cannot_be_trained(train_config):
    first = train(train_config(epochs=1))
    with pytest.raises(ValueError, match="training needs a two-tower SigLIP"):
        train(train_config(model=first.encoder, out=first.out + "-2"))


def test_frozen_parts_do_not_move(train_config, tiny_model):
    result = train(train_config(epochs=1, freeze_text=True, freeze_vision_layers=2))
    before, after = _weights(tiny_model), _weights(result.model)
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved, "nothing trained"
    assert not {n for n in moved if n.startswith("text_model.")}
    assert not {n for n in moved if n.startswith(("vision_model.embeddings", "vision_model.encoder.layers.0.",
                                                  "vision_model.encoder.layers.1."))}  # fmt: skip
    assert any(n.startswith("vision_model.encoder.layers.3.") for n in moved)
    assert {"logit_scale", "logit_bias"} & moved


def test_images_decoded_once_in_memory_train_exactly_like_decoding_every_step(train_config, tmp_path):
    cached = train(train_config(out=str(tmp_path / "cached"), epochs=1))
    streamed = train(train_config(out=str(tmp_path / "streamed"), epochs=1, cache_mb=0, workers=1))
    a, b = _weights(cached.model), _weights(streamed.model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
