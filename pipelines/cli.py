"""`lookalike`: one command line over the Python API; each command builds a config and calls it.

Unknown `--flags` after `embed`'s own options go to Beam untouched (e.g.
`--runner=DataflowRunner --project=P --region=R`). User mistakes end with a
one-line error and exit code 2; a finished run ends with its summary.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from pipelines.nightly_config import NightlyConfig

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Visually similar items: embed a catalog with SigLIP, index it, publish snapshots.")  # fmt: skip

log = logging.getLogger("lookalike")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if not verbose:
        for noisy in ("apache_beam", "transformers", "huggingface_hub", "urllib3", "google", "faiss"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # Read when transformers is first imported: commands that never load a model never import it.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging, Beam's too.")] = False) -> None:
    _setup_logging(verbose)


@app.command("demo-catalog")
def demo_catalog(
    out: Annotated[str, typer.Option(help="Local directory to write the catalog into.")],
    items: Annotated[int, typer.Option(help="Number of items.")] = 500,
    seed: Annotated[int, typer.Option(help="Same seed, same bytes.")] = 0,
    change: Annotated[
        float | None, typer.Option(help="Instead: give this fraction of an existing catalog new photos, delist a few.")
    ] = None,
) -> None:
    """Generate a synthetic marketplace catalog: photos, manifest, interaction logs (or change one)."""
    from pipelines.demo_catalog import change_demo_catalog, make_demo_catalog

    out = _local_folder(out, "demo-catalog writes a local catalog (its manifest names local images)")
    if change is not None:
        done = change_demo_catalog(out, fraction=change, seed=seed)
        typer.echo(f"changed {out}: {len(done.new_photos)} new photos, {len(done.removed)} items delisted")
        return
    _refuse_a_full_folder(out, "a new catalog")
    catalog = make_demo_catalog(out, items=items, seed=seed)
    typer.echo(f"wrote {catalog.items} items ({len(catalog.broken_item_ids)} deliberately broken) to {catalog.root}")
    typer.echo(f"manifest: {catalog.manifest}\ninteractions: {catalog.interactions}")


def _location(value: str | None) -> str | None:
    """An option naming where lookalike's own files are: a local path or gs:// (`encoder.storage.check_location`)."""
    from encoder.storage import check_location

    if value is not None:
        try:
            check_location(value, "")
        except ValueError as err:
            raise typer.BadParameter(str(err).strip()) from None
    return value


def _local_folder(out: str, why: str) -> Path:
    """`--out` of a command that writes local files only: a URI was taken for a path (`gs://b/x` made `./gs:/b/x`)."""
    if "://" in out:
        raise ValueError(f"--out {out}: {why}; write it to a local folder (and copy that where it should go)")
    return Path(out)


def _refuse_a_full_folder(out: str | Path, what: str) -> None:
    """A command that writes a whole folder of its own writes into a new or empty one: `init-model --out` at a
    trained model's folder replaced its weights with random ones, and `demo-catalog` wrote a manifest over one."""
    from encoder import storage

    held = storage.list_children(str(out))
    if held:
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise FileExistsError(f"{out} is not empty ({shown}): {what} goes into a new or empty folder")


