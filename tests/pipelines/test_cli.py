"""The `lookalike` command line as a new user runs it, in a subprocess like a shell would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def _lookalike(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lookalike")
    return subprocess.run(
        [str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=os.environ.copy()
    )


@pytest.mark.slow
def test_new_user_walkthrough(tmp_path):
    made = _lookalike("demo-catalog", "--out", "D", "--items", "40", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert "wrote 40 items (2 deliberately broken)" in made.stdout

    model = _lookalike(
        "init-model", "--catalog", "D/manifest.parquet", "--out", "M", "--image-size", "64", cwd=tmp_path
    )
    assert model.returncode == 0, model.stderr
    assert (tmp_path / "M" / "model.safetensors").is_file()

    first = _lookalike("embed", "--catalog", "D/manifest.parquet", "--model", "M", "--out", "E", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "items in = embedded + reused + dead-lettered: 40 = 38 + 0 + 2" in first.stdout
    assert re.search(
        r"of which[ │]+prepare [\d.]+ s · pipeline [\d.]+ s · accounting [\d.]+ s · model load [\d.]+ s · fetch set-up "
        r"[\d.]+ s · embed set-up [\d.]+ s",
        first.stdout,
    )
    runs = list((tmp_path / "E" / "embeddings").iterdir())
    assert len(runs) == 1 and (runs[0] / "_manifest.json").is_file()
    assert list((tmp_path / "E" / "failures" / runs[0].name).glob("*.parquet"))

    second = _lookalike("embed", "--catalog", "D/manifest.parquet", "--model", "M", "--out", "E", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "40 = 0 + 38 + 2" in second.stdout


def test_beam_flags_pass_through_and_ours_reach_the_run(tmp_path, demo_catalog, tiny_model):
    result = _lookalike(
        "embed", "--catalog", str(demo_catalog.manifest), "--model", str(tiny_model), "--out", "E",
        "--run-id", "passthrough", "--no-hedge-reads", "--no-page-lock-reads", "--direct_num_workers=1",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "E" / "embeddings" / "passthrough" / "_manifest.json").read_text())
    assert manifest["beam_args"] == ["--direct_num_workers=1"]
    assert manifest["options"]["hedge_reads"] is False  # lookalike's own flags are not Beam's
    assert manifest["options"]["page_lock_reads"] is False
    assert manifest["object_store_reads"] == {"reads": 0, "second_requests": 0, "second_requests_used": 0}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["embed", "--catalog", "nope.parquet", "--model", "M", "--out", "E"], "nope.parquet does not exist"),
        (["embed", "--catalog", "m.txt", "--model", "M", "--out", "E"], "unknown manifest format"),
        (["embed", "--catalog", "dupes.csv", "--model", "M", "--out", "E"], "duplicate item_id"),
        (["embed", "--catalog", "dupes.csv", "--model", "M", "--out", "E", "--batch-size", "0"], "batch_size must be"),
        (["init-model", "--catalog", "nope.parquet", "--out", "M"], "does not exist"),
        (["index", "--bogus"], "No such option: --bogus"),
    ],
    ids=["missing-manifest", "unknown-format", "duplicates", "bad-option", "init-missing", "unknown-option"],
)
def test_user_mistakes_get_one_clear_line(tmp_path, args, message):
    (tmp_path / "dupes.csv").write_text("item_id,image_uri\na,x.jpg\na,y.jpg\n")
    result = _lookalike(*args, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_paths_that_cannot_be_what_they_name_get_one_clear_line_before_the_work(tmp_path, monkeypatch, capsys):
    """A file where a folder belongs or a folder where a file does, a root with nothing there, a built-in baseline
    that does not exist, a vector that is not numbers, a retention that keeps nothing: one line and exit 2, before the
    work (embed's and index's outputs are first written after the pipeline or the index's training; publish's
    retention after LATEST moves)."""
    import pipelines.cli
    from pipelines.cli import main

    monkeypatch.setattr(pipelines.cli, "_setup_logging", lambda verbose: None)
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("not a folder")
    Path("folder").mkdir()
    cases = [
        (["publish", "--root", "nowhere", "--keep", "0"], "--keep must be >= 1, got 0"),  # before LATEST would move
        (["snapshots", "--root", "nowhere"], "no snapshot root at nowhere: not a folder"),
        (["snapshots", "--root", "notes.txt"], "no snapshot root at notes.txt: not a folder"),
        (["similar", "x", "--root", "notes.txt"], "nothing is published under notes.txt"),
        (["similar", "--vector", "0.5,a", "--root", "nowhere"], "--vector 0.5,a: not comma-separated numbers"),
        (["evaluate", "--snapshot", "s", "--interactions", "i.parquet", "--baseline", "builtin:pixel"],
         "--baseline builtin:pixel: the built-in baseline is builtin:pixels"),
        (["nightly", "--config", "folder"], "Is a directory: 'folder'"),
        (["index", "--embeddings", "runs", "--out", "notes.txt/snapshots"],
         f"snapshot root notes.txt/snapshots cannot be a folder: {tmp_path / 'notes.txt'} is a file"),
        (["embed", "--catalog", "c.parquet", "--model", "m", "--out", "notes.txt"],
         f"output root notes.txt cannot be a folder: {tmp_path / 'notes.txt'} is a file"),
    ]  # fmt: skip
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "notes.txt"]  # nothing made on the way


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--patch-size", "0"], "patch_size must be >= 1, got 0"),  # a ZeroDivisionError's traceback before
        (["--layers", "0"], "layers must be >= 1, got 0"),  # a model with no layers was made
        (["--width", "65", "--heads", "2"], "width 65 must be a multiple of heads 2"),
    ],
)
def test_a_tiny_model_that_cannot_be_made_is_refused_before_the_catalog_is_read(monkeypatch, capsys, args, message):
    import pipelines.cli
    from pipelines.cli import main

    monkeypatch.setattr(pipelines.cli, "_setup_logging", lambda verbose: None)
    assert main(["init-model", "--catalog", "nowhere.parquet", "--out", "m", *args]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_a_checkpoint_or_a_catalog_is_not_written_over_another(monkeypatch, capsys, tmp_path):
    """`init-model --out` at a trained model's folder replaced its weights with random ones (keeping its other
    files); `demo-catalog --out` at a catalog wrote its manifest over the old one. Both want a new or empty folder."""
    import pipelines.cli
    from pipelines.cli import main

    monkeypatch.setattr(pipelines.cli, "_setup_logging", lambda verbose: None)
    trained = tmp_path / "encoder"
    trained.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "lookalike_encoder.json", "x.txt"):
        (trained / name).write_text(name)
    assert main(["init-model", "--catalog", "nowhere.parquet", "--out", str(trained)]) == 2
    assert capsys.readouterr().err == (f"error: {trained} is not empty (config.json, lookalike_encoder.json, "
                                       "model.safetensors, preprocessor_config.json and 1 more): a new checkpoint "
                                       "goes into a new or empty folder\n")  # fmt: skip
    assert (trained / "model.safetensors").read_text() == "model.safetensors"
    (tmp_path / "catalog").mkdir()
    (tmp_path / "catalog" / "manifest.parquet").write_text("theirs")
    assert main(["demo-catalog", "--out", str(tmp_path / "catalog"), "--items", "10"]) == 2
    assert "is not empty (manifest.parquet): a new catalog goes into a new or empty folder" in capsys.readouterr().err
    assert (tmp_path / "catalog" / "manifest.parquet").read_text() == "theirs"


@pytest.mark.parametrize(
    "args",
    [
        ["embed", "--catalog", "m.parquet", "--model", "M", "--out", "s3://b/e"],  # a Beam traceback (no boto3)
        ["index", "--embeddings", "E", "--out", "s3://b/s"],  # a local s3: folder, then "Missing bucket name"
        ["evaluate", "--snapshot", "S", "--interactions", "i.parquet", "--out", "s3://b/r"],  # wrote ./s3:/b/r
        ["evaluate", "--snapshot", "s3://b/s", "--interactions", "i.parquet"],
        ["publish", "--root", "s3://b/s"],  # "no complete snapshot under s3://b/s"
        ["rollback", "--root", "s3://b/s"],
        ["snapshots", "--root", "s3://b/s"],
        ["similar", "x", "--root", "s3://b/s"],  # "nothing is published"
        ["serve", "--root", "s3://b/s"],
        ["nightly", "--config", "n.yaml", "--out", "s3://b/o"],
        ["backfill", "--model", "M", "--out", "s3://b/o"],
        ["train", "--catalog", "m.parquet", "--model", "M", "--out", "s3://b/t"],
        ["init-model", "--catalog", "m.parquet", "--out", "s3://b/m"],
    ],
    ids=lambda args: "-".join(a.lstrip("-") for a in args[:1] + args[-2:-1]),
)
def test_another_schemes_uri_where_lookalike_keeps_its_files_is_refused_at_once(monkeypatch, capsys, tmp_path, args):
    """Only local folders and gs:// hold lookalike's runs, snapshots, reports and checkpoints: an s3:// URI was taken
    for a local path (a `./s3:` folder), failed deep inside a run, or read as an empty root."""
    import pipelines.cli
    from pipelines.cli import main

    monkeypatch.setattr(pipelines.cli, "_setup_logging", lambda verbose: None)
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert "lookalike keeps its files in a local folder or on gs://, not s3://" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_configs_refuse_another_schemes_uri():
    from evaluation.run import EvaluateConfig
    from pipelines.nightly_config import NightlyConfig
    from training import TrainConfig

    for make in (
        lambda: NightlyConfig(catalog="c", model="m", out="hdfs://n/o", interactions="i"),
        lambda: EvaluateConfig(snapshot="s", interactions="i", out="hdfs://n/r"),
        lambda: EvaluateConfig(snapshot="hdfs://n/s", interactions="i"),
        lambda: TrainConfig(catalog="c", model="m", out="hdfs://n/t"),
    ):
        with pytest.raises(ValueError, match="in a local folder or on gs://, not hdfs://"):
            make()


@pytest.mark.gcs
def test_init_model_writes_to_gcs_and_local_only_outputs_refuse_a_uri(
    monkeypatch, capsys, tmp_path, demo_catalog, gcs_emulator, gcs_bucket
):
    """A URI where a command took only a path became a local folder: `init-model --out gs://b/m` wrote `./gs:/b/m`
    and said it wrote `gs:/b/m`; `demo-catalog --out gs://b/c` made `./gs:/b/c`, then failed on a URI without a
    bucket. A checkpoint now goes to gs:// too; a demo catalog (its manifest names local images) is refused."""
    import pipelines.cli
    from encoder import EncoderConfig, load_encoder
    from pipelines.cli import main

    monkeypatch.setattr(pipelines.cli, "_setup_logging", lambda verbose: None)
    monkeypatch.chdir(tmp_path)
    out = f"gs://{gcs_bucket}/models/tiny"
    args = ["init-model", "--catalog", str(demo_catalog.manifest), "--out", out, "--image-size", "32", "--width", "32"]
    assert main(args) == 0
    assert capsys.readouterr().out == f"wrote tiny SigLIP checkpoint to {out}\n"
    assert load_encoder(EncoderConfig(model=out)).dim == 32
    assert main(args) == 2
    assert "is not empty (config.json, model.safetensors, preprocessor_config.json, tokenizer.json and 1 more)" in (
        capsys.readouterr().err
    )
    assert main(["demo-catalog", "--out", f"gs://{gcs_bucket}/c"]) == 2
    assert "demo-catalog writes a local catalog" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flag", "message"),
    [("--port=99999", "--port must be 1-65535, got 99999"), ("--refresh-s=0", "--refresh-s must be > 0, got 0.0"),
     ("--workers=0", "--workers must be >= 1, got 0")],
)  # fmt: skip
def test_serve_refuses_a_port_or_a_refresh_it_cannot_use_before_loading(monkeypatch, capsys, flag, message):
    import pipelines.cli
    from pipelines.cli import main

    monkeypatch.setattr(pipelines.cli, "_setup_logging", lambda verbose: None)
    assert main(["serve", "--root", "nowhere", flag]) == 2  # (a root with nothing published: checked after)
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("failure", ["device", "other"])
def test_a_failed_gpu_says_what_to_try_and_another_error_does_not(monkeypatch, capsys, failure):
    import torch

    import pipelines.cli
    import pipelines.embed
    from pipelines.cli import DEVICE_FAILED_HINT, main

    monkeypatch.setattr(pipelines.cli, "_setup_logging", lambda verbose: None)  # no process-wide logging changes

    def run_embed(cfg, beam_args):  # as Beam raises a worker's error: its type kept, the step named
        if failure == "device":
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered [while running 'Embed']")
        raise RuntimeError("the storage went away")

    monkeypatch.setattr(pipelines.embed, "run_embed", run_embed)
    assert main(["embed", "--catalog", "c.parquet", "--model", "m", "--out", "o"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert (DEVICE_FAILED_HINT in err) == (failure == "device")


def test_missing_model_is_a_clear_error(tmp_path, demo_catalog):
    result = _lookalike(
        "embed", "--catalog", str(demo_catalog.manifest), "--model", "./nope", "--out", "E", cwd=tmp_path
    )
    assert result.returncode == 2 and "not a checkpoint directory" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gpu-decode", "on"], "--gpu-decode on: no CUDA device"),
        (["--gpu-decoder", "pil"], "gpu_decoder must be auto, nvimgcodec or nvjpeg"),
        (["--cuda-graph"], "--cuda-graph: no CUDA device"),
        (["--gpu-decode-threads", "0"], "gpu_decode_threads must be >= 1"),
        (["--compile-frozen"], "compile_frozen needs compile"),
        (["--decode-sms", "16"], "--decode-sms: no CUDA device"),
        (["--decode-sms", "-1"], "decode_sms must be >= 0"),
        (["--decode-sms", "16", "--cuda-graph"], "decode_sms cannot be combined with cuda_graph"),
        (["--gpu-resize", "fast"], "gpu_resize must be one of products, kernel"),
    ],
    ids=[
        "gpu-decode-on-without-cuda",
        "unknown-gpu-decoder",
        "cuda-graph-without-cuda",
        "no-decode-threads",
        "frozen-without-compile",
        "decode-sms-without-cuda",
        "negative-decode-sms",
        "decode-sms-with-cuda-graph",
        "unknown-gpu-resize",
    ],
)
def test_gpu_options_that_cannot_work_here_fail_before_any_work(tmp_path, demo_catalog, tiny_model, flags, message):
    result = _lookalike("embed", "--catalog", str(demo_catalog.manifest), "--model", str(tiny_model), "--out", "E",
                        *flags, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "E" / "embeddings").exists()


