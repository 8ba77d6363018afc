"""Dead letters counted by kind of reason, and runs refused or stopped when most of their items fail."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import dead_letters
from pipelines.dead_letters import DeadLetterWatch, TooManyDeadLetters, check_share, describe_reasons, reason_kind


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ("not found", "not found"),
        ("empty file (0 bytes)", "empty file (0 bytes)"),
        ("52428801 bytes exceeds max_bytes=52428800", "N bytes exceeds max_bytes=N"),
        ("truncated or corrupt image data: OSError: image file is truncated (31 bytes not processed)",
         "truncated or corrupt image data"),
        ("Forbidden: 403 GET gs://b/images/1.jpg: no access", "Forbidden"),
        ("no earlier vector for 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
         "no earlier vector for …"),
        (": nothing before the colon", "no reason given"),
        ("a reason\n  on two lines", "a reason on two lines"),
        ("x" * 200, "x" * 80),
    ],
)  # fmt: skip
def test_a_reason_is_counted_by_what_it_says_less_what_names_its_item(error, kind):
    assert reason_kind(error) == kind


def test_reasons_are_described_commonest_first_with_the_rest_summed():
    reasons = [("decode", "empty file (0 bytes)", 2), ("fetch", "not found", 64), ("decode", "bomb", 1),
               ("encode", "non-finite vector", 1)]  # fmt: skip
    assert (
        describe_reasons(reasons, top=2)
        == "fetch · not found 64; decode · empty file (0 bytes) 2; 2 more, 2 other kind(s)"
    )
    assert describe_reasons(reasons[:1]) == "decode · empty file (0 bytes) 2"
    assert describe_reasons([]) == ""


def test_a_run_is_refused_only_past_its_share():
    reasons = [("fetch", "not found", 51)]
    check_share("r", 50, 100, 0.5, reasons, "out/failures/r")  # at the share: complete
    check_share("r", 0, 0, 0.0, [], "out/failures/r")  # an empty catalog
    with pytest.raises(TooManyDeadLetters) as refused:
        check_share("r", 51, 100, 0.5, reasons, "out/failures/r")
    message = str(refused.value)
    assert "run r: 51 of 100 items were dead-lettered (51.0%, more than --max-dead-letters 0.5)" in message
    assert "fetch · not found 51" in message and message.endswith("are in out/failures/r")
    with pytest.raises(TooManyDeadLetters):
        check_share("r", 1, 100, 0.0, reasons, "out/failures/r")  # 0: no dead letter allowed


def _failed(n: int, error: str = "not found") -> list[tuple[str, str]]:
    return [("fetch", error)] * n


def test_the_watch_waits_for_a_full_window_then_stops_past_the_share():
    watch = DeadLetterWatch(0.5, window=1000)
    for _ in range(3):
        watch.add(256, _failed(256))  # 768 items, all failed: not yet a window
    with pytest.raises(TooManyDeadLetters, match=r"^stopped: 1,024 of the last 1,024 items a worker fetched") as err:
        watch.add(256, _failed(256, "Forbidden: 403 GET gs://b/x"))
    assert "fetch · not found 768; fetch · Forbidden 256" in str(err.value)


def test_a_burst_of_broken_listings_does_not_stop_a_healthy_run():
    watch = DeadLetterWatch(0.5, window=1000)
    watch.add(400, _failed(400))  # a seller's 400 broken listings in a row...
    for _ in range(50):
        watch.add(100, _failed(2))  # ...among healthy chunks
    watch.add(100, _failed(100))  # and another burst later: 100 + 2 × 9 of the last 1,000


def test_an_outage_hours_in_stops_the_run_within_a_window():
    watch = DeadLetterWatch(0.5, window=1000)
    for _ in range(1000):  # 100,000 healthy items first: the share of the whole run stays low
        watch.add(100, [])
    for chunk in range(1, 7):
        if chunk <= 5:
            watch.add(100, _failed(100))  # 500 of the last 1,000: not more than half
        else:
            with pytest.raises(TooManyDeadLetters, match="600 of the last 1,000 items"):
                watch.add(100, _failed(100))


def test_the_watch_never_stops_a_run_that_allows_every_item_to_fail():
    watch = DeadLetterWatch(1.0, window=10)
    for _ in range(100):
        watch.add(10, _failed(10))


# ---------------------------------------------------------------- through the pipeline


def _missing_catalog(path: Path, n: int) -> Path:
    pq.write_table(pa.table({"item_id": [f"item-{i}" for i in range(n)],
                             "image_uri": [str(path.parent / "gone" / f"{i}.jpg") for i in range(n)]}), path)  # fmt: skip
    return path


def test_a_run_whose_images_are_gone_is_refused_with_its_reasons(tmp_path, tiny_model):
    from pipelines.embed import EmbedConfig, run_embed

    catalog = _missing_catalog(tmp_path / "catalog.parquet", 40)
    cfg = EmbedConfig(catalog=str(catalog), model=str(tiny_model), out=str(tmp_path / "out"), run_id="gone")
    with pytest.raises(TooManyDeadLetters) as refused:
        run_embed(cfg)
    message = str(refused.value)
    assert (
        message.startswith("run gone: 40 of 40 items were dead-lettered (100.0%") and "fetch · not found 40" in message
    )
    assert not (tmp_path / "out" / "embeddings" / "gone" / "_manifest.json").exists()  # never reused or indexed
    dead = pq.read_table(tmp_path / "out" / "failures" / "gone")
    assert dead.num_rows == 40 and set(dead.column("error").to_pylist()) == {"not found"}

    allowed = run_embed(EmbedConfig(catalog=str(catalog), model=str(tiny_model), out=str(tmp_path / "out"),
                                    run_id="allowed", max_dead_letters=1.0))  # fmt: skip
    assert allowed.counts["dead_lettered"] == 40
    assert allowed.manifest["dead_letter_reasons"] == [{"stage": "fetch", "reason": "not found", "count": 40}]


def test_a_runs_reasons_are_counted_by_stage_and_kind(tmp_path, demo_catalog, tiny_model):
    from pipelines.embed import EmbedConfig, run_embed

    result = run_embed(EmbedConfig(catalog=str(demo_catalog.manifest), model=str(tiny_model),
                                   out=str(tmp_path / "out"), incremental=False))  # fmt: skip
    dead = pq.read_table(result.failures_dir).to_pylist()
    expected = {}
    for row in dead:
        key = (row["stage"], reason_kind(row["error"]))
        expected[key] = expected.get(key, 0) + 1
    got = {(r["stage"], r["reason"]): r["count"] for r in result.manifest["dead_letter_reasons"]}
    assert got == expected and sum(got.values()) == result.counts["dead_lettered"] > 0
    counts = [r["count"] for r in result.manifest["dead_letter_reasons"]]
    assert counts == sorted(counts, reverse=True)


def test_a_worker_stops_a_run_whose_fetches_fail_without_waiting_for_its_end(tmp_path, tiny_model, monkeypatch,
                                                                               caplog):  # fmt: skip
    from pipelines.embed import EmbedConfig, run_embed

    monkeypatch.setattr(dead_letters, "WINDOW_ITEMS", 200)  # the local runner's workers run in this process
    catalog = _missing_catalog(tmp_path / "catalog.parquet", 5000)
    cfg = EmbedConfig(catalog=str(catalog), model=str(tiny_model), out=str(tmp_path / "out"), run_id="outage")
    with caplog.at_level(logging.ERROR), pytest.raises(TooManyDeadLetters) as stopped:
        run_embed(cfg)
    message = str(stopped.value)
    found = re.match(r"run outage stopped: ([\d,]+) of the last ([\d,]+) items a worker fetched were dead-lettered "
                     r"\(100\.0%, more than --max-dead-letters 0\.5\): fetch · not found", message)  # fmt: skip
    assert found, message
    assert 200 <= int(found.group(2).replace(",", "")) < 5000  # stopped within a window, not at the end
    assert "[while running" not in message and "Traceback" not in message
    assert not any("TooManyDeadLetters" in r.getMessage() or r.exc_info for r in caplog.records)  # one line, raised
    assert not (tmp_path / "out" / "embeddings" / "outage" / "_manifest.json").exists()


def test_the_command_line_says_why_in_one_line(tmp_path, tiny_model):
    catalog = _missing_catalog(tmp_path / "catalog.parquet", 30)
    exe = Path(sys.executable).with_name("lookalike")
    result = subprocess.run([str(exe), "embed", "--catalog", str(catalog), "--model", str(tiny_model), "--out", "E",
                             "--run-id", "cli"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=os.environ.copy())  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "error: run cli: 30 of 30 items were dead-lettered" in result.stderr and "Traceback" not in result.stderr
    lenient = subprocess.run([str(exe), "embed", "--catalog", str(catalog), "--model", str(tiny_model), "--out", "E",
                              "--max-dead-letters", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env=os.environ.copy())  # fmt: skip
    assert lenient.returncode == 0, lenient.stderr
    assert re.search(r"why[ │]+fetch · not found 30", lenient.stdout), lenient.stdout
    manifest = json.loads(next((tmp_path / "E" / "embeddings").glob("*/_manifest.json")).read_text())
    assert manifest["options"]["max_dead_letters"] == 1.0


@pytest.mark.slow
def test_worker_processes_leave_a_stops_traceback_to_their_logs(tmp_path, tiny_model):
    """`--workers 2`: Beam's worker processes print every failed bundle's traceback to the terminal they share
    with the launcher; a watch's stop is said once, in one line, as with the workers in the launcher's process."""
    catalog = _missing_catalog(tmp_path / "catalog.parquet", 12_000)  # each worker past its window of 5,000
    exe = Path(sys.executable).with_name("lookalike")
    result = subprocess.run([str(exe), "embed", "--catalog", str(catalog), "--model", str(tiny_model), "--out", "E",
                             "--run-id", "two", "--workers", "2"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=os.environ.copy())  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "TooManyDeadLetters" not in result.stderr, result.stderr[-3000:]
    assert "semi_persistent_directory" not in result.stderr  # Beam's own start-up remark, nothing to act on
    said = [line for line in result.stderr.splitlines() if "stopped: " in line]
    assert len(said) == 1 and said[0].startswith("error: run two stopped: "), result.stderr[-3000:]


def test_a_printed_stop_is_dropped_and_everything_else_printed():
    import io

    out = io.StringIO()
    stream = dead_letters._StopsUnprinted(out)
    try:
        raise TooManyDeadLetters("stopped: 9 of the last 9 items a worker fetched were dead-lettered")
    except TooManyDeadLetters:
        import traceback

        print(traceback.format_exc(), file=stream)
    print("another bundle failed: ValueError: x", file=stream)
    print(file=stream)
    assert out.getvalue() == "another bundle failed: ValueError: x\n\n"
    dead_letters.quiet_worker_prints()  # not a Beam worker process: stderr left as it is
    assert not isinstance(sys.stderr, dead_letters._StopsUnprinted)


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_a_share_outside_0_to_1_is_refused_before_any_work(share):
    from pipelines.embed import EmbedConfig

    with pytest.raises(ValueError, match="max_dead_letters is a share of the items, 0 to 1"):
        EmbedConfig(catalog="c", model="m", out="o", max_dead_letters=share)


def test_a_worker_processs_fetch_steps_share_one_watch_per_run(monkeypatch):
    import pickle

    from pipelines.embed import EmbedConfig
    from pipelines.embed_dofns import FetchAndDecode

    monkeypatch.setattr(dead_letters, "WINDOW_ITEMS", 200)
    step = FetchAndDecode(EmbedConfig(catalog="c", model="m", out="o"), None, 1000)
    copies = [pickle.loads(pickle.dumps(step)) for _ in range(2)]  # two threads' step instances, as the runner makes
    one, other = (copy._shared_watch() for copy in copies)
    one.add(100, _failed(100))
    with pytest.raises(TooManyDeadLetters, match="200 of the last 200 items"):
        other.add(100, _failed(100))  # each saw half the window; together, all of it
    another_run = FetchAndDecode(EmbedConfig(catalog="c", model="m", out="o"), None, 1000)
    assert pickle.loads(pickle.dumps(another_run))._shared_watch() is not one


STOP = ("stopped: 5,120 of the last 5,120 items a worker fetched were dead-lettered (100.0%, more than "
        "--max-dead-letters 0.5): fetch · ServiceUnavailable 5,120. The run is not marked complete.")  # fmt: skip


@pytest.mark.parametrize(
    "raised",
    [
        TooManyDeadLetters(f"{STOP} [while running 'Fetch and decode images/ParDo(FetchAndDecode)']"),  # in-process
        RuntimeError(f"Pipeline job failed:\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                     f"pipelines.dead_letters.TooManyDeadLetters: {STOP} [while running 'Fetch']\n\nmore"),  # processes
        RuntimeError("Dataflow pipeline failed. State: FAILED, Error:\nTraceback (most recent call last):\\n  File "
                     f"\"/usr/x.py\"\\npipelines.dead_letters.TooManyDeadLetters: {STOP}\\n"),  # Dataflow's job message
    ],
    ids=["in-process", "worker-processes", "dataflow"],
)  # fmt: skip
def test_a_workers_stop_is_found_however_the_runner_passes_it_on(raised):
    from pipelines.dead_letters import watch_stop

    assert watch_stop(raised) == STOP


def test_other_failures_are_not_taken_for_a_stop():
    from pipelines.dead_letters import watch_stop

    assert watch_stop(RuntimeError("the storage went away [while running 'Fetch']")) is None
    assert watch_stop(OSError("disk full")) is None


def test_a_gpu_worker_whose_reader_processes_find_nothing_stops_too(tmp_path, tiny_model, monkeypatch):
    """The GPU worker reads in reader processes (`pipelines.file_reader`); their failures reach the same watch."""
    import encoder.gpu_images as gpu_images
    from pipelines import embed_dofns
    from pipelines.embed import EmbedConfig, run_embed
    from tests.encoder.test_gpu_images import _pil_decoder

    monkeypatch.setattr(dead_letters, "WINDOW_ITEMS", 200)
    monkeypatch.setattr(embed_dofns, "gpu_decoding", lambda cfg, preprocess: True)
    monkeypatch.setitem(gpu_images.DECODERS, "nvjpeg", lambda device: _pil_decoder([]))
    readers = []
    real = embed_dofns.file_reader_for
    monkeypatch.setattr(embed_dofns, "file_reader_for", lambda *args: readers.append(real(*args)) or readers[-1])
    catalog = _missing_catalog(tmp_path / "catalog.parquet", 5000)
    cfg = EmbedConfig(catalog=str(catalog), model=str(tiny_model), out=str(tmp_path / "out"), run_id="readers",
                      batch_size=16, gpu_decoder="nvjpeg")  # fmt: skip
    with pytest.raises(TooManyDeadLetters, match=r"^run readers stopped: [\d,]+ of the last [\d,]+ items .*not found"):
        run_embed(cfg)
    assert readers  # the fetch step read through reader processes


def test_a_gpu_worker_stops_a_run_whose_files_are_read_but_never_decode(tmp_path, tiny_model, monkeypatch):
    """On a GPU worker images decode in the embed step, after the fetch step has counted them fetched: what fails
    there reaches the same watch (a CDN that answers every request with a page of HTML, a bucket of truncated
    files), and the run stops within the window, with the decoder's reason."""
    import encoder.gpu_images as gpu_images
    from pipelines import embed_dofns
    from pipelines.embed import EmbedConfig, run_embed
    from tests.encoder.test_gpu_images import _pil_decoder

    monkeypatch.setattr(dead_letters, "WINDOW_ITEMS", 200)
    monkeypatch.setattr(embed_dofns, "gpu_decoding", lambda cfg, preprocess: True)
    monkeypatch.setitem(gpu_images.DECODERS, "nvjpeg", lambda device: _pil_decoder([]))
    pages = tmp_path / "pages"
    pages.mkdir()
    n = 3000
    for i in range(n):
        (pages / f"{i}.jpg").write_bytes(b"<html><body>Not found</body></html>")
    catalog = tmp_path / "catalog.parquet"
    pq.write_table(pa.table({"item_id": [f"item-{i}" for i in range(n)],
                             "image_uri": [str(pages / f"{i}.jpg") for i in range(n)]}), catalog)  # fmt: skip
    cfg = EmbedConfig(catalog=str(catalog), model=str(tiny_model), out=str(tmp_path / "out"), run_id="pages",
                      batch_size=16, gpu_decoder="nvjpeg")  # fmt: skip
    with pytest.raises(TooManyDeadLetters) as stopped:
        run_embed(cfg)
    found = re.match(r"run pages stopped: ([\d,]+) of the last ([\d,]+) items a worker fetched were dead-lettered "
                     r"\([\d.]+%, more than --max-dead-letters 0\.5\): decode · not a recognised image format",
                     str(stopped.value))  # fmt: skip
    assert found, str(stopped.value)
    assert 200 <= int(found.group(2).replace(",", "")) < n  # within a window, not at the end