@app.command("init-model")
def init_model(
    catalog: Annotated[str, typer.Option(help="Catalog manifest whose titles train the tokenizer.")],
    out: Annotated[str, typer.Option(help="Directory for the checkpoint (local or gs://).", callback=_location)],
    image_size: Annotated[int, typer.Option(help="Input resolution in pixels (a multiple of --patch-size).")] = 96,
    patch_size: Annotated[int, typer.Option(help="Vision patch size in pixels.")] = 16,
    width: Annotated[int, typer.Option(help="Hidden size of both towers.")] = 128,
    layers: Annotated[int, typer.Option(help="Transformer layers per tower.")] = 4,
    heads: Annotated[int, typer.Option(help="Attention heads (divides --width).")] = 4,
    seed: Annotated[int, typer.Option(help="Weight initialisation seed.")] = 0,
) -> None:
    """Make a tiny random-init SigLIP with a tokenizer trained on the catalog's titles (offline)."""
    from encoder import TinyModelConfig, init_tiny_model
    from pipelines.catalog import CatalogError, read_catalog

    shape = TinyModelConfig(image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=heads,
                            seed=seed)  # fmt: skip
    from encoder import storage

    _refuse_a_full_folder(out, "a new checkpoint")
    table = read_catalog(catalog)
    if "title" not in table.column_names:
        raise CatalogError(f"catalog {catalog} has no 'title' column to train a tokenizer on")
    titles = table.column("title").to_pylist()
    if not storage.is_gcs(out):
        typer.echo(f"wrote tiny SigLIP checkpoint to {init_tiny_model(titles, Path(out), shape)}")
        return
    with tempfile.TemporaryDirectory(prefix="lookalike-init-") as staging:  # written here, then uploaded
        storage.upload_folder(init_tiny_model(titles, Path(staging), shape), out, last="config.json")
    typer.echo(f"wrote tiny SigLIP checkpoint to {out}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def embed(
    ctx: typer.Context,
    catalog: Annotated[str, typer.Option(help="Manifest (Parquet/CSV/JSONL), a glob of them, or a glob of images.")],
    model: Annotated[str, typer.Option(help="SigLIP checkpoint: Hub id, directory or gs:// directory.")],
    out: Annotated[str, typer.Option(help="Output root (local or gs://).", callback=_location)],
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    fetch_threads: Annotated[int, typer.Option(help="Concurrent CPU decodes and local reads per worker.")] = 16,
    hedge_reads: Annotated[
        bool, typer.Option(help="Send a second request for object-store reads slower than 95% of recent ones.")
    ] = True,
    page_lock_reads: Annotated[
        bool,
        typer.Option(
            help="On a GPU worker, page-lock the file readers' ring (~1 GiB resident) so JPEGs copy to the GPU by DMA."
        ),
    ] = True,
    workers: Annotated[int, typer.Option(help="Local runner worker processes (on k GPUs: k, one per GPU).")] = 1,
    fork_workers: Annotated[
        bool, typer.Option(help="Fork those processes from one that imported their modules once (faster start).")
    ] = True,
    device: Annotated[
        str, typer.Option(help="auto, cpu, cuda or cuda:N (cuda: each worker process takes a GPU of its own).")
    ] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model's step, at load.")] = False,
    compile_frozen: Annotated[
        bool,
        typer.Option("--compile-frozen", help="With --compile: weights as constants, so Q, K and V run as one GEMM."),
    ] = False,
    cuda_graph: Annotated[
        bool, typer.Option("--cuda-graph", help="Replay the model as one CUDA graph per batch (CUDA).")
    ] = False,
    decode_sms: Annotated[
        int,
        typer.Option(
            help="On a GPU worker (CUDA green contexts), SMs the model's kernels leave free for decoding and "
            "resizing; 0: none."
        ),
    ] = 0,
    gpu_decode: Annotated[
        str, typer.Option(help="auto, on or off: decode and resize JPEGs on the GPU (auto: where there is one).")
    ] = "auto",
    gpu_decoder: Annotated[
        str,
        typer.Option(
            help="auto (nvimgcodec where installed, else nvjpeg), nvimgcodec (NVIDIA nvImageCodec) or nvjpeg "
            "(torchvision; progressive JPEGs go to CPU threads)."
        ),
    ] = "auto",
    gpu_decode_threads: Annotated[
        int, typer.Option(help="Threads decoding JPEG batches at once on the GPU, each with a decoder of its own.")
    ] = 1,
    gpu_resize: Annotated[
        str,
        typer.Option(
            help="products (batched matrix products) or kernel (two Triton kernels over the decoder's buffer): how "
            "the GPU resize sums its filter taps."
        ),
    ] = "products",
    draft: Annotated[
        bool,
        typer.Option(
            help="JPEG draft-mode decoding (faster, slightly different pixels; the GPU resize reduces alike)."
        ),
    ] = True,
    incremental: Annotated[bool, typer.Option(help="Reuse vectors of unchanged images from an earlier run.")] = True,
    previous: Annotated[str | None, typer.Option(help="Earlier run directory to reuse from (default: latest).")] = None,
    reuse_memory_mb: Annotated[
        int, typer.Option(help="Earlier vectors up to this size are joined in memory per worker; beyond, by a shuffle.")
    ] = 1024,
    rows_per_shard: Annotated[
        int, typer.Option(help="Rows per Parquet shard at most; a worker's rows beyond it go to more shards.")
    ] = 100_000,
    max_image_bytes: Annotated[int, typer.Option(help="Larger images are dead-lettered.")] = 50 * 1024 * 1024,
    max_image_pixels: Annotated[int, typer.Option(help="Images with more pixels are dead-lettered.")] = 100_000_000,
    max_decode_s: Annotated[float, typer.Option(help="Images still decoding after this are dead-lettered.")] = 30.0,
    max_dead_letters: Annotated[
        float, typer.Option(help="Refuse the run (exit 1) once more than this share of its items are dead-lettered.")
    ] = 0.5,
    run_id: Annotated[str | None, typer.Option(help="Run id (default: UTC time + random suffix).")] = None,
) -> None:
    """Embed every catalog image into Parquet shards, with dead letters for the rest (Apache Beam)."""
    from pipelines.embed_config import EmbedConfig  # light: a wrong value is reported before any heavy import

    options = dict(
        catalog=catalog, model=model, out=out, batch_size=batch_size, fetch_threads=fetch_threads, workers=workers,
        fork_workers=fork_workers, device=device, dtype=dtype, compile=compile, compile_frozen=compile_frozen,
        cuda_graph=cuda_graph,
        decode_sms=decode_sms, gpu_decode=gpu_decode, gpu_decoder=gpu_decoder, gpu_decode_threads=gpu_decode_threads,
        gpu_resize=gpu_resize,
        draft=draft, incremental=incremental, previous=previous, hedge_reads=hedge_reads, page_lock_reads=page_lock_reads,
        max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels, reuse_memory_mb=reuse_memory_mb,
        rows_per_shard=rows_per_shard, max_decode_s=max_decode_s, max_dead_letters=max_dead_letters,
    )  # fmt: skip
    if run_id:
        options["run_id"] = run_id
    cfg = EmbedConfig(**options)
    if run_id:  # before the imports (~3 s here) and the model's load
        from pipelines.embed_runs import refuse_a_used_run_id

        refuse_a_used_run_id(cfg.out, run_id)
    _start_forker_early(cfg.workers, cfg.fork_workers, ctx.args)
    from pipelines.embed import run_embed
    from pipelines.summary import print_embed_summary

    print_embed_summary(run_embed(cfg, beam_args=list(ctx.args)))


