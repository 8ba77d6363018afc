"""Training from and into gs://, against the GCS emulator: the model, catalog and images read from a bucket; the
outputs copied to one as they complete (`training.outputs`), and a run stopped on one machine resumed on another."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from encoder import EncoderConfig, load_encoder, storage
from tests.conftest import upload_dir
from training import ResumeError, train
from training import outputs as outputs_module
from training.outputs import Outputs, OutputsError

pytestmark = pytest.mark.gcs


class _Interrupt(Exception):
    pass


def test_train_from_gcs(gcs_emulator, gcs_bucket, demo_catalog, tiny_model, train_config, tmp_path):
    catalog = upload_dir(gcs_emulator, demo_catalog.root, gcs_bucket, "catalog")
    model = upload_dir(gcs_emulator, tiny_model, gcs_bucket, "models/tiny")
    cfg = train_config(catalog=f"{catalog}/manifest.parquet", model=model, epochs=1, workers=1,
                       cache_dir=str(tmp_path / "cache"))  # fmt: skip
    result = train(cfg)
    assert result.counts["skipped_broken_image"] == len(demo_catalog.broken_item_ids)
    assert result.counts["pairs"] == 100 - len(demo_catalog.broken_item_ids)
    assert result.steps > 0
    assert load_encoder(EncoderConfig(model=result.encoder)).model_version == result.model_version


def _names(client, bucket: str, prefix: str) -> list[str]:
    return sorted(b.name[len(prefix) + 1 :] for b in client.list_blobs(bucket, prefix=f"{prefix}/"))


def test_training_into_gcs_stopped_then_resumed_on_another_machine_equals_uninterrupted(
    gcs_emulator, gcs_bucket, train_config, tmp_path, monkeypatch, uninterrupted
):
    whole = uninterrupted
    out = f"gs://{gcs_bucket}/runs/cut"

    def stop_after_four(step: int) -> None:
        if step == 4:  # one step past the checkpoint at 3
            raise _Interrupt

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "machine-a"))
    with pytest.raises(_Interrupt):
        train(train_config(out=out), on_step=stop_after_four)
    kept = _names(gcs_emulator, gcs_bucket, "runs/cut")
    assert "checkpoints/step-00000003/trainer.json" in kept and "pairs.parquet" in kept, kept
    assert "LOCK" not in kept  # released by the stopped run: the next machine need not wait for it
    with pytest.raises(ResumeError, match=f"{out} already holds checkpoints"):  # a new run may not write over it
        train(train_config(out=out))

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "machine-b"))  # nothing of the run on this machine
    resumed = train(train_config(out=out, resume=True))
    assert resumed.resumed_from_step == 3 and resumed.steps == whole.steps
    assert resumed.out == out and resumed.encoder == f"{out}/encoder" and resumed.model == f"{out}/model"
    kept = _names(gcs_emulator, gcs_bucket, "runs/cut")
    assert not [n for n in kept if "partial" in n or ".tmp-" in n or n == "LOCK"], kept
    assert len({n.split("/")[1] for n in kept if n.startswith("checkpoints/")}) == 2  # keep_checkpoints
    assert {"report.json", "metrics.jsonl", "loss_curve.png", "train_config.json", "encoder/lookalike_encoder.json",
            "model/model.safetensors"} <= set(kept)  # fmt: skip
    rows = [json.loads(line) for line in storage.read_bytes(f"{out}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, whole.steps + 1))  # machine a's rows went on

    a = load_file(f"{whole.model}/model.safetensors")
    b = load_file(str(_fetched(tmp_path, out, "model/model.safetensors")))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert load_encoder(EncoderConfig(model=resumed.encoder)).model_version == whole.model_version


def _fetched(tmp_path, out: str, relative: str):
    local = tmp_path / "fetched" / relative
    storage.download_file(f"{out}/{relative}", local)
    return local


def _checkpoint(root, step: int, payload: bytes = b"w" * 3000) -> None:
    folder = root / "checkpoints" / f"step-{step:08d}"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.safetensors").write_bytes(payload)
    (folder / "model" / "config.json").write_text("{}")
    (folder / "trainer.json").write_text(json.dumps({"step": step}))


def test_copies_send_marks_last_delete_what_the_folder_dropped_and_retry_what_failed(
    gcs_emulator, gcs_bucket, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    out = f"gs://{gcs_bucket}/run"
    bucket = gcs_emulator.bucket(gcs_bucket)
    bucket.blob("run/notes.txt").upload_from_string(b"the user's")
    bucket.blob("run/model/weights.bin").upload_from_string(b"another's model in a shared prefix")
    bucket.blob("run/checkpoints/step-00000009/model/model.safetensors").upload_from_string(b"a copy cut short")
    monkeypatch.setattr(outputs_module, "SLOW_COPY_S", 0.0)
    outputs = Outputs(out)
    outputs.prepare(resume=False, main=True)
    sent = []
    upload, write = storage.upload_file, storage.write_bytes
    monkeypatch.setattr(storage, "upload_file", lambda local, uri: (sent.append(uri), upload(local, uri)))
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: (sent.append(uri), write(uri, data)))

    _checkpoint(outputs.local, 1, payload=b"w" * (2 << 20))  # past the size read ahead: uploaded from its file
    (outputs.local / "metrics.jsonl").write_text('{"step": 1}\n')
    outputs.sync()
    outputs.wait()
    model = f"{out}/checkpoints/step-00000001/model"
    assert sent.index(f"{model}/model.safetensors") < sent.index(f"{model}/config.json")  # a model's mark after it
    assert sent[-1] == f"{out}/checkpoints/step-00000001/trainer.json", sent  # and the checkpoint's after all
    assert len(sent) == 4

    sent.clear()
    (outputs.local / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    _checkpoint(outputs.local, 2)
    failed = []

    def fail_once(local, uri):
        if not failed:
            failed.append(uri)
            raise ConnectionError("reset")
        sent.append(uri)
        upload(local, uri)

    monkeypatch.setattr(storage, "upload_file", fail_once)
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: fail_once(None, uri) if not failed else
                        (sent.append(uri), write(uri, data)))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="training.outputs"):
        outputs.sync()
        outputs.wait()
    assert "the next checkpoint's copy sends what this one missed" in caplog.text
    assert "training waited" in caplog.text  # SLOW_COPY_S is 0 here: every wait is said
    shutil.rmtree(outputs.local / "checkpoints" / "step-00000001")  # keep_checkpoints dropped it
    outputs.sync()
    outputs.wait()
    assert failed[0] in sent  # the failed file went with the next copy
    kept = _names(gcs_emulator, gcs_bucket, "run")
    assert kept == ["checkpoints/step-00000002/model/config.json", "checkpoints/step-00000002/model/model.safetensors",
                    "checkpoints/step-00000002/trainer.json", "metrics.jsonl", "model/weights.bin",
                    "notes.txt"]  # fmt: skip
    assert storage.read_bytes(f"{out}/metrics.jsonl").count(b"\n") == 2

    def down(*_) -> None:
        raise ConnectionError("down")

    monkeypatch.setattr(storage, "upload_file", down)
    monkeypatch.setattr(storage, "write_bytes", down)
    (outputs.local / "report.json").write_text("{}")
    with pytest.raises(OutputsError, match=f"they are whole in {outputs.local}"):
        outputs.finish()
    outputs.close()


def test_resume_brings_only_whole_checkpoints_and_sends_nothing_it_brought(
    gcs_emulator, gcs_bucket, tmp_path, monkeypatch
):
    out = f"gs://{gcs_bucket}/run"
    source = tmp_path / "source"
    _checkpoint(source, 3)
    _checkpoint(source, 5)
    (source / "checkpoints" / "step-00000005" / "trainer.json").unlink()  # a copy cut short: not a checkpoint
    (source / "pairs.parquet").write_bytes(b"pairs")
    (source / "metrics.jsonl").write_text('{"step": 3}\n')
    upload_dir(gcs_emulator, source, gcs_bucket, "run")

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    outputs = Outputs(out)
    outputs.prepare(resume=True, main=True)
    here = sorted(p.relative_to(outputs.local).as_posix() for p in outputs.local.rglob("*") if p.is_file())
    assert here == ["checkpoints/step-00000003/model/config.json", "checkpoints/step-00000003/model/model.safetensors",
                    "checkpoints/step-00000003/trainer.json", "metrics.jsonl", "pairs.parquet"]  # fmt: skip
    sent = []
    monkeypatch.setattr(storage, "upload_file", lambda local, uri: sent.append(uri))
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: sent.append(uri))
    outputs.sync()
    outputs.wait()
    assert sent == []
    outputs.close()

    again = Outputs(out)  # the same machine, a later process: what it holds and OUT holds alike is not sent again
    again.prepare(resume=True, main=True)
    again.sync()
    again.wait()
    assert sent == []
    again.close()
    with pytest.raises(ResumeError, match="already holds checkpoints"):
        Outputs(out).prepare(resume=False, main=False)
    assert Outputs(out).prepare(resume=None, main=False) is True  # --auto-resume: OUT holds a checkpoint
    assert Outputs(f"gs://{gcs_bucket}/elsewhere").prepare(resume=None, main=False) is False
