"""Shared fixtures: offline environment, a small demo catalog, the tiny model, a GCS emulator."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from benchmarks.common import free_port

__all__ = ["free_port", "upload_dir"]

# Offline and quiet before anything imports huggingface_hub or google-auth.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["NO_GCE_CHECK"] = "true"
os.environ["GCE_METADATA_HOST"] = "127.0.0.1:9"  # discard port: nothing answers, nothing leaves the machine
os.environ["GCE_METADATA_IP"] = "127.0.0.1:9"
os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
# Without a GPU, Triton's kernels (encoder/resize_kernel.py) run through its interpreter, which it reads when
# `triton.language` is first imported (torch.compile imports it too): so here, before any test runs.
if not any(Path("/dev").glob("nvidia[0-9]*")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

CATALOG_ITEMS = 100  # enough for every broken-image kind (one per 20 items) and every odd format


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """With LOOKALIKE_FAILURES_LOG set, each failure's report is appended there as it happens (long lines cut), so
    a run stopped at its time limit, as a leased GPU's steps are, still tells why its tests failed."""
    path = os.environ.get("LOOKALIKE_FAILURES_LOG")
    if not path or not report.failed:
        return
    lines = [line if len(line) <= 300 else f"{line[:300]} … ({len(line):,} characters)"
             for line in report.longreprtext.splitlines()]  # fmt: skip
    with open(path, "a") as log:
        log.write(f"=== {report.nodeid} ({report.when})\n" + "\n".join(lines[-200:]) + "\n")


@pytest.fixture(scope="session", autouse=True)
def _gpu_journals(tmp_path_factory):
    """The GPU decoder's journals (`encoder.decode_journal`) in the session's temporary folder, not the user's."""
    os.environ["LOOKALIKE_GPU_JOURNALS"] = str(tmp_path_factory.mktemp("gpu-journals"))


@pytest.fixture(scope="session", autouse=True)
def _caches(tmp_path_factory):
    """The model and snapshot caches (`encoder.storage.cache_dir`) in the session's temporary folder, not the user's:
    checkpoints downloaded from the emulator and the models' versions remembered on disk."""
    os.environ["LOOKALIKE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _fresh_object_reads():
    """Each test's object-store reads start without latencies from earlier tests' reads: a test that counts requests
    sees second requests only where it has made reads to hedge at (`pipelines.hedged_reads`)."""
    import pipelines.file_reader as file_reader

    yield
    with file_reader._OBJECT_READS_LOCK:
        reads, file_reader._OBJECT_READS = file_reader._OBJECT_READS, None
    if reads is not None:
        reads.close()


@pytest.fixture(scope="session")
def demo_catalog(tmp_path_factory):
    from pipelines.demo_catalog import make_demo_catalog

    return make_demo_catalog(tmp_path_factory.mktemp("catalog"), items=CATALOG_ITEMS, seed=7)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, demo_catalog) -> Path:
    import pyarrow.parquet as pq

    from encoder import TinyModelConfig, init_tiny_model

    titles = pq.read_table(demo_catalog.manifest, columns=["title"]).column("title").to_pylist()
    return init_tiny_model(titles, tmp_path_factory.mktemp("model"), TinyModelConfig(image_size=64))


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model):
    from encoder import EncoderConfig, load_encoder

    return load_encoder(EncoderConfig(model=str(tiny_model), device="cpu"))


@pytest.fixture(scope="session")
def gcs_emulator():
    """A GCS emulator on a free local port for the session; yields a storage client."""
    from tests.support.gcs_emulator import start_emulator  # its server package loads only where a test needs it

    proc, port = start_emulator()
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    try:
        from encoder.storage import gcs_client
        from pipelines.storage import configure_storage

        configure_storage()
        yield gcs_client()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous


@pytest.fixture
def gcs_bucket(gcs_emulator, request):
    """A fresh bucket per test; yields its name."""
    tag = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]  # parametrised tests share a prefix
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-") + "-" + tag
    gcs_emulator.create_bucket(name)
    return name


def upload_dir(client, local: Path, bucket: str, prefix: str) -> str:
    """Copy a local directory tree to gs://bucket/prefix; returns that URI."""
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.bucket(bucket).blob(f"{prefix}/{path.relative_to(local).as_posix()}").upload_from_filename(str(path))
    return f"gs://{bucket}/{prefix}"


@pytest.fixture
def stuck_decode(monkeypatch):
    """`stuck_decode(module, data)`: `module.decode_on_cpu` hangs on `data` (a decoder stuck on one hostile image)
    until the test ends."""
    import threading

    release = threading.Event()

    def patch(module, stuck: bytes) -> None:
        real = module.decode_on_cpu

        def decode(data, cfg, limits):
            if data == stuck:
                release.wait(30)
            return real(data, cfg, limits)

        monkeypatch.setattr(module, "decode_on_cpu", decode)

    yield patch
    release.set()


@pytest.fixture
def unrun_pipeline():
    """`unrun_pipeline(options)`: a Beam pipeline a test builds but never runs. Beam makes a scratch folder for each
    pipeline and removes it only in `run`; this removes it when the test ends."""
    import shutil

    import apache_beam as beam

    made = []

    def make(options=None):
        made.append(beam.Pipeline(options=options))
        return made[-1]

    yield make
    for pipeline in made:
        shutil.rmtree(pipeline.local_tempdir, ignore_errors=True)