@app.command("train")
def train_cmd(
    catalog: Annotated[str, typer.Option(help="Manifest with item_id, image_uri, title (local or gs://).")],
    model: Annotated[str, typer.Option(help="Two-tower SigLIP: Hub id, directory or gs:// directory.")],
    out: Annotated[
        str,
        typer.Option(
            help="Folder (local or gs://) for checkpoints, metrics and the exported encoder.", callback=_location
        ),
    ],
    interactions: Annotated[str | None, typer.Option(help="Interaction logs: item nDCG@5 at each epoch.")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the training pairs.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Global batch (all processes); the loss sees all of it.")] = 256,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (random init: ~5e-4).")] = 1e-5,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay on weight matrices.")] = 0.05,
    warmup_fraction: Annotated[float, typer.Option(help="Share of steps for linear warmup.")] = 0.05,
    grad_clip: Annotated[float, typer.Option(help="Max gradient norm (0: off).")] = 1.0,
    freeze_text: Annotated[bool, typer.Option("--freeze-text", help="Keep the text tower fixed.")] = False,
    freeze_vision_layers: Annotated[int, typer.Option(help="Keep the lowest N vision layers fixed.")] = 0,
    augment: Annotated[bool, typer.Option(help="Random resized crop and horizontal flip.")] = True,
    val_fraction: Annotated[float, typer.Option(help="Share of items held out for validation.")] = 0.05,
    max_text_tokens: Annotated[int | None, typer.Option(help="Title length in tokens (default: model's).")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (and every epoch end).")] = 500,
    keep_checkpoints: Annotated[int, typer.Option(help="Checkpoints kept.")] = 2,
    log_every: Annotated[int, typer.Option(help="Steps between metrics.jsonl rows.")] = 10,
    workers: Annotated[
        int | None, typer.Option(help="Data-loading processes per training process (default: cores - 1).")
    ] = None,
    cache_mb: Annotated[int, typer.Option(help="Decode training images once into memory if they fit (0: off).")] = 2048,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA), fp32 or bf16.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the towers (CUDA).")] = False,
    seed: Annotated[int, typer.Option(help="Shuffling and augmentation seed.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in OUT.")] = False,
    auto_resume: Annotated[
        bool,
        typer.Option(
            "--auto-resume",
            help="Continue from OUT's latest checkpoint if there is one, else start (for an orchestrator's retries).",
        ),
    ] = False,
) -> None:
    """Fine-tune SigLIP on catalog image–title pairs (sigmoid loss); export the image encoder to OUT/encoder.

    Several processes: `torchrun --nproc-per-node N $(which lookalike) train ...`.
    """
    from training.config import TrainConfig  # light: a wrong flag is reported before torch is imported

    cfg = TrainConfig(
        catalog=catalog, model=model, out=out, interactions=interactions, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, warmup_fraction=warmup_fraction, grad_clip=grad_clip, freeze_text=freeze_text,
        freeze_vision_layers=freeze_vision_layers, augment=augment, val_fraction=val_fraction,
        max_text_tokens=max_text_tokens, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
        log_every=log_every, cache_mb=cache_mb,
        workers=workers, device=device, precision=precision, compile=compile, seed=seed, resume=resume,
        auto_resume=auto_resume,
    )  # fmt: skip
    from pipelines.summary import print_train_summary
    from training import train

    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print_train_summary(result)