def test_help_lists_the_commands(tmp_path):
    result = _lookalike("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("demo-catalog", "init-model", "train", "embed"):
        assert command in result.stdout


def test_the_embed_commands_defaults_are_the_configs():
    """`lookalike embed` without a flag embeds as `EmbedConfig` (and so a nightly config) does."""
    from dataclasses import MISSING, fields

    import typer

    from pipelines.cli import app
    from pipelines.embed import EmbedConfig

    flags = {p.name: p.default for p in typer.main.get_command(app).commands["embed"].params}
    defaults = {f.name: f.default for f in fields(EmbedConfig) if f.default is not MISSING}
    shared = flags.keys() & defaults.keys()
    assert len(shared) > 20 and {k: flags[k] for k in shared} == {k: defaults[k] for k in shared}


@pytest.mark.parametrize(
    ("flags", "early"),
    [
        (["--workers", "2"], True),
        (["--workers", "2", "--no-fork-workers"], False),
        (["--workers", "1"], False),
        (["--workers", "2", "--runner=DataflowRunner"], False),
    ],
)
def test_embed_starts_the_worker_forker_before_its_own_imports(monkeypatch, flags, early):
    """`--workers N` on the local runner: the forker's imports run beside the command's (`pipelines.worker_fork`)."""
    from typer.testing import CliRunner

    import pipelines.embed
    import pipelines.worker_fork
    from pipelines.cli import app

    started, ran = [], []
    monkeypatch.setattr(pipelines.worker_fork, "start_early", lambda: started.append("forker"))

    def run_embed(cfg, beam_args):
        ran.append(cfg)
        raise RuntimeError("stood in")

    monkeypatch.setattr(pipelines.embed, "run_embed", run_embed)
    result = CliRunner().invoke(app, ["embed", "--catalog", "c", "--model", "m", "--out", "o", *flags])
    assert str(result.exception) == "stood in"
    assert started == (["forker"] if early else [])
    assert ran[0].fork_workers is ("--no-fork-workers" not in flags)


@pytest.mark.parametrize("command", ["nightly", "backfill"])
@pytest.mark.parametrize(
    ("embed", "flags", "early"),
    [
        ("{workers: 2}", [], True),
        ("{workers: 2, fork_workers: false}", [], False),
        ("{workers: 1}", [], False),
        ("{}", [], False),
        ("{workers: 2}", ["--runner=DataflowRunner"], False),
        ("{workers: 2, beam_args: [--runner=DataflowRunner]}", [], False),
        ("{workers: two}", [], False),  # the config's load says what is wrong, before any forker
    ],
)
def test_nightly_starts_the_worker_forker_before_its_own_imports(tmp_path, monkeypatch, command, embed, flags, early):
    """A nightly or backfill run whose embed step forks local worker processes starts the forker as `embed` does,
    from its checked config."""
    from typer.testing import CliRunner

    import pipelines.nightly
    import pipelines.worker_fork
    from pipelines.cli import app

    config = tmp_path / "nightly.yaml"
    config.write_text(f"catalog: c\nmodel: m\nout: o\ninteractions: i\nembed: {embed}\n")
    started = []
    monkeypatch.setattr(pipelines.worker_fork, "start_early", lambda: started.append("forker"))

    def run_nightly(cfg, *args, **kwargs):
        raise RuntimeError("stood in")

    monkeypatch.setattr(pipelines.nightly, "run_nightly", run_nightly)
    model = ["--model", "m"] if command == "backfill" else []
    result = CliRunner().invoke(app, [command, "--config", str(config), *model, *flags])
    assert started == (["forker"] if early else [])
    assert ("workers" in str(result.exception)) if "two" in embed else str(result.exception) == "stood in"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "does not exist"),
        ("embed: [unclosed\n", "not valid YAML"),
        ("- embed\n", "must be a mapping"),
        ("catalog: c\nmodel: m\nout: o\ninteractions: i\nembed: {workers: 2, batch_size: -1}\n", "batch_size"),
        ("catalog: c\nmodel: m\nout: o\ninteractions: i\nembed: {workers: 2, wokers: 3}\n", "wokers"),
        ("model: m\nout: o\ninteractions: i\nembed: {workers: 2}\n", "catalog"),
    ],
    ids=["missing", "not-yaml", "not-a-mapping", "bad-value", "unknown-key", "no-catalog"],
)
def test_a_nightly_config_that_cannot_be_used_fails_before_any_forker(tmp_path, monkeypatch, text, message):
    """The config is checked before the forker would start: its mistake is the command's one line, and no forker
    starts for a run that cannot start."""
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.nightly_config import ConfigError

    monkeypatch.setattr("pipelines.worker_fork.start_early", lambda: pytest.fail("started"))
    config = tmp_path / "nightly.yaml"
    if text is not None:
        config.write_text(text)
    result = CliRunner().invoke(app, ["nightly", "--config", str(config)])
    assert isinstance(result.exception, ConfigError) and message in str(result.exception), result.exception