def test_late_failures_of_items_already_counted_leave_with_the_chunks_before_them():
    def watched() -> DeadLetterWatch:
        watch = DeadLetterWatch(0.5, window=200)
        watch.add(100, [])
        watch.add(100, [])  # 200 fetched, none failed yet
        watch.add(0, _failed(80))  # 80 of them fail to decode afterwards: 80 of 200
        watch.add(100, [])  # the first chunk leaves; the late failures stay, behind the second
        return watch

    with pytest.raises(TooManyDeadLetters, match=r"^stopped: 101 of the last 200 items"):
        watched().add(0, _failed(21))  # the 80 still count
    watch = watched()
    watch.add(100, _failed(100))  # the second chunk leaves, and the late failures with it: 100 of 200
    with pytest.raises(TooManyDeadLetters, match=r"^stopped: 101 of the last 200 items"):
        watch.add(0, _failed(1))
    never_more = DeadLetterWatch(0.7, window=100)
    never_more.add(100, _failed(60))
    with pytest.raises(TooManyDeadLetters, match=r"^stopped: 100 of the last 100 items .+? \(100\.0%"):
        never_more.add(0, _failed(60))  # failures of items already failed elsewhere: at most every item


def test_a_worker_counts_32_kinds_of_reason_by_name_and_the_rest_as_one(monkeypatch):
    import collections

    import pipelines.embed as embed
    from pipelines.records import Failure

    counted: collections.Counter = collections.Counter()

    class Counter:
        def __init__(self, name: str) -> None:
            self.name = name

        def inc(self, n: int = 1) -> None:
            counted[self.name] += n

    monkeypatch.setattr(embed.Metrics, "counter", lambda namespace, name: Counter(name))
    count = embed._count_dead_letters()
    for i in range(40):  # 40 kinds of reason, a word apart (a number would be N)
        for _ in range(2):
            count(Failure(f"item-{i}", "x.jpg", "decode", f"reason {'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN'[i]}"))
    reasons = {
        k.removeprefix("dead_letter_reason:"): n for k, n in counted.items() if k.startswith("dead_letter_reason:")
    }
    assert len(reasons) == dead_letters.MAX_KINDS + 1 and reasons["decode:other reasons"] == 2 * 8
    assert reasons["decode:reason a"] == 2 and counted["dead_lettered"] == 80