def _start_forker_early(workers: int, fork_workers: bool, beam_args: list[str] | tuple[str, ...]) -> None:
    """Start the worker forker now, with the run's settings checked and before this command's heavy imports, so that
    its imports run beside them (`pipelines.worker_fork`), where the run will fork local worker processes: more than
    one worker, forks on, no runner named (`pipelines.embed`'s options). The run's own check decides; where the two
    disagree, a forker starts for nothing (killed at exit) or one starts with the run."""
    if workers > 1 and fork_workers and not any(str(arg).startswith("--runner") for arg in beam_args):
        from pipelines.worker_fork import start_early

        start_early()


def _embed_step_ahead(out: str, run_id: str, step: str | None) -> bool:
    """Whether a nightly or backfill run has its embed step ahead of it: the run's ledger says so where the output
    root is local; on an object store (not read here), a run told to stop after a later step (`--step index`, as an
    orchestrator's task per step) is taken to be past it."""
    if "://" in out:
        return step in (None, "embed")
    from pipelines.ledger import Ledger

    try:
        return not Ledger(out, run_id).done("embed")
    except (OSError, ValueError, KeyError, TypeError):  # the run reads it again, and says what is wrong
        return True


def _before_the_embed_step(cfg: NightlyConfig, run_id: str, step: str | None, beam_args: list[str],
                           ours: list[str] | tuple[str, ...] = ()) -> None:  # fmt: skip
    """Where a nightly or backfill run's embed step is ahead of it: the flags it hands on to Beam (the config's and
    the command line's) checked, a typo of `ours` being no Beam flag; then `_start_forker_early` from its checked
    config. A run past it (an orchestrator's later task) imports neither."""
    if _embed_step_ahead(cfg.out, run_id, step):
        from pipelines.beam_flags import check_beam_args
        from pipelines.embed_config import option

        beam_args = [*cfg.embed.beam_args, *beam_args]
        settings = {option(name): f"a night's embed settings are its config's (embed: {{{name}: ...}})"
                    for name in cfg.embed.step_options()}  # fmt: skip
        check_beam_args(beam_args, ours, settings)
        _start_forker_early(cfg.embed.workers, cfg.embed.fork_workers, beam_args)


def _options(ctx: typer.Context) -> list[str]:
    """The command's own options (`--step`, `--out`, ...)."""
    return [option for param in ctx.command.params for option in getattr(param, "opts", ())]


def _nightly_overrides(**flags) -> dict:
    return {k: v for k, v in flags.items() if v is not None}