@pytest.mark.parametrize(
    ("out", "ledger", "step", "early"),
    [
        ("local", None, None, True),  # a new run
        ("local", [("embed", "started")], None, True),  # killed during its embed step
        ("local", [("embed", "started"), ("embed", "failed")], "index", True),
        ("local", [("embed", "started"), ("embed", "done")], None, False),  # resumed past it
        ("local", [("embed", "done")], "embed", False),
        ("local", "not JSON", None, True),  # the run reads it again, and says what is wrong
        ("gs://bucket/out", None, None, True),  # its ledger is not read here
        ("gs://bucket/out", None, "embed", True),
        ("gs://bucket/out", None, "index", False),  # an orchestrator's task after the embed step's
    ],
)
def test_a_nightly_past_its_embed_step_starts_no_forker_early(tmp_path, monkeypatch, out, ledger, step, early):
    """An orchestrator runs one step per task (`--step`); only a run whose embed step is to come starts the forker."""
    import json

    from pipelines import cli
    from pipelines.nightly_config import load_nightly_config

    started = []
    monkeypatch.setattr("pipelines.worker_fork.start_early", lambda: started.append("forker"))
    out = str(tmp_path / "out") if out == "local" else out
    config = tmp_path / "nightly.yaml"
    config.write_text(f"catalog: c\nmodel: m\ninteractions: i\nout: {out}\nembed: {{workers: 2}}\n")
    if ledger is not None:
        path = tmp_path / "out" / "runs" / "nightly-1" / "ledger.jsonl"
        path.parent.mkdir(parents=True)
        rows = (
            [json.dumps({"step": s, "status": status}) for s, status in ledger]
            if isinstance(ledger, list)
            else [ledger]
        )
        path.write_text("\n".join(rows) + "\n")
    cli._before_the_embed_step(load_nightly_config(str(config)), "nightly-1", step, [])
    assert started == (["forker"] if early else [])
    if out.startswith("/"):  # the command line's --out over the config's
        started.clear()
        elsewhere = load_nightly_config(str(config), out=str(tmp_path / "elsewhere"))
        cli._before_the_embed_step(elsewhere, "nightly-1", step, [])
        assert started == ["forker"]