@app.command("nightly", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def nightly_cmd(
    ctx: typer.Context,
    config: Annotated[str | None, typer.Option(help="nightly.yaml (local or gs://); flags below override it.")] = None,
    catalog: Annotated[str | None, typer.Option(help="Catalog manifest.")] = None,
    model: Annotated[str | None, typer.Option(help="Image encoder (Hub id, directory, gs:// directory).")] = None,
    out: Annotated[
        str | None, typer.Option(help="Output root: embeddings/, snapshots/, runs/.", callback=_location)
    ] = None,
    interactions: Annotated[str | None, typer.Option(help="Interaction logs for the gate.")] = None,
    keep: Annotated[int | None, typer.Option(help="Snapshots kept after publishing.")] = None,
    run_id: Annotated[str | None, typer.Option(help="Default: nightly-YYYYMMDD (a rerun resumes it).")] = None,
    step: Annotated[
        str | None, typer.Option(help="Stop after this step (embed, index, evaluate, publish, retention).")
    ] = None,
) -> None:
    """Embed (incremental) → index → evaluate vs the published snapshot → gate → publish → retention.

    A rerun with the same run id resumes after the last completed step. Other --flags go to Beam (checked: a flag
    Beam does not define either is refused).
    """
    from pipelines.ledger import default_run_id
    from pipelines.nightly_config import load_nightly_config  # light: the config is checked before heavy imports

    run_id = run_id or default_run_id()
    cfg = load_nightly_config(config, **_nightly_overrides(catalog=catalog, model=model, out=out,
                                                           interactions=interactions, keep=keep))  # fmt: skip
    _before_the_embed_step(cfg, run_id, step, ctx.args, _options(ctx))
    from pipelines.nightly import run_nightly
    from pipelines.summary import print_nightly

    with _resume_note(cfg.out, run_id):
        result = run_nightly(cfg, run_id, beam_args=list(ctx.args), until=step)
    print_nightly(result, cfg.out)


@contextlib.contextmanager
def _resume_note(out: str, run_id: str):
    """A failed run's error ends with how to go on from its done steps: a backfill's run id is its start time, and a
    night's is its date, so a plain rerun (or one after midnight) would start over and embed the catalog again."""
    try:
        yield
    except Exception as err:
        from pipelines.ledger import read_ledger

        try:
            rows = read_ledger(out, run_id)
        except Exception:  # noqa: BLE001 - the note is a courtesy; the error is what matters
            rows = []
        done = [r["step"] for r in rows if r["status"] == "done" and r["step"] != "run"]
        if done and rows[-1]["status"] == "failed":  # a step failed: not a refusal before any (a lock, a changed input)
            err.add_note(f"run {run_id} keeps its done steps ({', '.join(done)}): go on from them with the same "
                         f"command and --run-id {run_id}")  # fmt: skip
        raise


@app.command("backfill", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def backfill_cmd(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="The (new) image encoder to re-embed everything with.")],
    config: Annotated[str | None, typer.Option(help="The nightly.yaml whose settings to use.")] = None,
    catalog: Annotated[str | None, typer.Option(help="Catalog manifest (default: the config's).")] = None,
    since: Annotated[
        str | None, typer.Option(help="Only items updated on or after this date; the rest reuse same-model vectors.")
    ] = None,
    out: Annotated[str | None, typer.Option(help="Output root (default: the config's).", callback=_location)] = None,
    interactions: Annotated[str | None, typer.Option(help="Interaction logs for the gate.")] = None,
    run_id: Annotated[str | None, typer.Option(help="Default: backfill-<UTC time>.")] = None,
    step: Annotated[
        str | None, typer.Option(help="Stop after this step (embed, index, evaluate, publish, retention).")
    ] = None,
) -> None:
    """Re-embed the catalog with a model, then index, evaluate, gate and publish like the nightly job.

    Every vector is computed afresh; with --since, only items updated on or after that date
    are, and the others reuse vectors of the same model version where they exist. The run
    has its own id and takes the same lock as the nightly job, so the two never publish
    over each other.
    """
    from pipelines.dates import parse_when
    from pipelines.ledger import default_run_id
    from pipelines.nightly_config import load_nightly_config  # light: the config is checked before heavy imports

    run_id = run_id or default_run_id("backfill")
    cfg = load_nightly_config(config, **_nightly_overrides(catalog=catalog, model=model, out=out,
                                                           interactions=interactions))  # fmt: skip
    if since is not None:
        parse_when(since)  # a bad date fails now, not after the lock and the catalog scan
    _before_the_embed_step(cfg, run_id, step, ctx.args, _options(ctx))
    from pipelines.nightly import run_nightly
    from pipelines.summary import print_nightly

    with _resume_note(cfg.out, run_id):
        result = run_nightly(cfg, run_id, incremental=since is not None, beam_args=list(ctx.args), kind="backfill",
                             until=step, reembed_since=since)  # fmt: skip
    print_nightly(result, cfg.out)