_HEAVY = ("torch", "apache_beam", "PIL", "transformers")
_IMPORTED_AFTER = (  # runs the command line in a new process, then prints which heavy modules (or forker) it imported
    "import sys\nfrom pipelines.cli import main\ntry:\n    rc = main(sys.argv[1:])\nfinally:\n"
    f"    print(sorted(m for m in {(*_HEAVY, 'pipelines.worker_fork')!r} if m in sys.modules))\nsys.exit(rc)\n"
)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["embed", "--catalog", "c", "--model", "m", "--out", "o", "--workers", "2", "--batch-size", "-1"],
         "batch_size must be >= 1"),
        (["embed", "--catalog", "c", "--model", "m", "--out", "o", "--gpu-resize", "bilinear"], "gpu_resize"),
        (["embed", "--catalog", "c", "--model", "m", "--out", "o", "--dtype", "fp8"], "dtype must be"),
        (["nightly", "--config", "nightly.yaml", "--catalog", "c", "--model", "m", "--out", "o", "--interactions",
          "i"], "wokers"),
        (["backfill", "--model", "m", "--catalog", "c", "--out", "o", "--interactions", "i", "--since", "May"],
         "not an ISO 8601 date"),
        (["backfill", "--model", "m", "--catalog", "c", "--out", "o", "--interactions", "i", "--since", "2062-05-01"],
         "--since '2062-05-01' is in the future"),
        (["train", "--catalog", "c", "--model", "m", "--out", "o", "--precision", "fp8"], "precision must be"),
    ],
    ids=["embed-batch", "embed-resize", "embed-dtype", "nightly-config", "backfill-since", "backfill-future", "train-precision"],
)  # fmt: skip
def test_a_users_mistake_is_reported_before_torch_or_beam_is_imported(tmp_path, args, message):
    """A wrong flag or config value costs its one line in a fraction of a second: the settings are checked before
    the heavy imports (torch, Beam, PIL: ~2-3 s here; torch alone for `train`: ~1.7 s), and no forker starts for a
    run that cannot start."""
    (tmp_path / "nightly.yaml").write_text("embed: {workers: 2, wokers: 3}\n")
    done = subprocess.run([sys.executable, "-c", _IMPORTED_AFTER, *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_a_used_run_id_is_refused_before_torch_or_beam_is_imported(tmp_path):
    """`embed --run-id` of a complete run: refused in 0.3 s here, before the embed's imports (~3 s) and the model."""
    (tmp_path / "o" / "embeddings" / "r1").mkdir(parents=True)
    (tmp_path / "o" / "embeddings" / "r1" / "_manifest.json").write_text("{}")
    done = subprocess.run([sys.executable, "-c", _IMPORTED_AFTER, "embed", "--catalog", "c", "--model", "m", "--out",
                           "o", "--run-id", "r1"], cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and done.stderr == "error: run r1 already exists under o\n", done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_an_orchestrators_task_past_the_embed_step_never_imports_torch_or_beam(tmp_path):
    """Where the ledger says the embed step is done, the nightly's check and the later steps' modules leave torch,
    Beam and transformers unimported: an Airflow task per step pays its own step's imports only."""
    config = tmp_path / "nightly.yaml"
    config.write_text(f"catalog: c\nmodel: m\nout: {tmp_path / 'out'}\ninteractions: i\nembed: {{workers: 2}}\n")
    script = (
        "import sys\nfrom pipelines import cli\nfrom pipelines.nightly_config import load_nightly_config\n"
        "import pipelines.nightly, pipelines.summary, indexing.snapshot, indexing.publish, evaluation.run\n"
        "cli._before_the_embed_step(load_nightly_config(sys.argv[1]), 'nightly-1', 'index', [])\n"
        f"print(sorted(m for m in {('torch', 'apache_beam', 'transformers')!r} if m in sys.modules))\n"
        "from pipelines import worker_fork\nprint(sorted(worker_fork._EARLY))\n"
    )
    ledger = tmp_path / "out" / "runs" / "nightly-1" / "ledger.jsonl"
    ledger.parent.mkdir(parents=True)
    ledger.write_text(json.dumps({"step": "embed", "status": "done"}) + "\n")
    done = subprocess.run([sys.executable, "-c", script, str(config)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "[]"], done.stdout