@app.command("index")
def index_cmd(
    embeddings: Annotated[
        list[str],
        typer.Option(help="Embed run directory (OUT/embeddings/<run_id>), or OUT for its latest run; repeatable."),
    ],
    out: Annotated[
        str,
        typer.Option(
            help="Snapshot root (local or gs://); the snapshot lands in OUT/<snapshot_id>/.", callback=_location
        ),
    ],
    backend: Annotated[str, typer.Option(help="faiss or scann.")] = "faiss",
    index: Annotated[str, typer.Option(help="auto, flat, hnsw, ivf, ivfpq, or a faiss factory string.")] = "auto",
    min_recall: Annotated[float, typer.Option(help="Fail the build below this measured recall@10.")] = 0.9,
    target_recall: Annotated[float, typer.Option(help="Tune search parameters up to this recall@10.")] = 0.95,
    queries: Annotated[int, typer.Option(help="Sampled queries for recall and latency.")] = 1000,
    hnsw_m: Annotated[int, typer.Option(help="HNSW neighbours per node.")] = 32,
    nlist: Annotated[int | None, typer.Option(help="IVF lists (default ~4·sqrt(N)).")] = None,
    scann_leaves: Annotated[int | None, typer.Option(help="ScaNN tree leaves (default ~sqrt(N)).")] = None,
    scann_reorder: Annotated[int, typer.Option(help="ScaNN candidates re-scored exactly.")] = 100,
    memory_budget: Annotated[
        str | None, typer.Option(help="e.g. 4GiB: larger builds go to IVF on disk in parts.")
    ] = None,
    reduce: Annotated[str | None, typer.Option(help="pca:D or prefix:D to serve D dimensions.")] = None,
    snapshot_id: Annotated[str | None, typer.Option(help="Snapshot id (default: UTC time + random suffix).")] = None,
) -> None:
    """Build an ANN index snapshot from embed runs, with measured recall and latency (not published)."""
    from indexing import IndexConfig, build_snapshot, parse_size
    from pipelines.summary import print_snapshot_summary

    cfg = IndexConfig(
        backend=backend, index=index, min_recall=min_recall, target_recall=target_recall, queries=queries,
        hnsw_m=hnsw_m, nlist=nlist, scann_leaves=scann_leaves, scann_reorder=scann_reorder,
        memory_budget=parse_size(memory_budget), reduce=reduce,
    )  # fmt: skip
    print_snapshot_summary(build_snapshot(embeddings, out, cfg, snapshot_id=snapshot_id), out)


@app.command("publish")
def publish_cmd(
    root: Annotated[str, typer.Option(help="Snapshot root.", callback=_location)],
    snapshot_id: Annotated[str | None, typer.Argument(help="Snapshot to publish (default: the newest).")] = None,
    keep: Annotated[
        int | None, typer.Option(help="Then delete all but the newest N (never LATEST or the one before).")
    ] = None,
    require_evaluation: Annotated[
        bool, typer.Option("--require-evaluation", help="Refuse unless `lookalike evaluate` passed its gates for it.")
    ] = False,
) -> None:
    """Verify every checksum of a snapshot, then point ROOT/LATEST at it atomically."""
    from indexing import publish, retain

    if keep is not None and keep < 1:  # before LATEST moves, not after
        raise ValueError(f"--keep must be >= 1, got {keep}")
    latest = publish(root, snapshot_id, require_evaluation=require_evaluation)
    typer.echo(f"published {latest.snapshot_id} (previously {latest.history[0] if latest.history else 'nothing'})")
    if keep is not None:
        deleted = retain(root, keep)
        typer.echo(f"retention: deleted {len(deleted)} snapshot(s) {', '.join(deleted)}".rstrip())


@app.command("rollback")
def rollback_cmd(
    root: Annotated[str, typer.Option(help="Snapshot root.", callback=_location)],
    to: Annotated[str | None, typer.Option(help="Snapshot to go back to (default: the one published before).")] = None,
) -> None:
    """Point ROOT/LATEST back at an earlier snapshot (verified first)."""
    from indexing import rollback

    latest = rollback(root, to)
    typer.echo(f"LATEST is now {latest.snapshot_id}")


@app.command("snapshots")
def snapshots_cmd(
    root: Annotated[str, typer.Option(help="Snapshot root.", callback=_location)],
    keep: Annotated[
        int | None, typer.Option(help="First delete all but the newest N (never LATEST or the one before).")
    ] = None,
) -> None:
    """List the complete snapshots under a root; which one is LATEST."""
    from encoder.storage import is_gcs
    from indexing import list_snapshots, retain
    from pipelines.summary import print_snapshot_list

    if not is_gcs(root) and not os.path.isdir(root):  # (an object store's prefix cannot be missing)
        raise FileNotFoundError(f"no snapshot root at {root}: not a folder")
    if keep is not None:
        deleted = retain(root, keep)
        typer.echo(f"retention: deleted {len(deleted)} snapshot(s)")
    print_snapshot_list(list_snapshots(root), root)


@app.command("similar")
def similar_cmd(
    item_id: Annotated[str | None, typer.Argument(help="Catalog item to find neighbours of.")] = None,
    root: Annotated[
        str,
        typer.Option(
            help="Snapshot root (its published snapshot), or ROOT/<snapshot_id> (published or not).", callback=_location
        ),
    ] = ".",
    k: Annotated[int, typer.Option("-k", "--k", help="How many neighbours.")] = 5,
    vector: Annotated[
        str | None, typer.Option(help="Query by a raw vector: comma-separated floats, or a .npy file.")
    ] = None,
) -> None:
    """Print the nearest neighbours of an item (itself excluded) or of a raw vector, with scores."""
    import numpy as np

    from indexing.client import open_snapshot

    if (item_id is None) == (vector is None):
        raise ValueError("give an ITEM_ID or --vector, not both" if item_id else "give an ITEM_ID or --vector")
    query = None
    if vector is not None:  # read before the snapshot is loaded
        try:
            query = np.load(vector) if vector.endswith(".npy") else np.array([float(v) for v in vector.split(",")])
        except ValueError as err:
            raise ValueError(f"--vector {vector}: not comma-separated numbers or a .npy file of them ({err})") from None
    client = open_snapshot(root)[1]
    if query is not None:
        found = client.search(vectors=query, k=k)[0]
    else:
        found = client.search(item_ids=[item_id], k=k)[0]
    typer.echo(f"snapshot {client.snapshot_id}: {len(found)} neighbours of {item_id or 'the vector'}")
    for rank, neighbor in enumerate(found, 1):
        typer.echo(f"{rank:>3}  {neighbor.score:8.4f}  {neighbor.item_id}")


@app.command("serve")
def serve_cmd(
    root: Annotated[str, typer.Option(help="Snapshot root (the published snapshot is served).", callback=_location)],
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    host: Annotated[str, typer.Option(help="Interface; 0.0.0.0 exposes it beyond this machine.")] = "127.0.0.1",
    refresh_s: Annotated[float, typer.Option(help="Seconds between checks for a newly published snapshot.")] = 30.0,
    token_file: Annotated[
        str | None, typer.Option(help="File holding a bearer token that requests must carry (or $LOOKALIKE_TOKEN).")
    ] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Larger request bodies get 413 unread.")] = 8 * 1024 * 1024,
    workers: Annotated[
        int, typer.Option(help="Server processes on the port, sharing the snapshot's mapped files.")
    ] = 1,
) -> None:
    """Serve similar-item queries over HTTP, picking up newly published snapshots as they land."""
    import uvicorn

    from indexing import SnapshotClient
    from indexing.service import ServeSettings

    if max_body_bytes < 1:
        raise ValueError(f"--max-body-bytes must be >= 1, got {max_body_bytes}")
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be 1-65535, got {port}")
    if not refresh_s > 0:  # 0 would read LATEST back to back: on an object store, a storm of requests
        raise ValueError(f"--refresh-s must be > 0, got {refresh_s}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    settings = ServeSettings(root, refresh_s, str(Path(token_file).resolve()) if token_file else None, max_body_bytes)
    token = settings.token()
    client = SnapshotClient(root)  # here first: a root with nothing to serve is refused before any worker starts
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("lookalike").warning("serving on %s without a bearer token (--token-file)", host)
    if workers > 1:  # each worker process loads the snapshot as checked here (its check remembered), mapped
        client.close()
        del client
        os.environ[ServeSettings.ENV] = settings.to_json()
        uvicorn.run("indexing.service:app_from_environment", factory=True, workers=workers, host=host, port=port,
                    log_level="warning")  # fmt: skip
        return
    app_ = settings.app(client)
    try:
        uvicorn.run(app_, host=host, port=port, log_level="warning")
    finally:
        client.close()


@app.command("evaluate")
def evaluate_cmd(
    snapshot: Annotated[
        str, typer.Option(help="Snapshot to evaluate: ROOT/<snapshot_id>, or ROOT for its LATEST.", callback=_location)
    ],
    interactions: Annotated[str, typer.Option(help="Interaction logs (Parquet/CSV/JSONL, local or gs://).")],
    baseline: Annotated[str | None, typer.Option(help="Snapshot to compare with, or builtin:pixels.")] = None,
    catalog: Annotated[
        str | None, typer.Option(help="Catalog manifest: titles, categories and images for the report.")
    ] = None,
    out: Annotated[
        str | None, typer.Option(help="Directory for metrics.json and report.html.", callback=_location)
    ] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Cut-off of every metric.")] = 5,
    since: Annotated[
        str | None, typer.Option(help="Only logs at or after this time (ISO 8601, e.g. 2026-06-01).")
    ] = None,
    gate: Annotated[list[str] | None, typer.Option(help="e.g. 'ndcg@5>=baseline-0.005'; repeatable.")] = None,
    bootstrap: Annotated[int, typer.Option(help="Paired bootstrap resamples for the 95% intervals.")] = 1000,
    max_queries: Annotated[
        int | None, typer.Option(help="At most this many query items of the logs, chosen by a hash of their ids.")
    ] = None,
) -> None:
    """nDCG@k, recall@k, MRR, hit rate and coverage from interaction logs; compare, gate and report."""

    from evaluation.gate import raise_if_failed
    from evaluation.run import EvaluateConfig, run_evaluation
    from pipelines.dates import parse_when
    from pipelines.summary import print_evaluation

    when = parse_when(since) if since else None
    cfg = EvaluateConfig(snapshot=snapshot, interactions=interactions, baseline=baseline, catalog=catalog, out=out,
                         k=k, since=when, gates=tuple(gate or ()), bootstrap=bootstrap,
                         max_queries=max_queries)  # fmt: skip
    doc = run_evaluation(cfg)
    print_evaluation(doc)
    raise_if_failed(doc)


DEVICE_FAILED_HINT = (
    "the GPU failed, so the run stopped rather than dead-letter the rest of the catalog. Rerun: the images that were "
    "on its GPU decoder go to the CPU then, in case one of them caused it (README, 'A decoder that crashes on one "
    "image'). If it fails again, --gpu-decode off (a nightly config: embed.gpu_decode: off) decodes every image on "
    "the CPU, where one that cannot be decoded is dead-lettered."
)


# A path that names nothing, or the wrong kind of thing, or one this user may not use: the user's to fix.
PATH_MISTAKES = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app, turning user mistakes into one clear line and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except (*PATH_MISTAKES, ValueError, KeyError) as err:  # a CatalogError is a ValueError
        if isinstance(err, KeyError) and not _unknown_item(err):
            raise
        logging.getLogger("lookalike").debug("failure", exc_info=True)
        _error(err)
        return 2
    except RuntimeError as err:
        _error(err)
        from encoder.failures import device_failed

        if device_failed(err):
            typer.echo(DEVICE_FAILED_HINT, err=True)
        return 1
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except typer.TyperException as err:  # usage errors: unknown option, missing value (typer's own click)
        show = getattr(err, "show", None)
        if show is None:
            raise
        show()
        return int(getattr(err, "exit_code", 2))
    return 0


def _error(err: BaseException) -> None:
    """One `error:` line, then the notes a command added (how to go on)."""
    typer.echo(f"error: {err}", err=True)
    for note in getattr(err, "__notes__", ()):
        typer.echo(note, err=True)


def _unknown_item(err: KeyError) -> bool:
    """Whether `err` is the snapshot client's `UnknownItem`, without importing the client (numpy, pyarrow: ~0.15 s
    before every command): only a command that loaded it can raise it."""
    client = sys.modules.get("indexing.client")
    return client is not None and isinstance(err, client.UnknownItem)


if __name__ == "__main__":
    sys.exit(main())
