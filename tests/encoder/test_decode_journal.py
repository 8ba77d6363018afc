"""The GPU decoder's journal: what a process had in flight when it died becomes the directory's suspects."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from encoder.decode_journal import SUSPECT, DecodeJournal, journal_dir
from encoder.gpu_stream import embed_stream

ROOT = Path(__file__).resolve().parents[2]


def _journal(directory) -> DecodeJournal:
    return DecodeJournal(directory, digest_of=lambda key: key[1])


def _contents(journal: DecodeJournal) -> list[str]:
    return journal._path.read_text().split()


def test_the_journal_lists_the_batches_in_flight_and_goes_when_none_are(tmp_path):
    journal = _journal(tmp_path)
    journal.begin("a", ["d1", "d2"])
    journal.begin("b", ["d3"])
    assert _contents(journal) == ["d1", "d2", "d3"]
    journal.end("a")
    assert _contents(journal) == ["d3"]
    journal.forget(["b", "never begun"])
    assert _contents(journal) == []
    journal.close()
    assert list(tmp_path.glob("journal-*")) == []


def test_what_a_dead_process_had_in_flight_becomes_a_suspect(tmp_path, caplog):
    died = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os
        from encoder.decode_journal import DecodeJournal
        journal = DecodeJournal({str(tmp_path)!r}, digest_of=lambda key: key)
        journal.begin(0, ["done-digest"])
        journal.end(0)
        journal.begin(1, ["culprit", "neighbour"])
        os._exit(139)  # as a segfault in a native decoder ends it: nothing runs after
    """)], cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert died.returncode == 139, died.stderr
    with caplog.at_level(logging.WARNING, logger="encoder.decode_journal"):
        journal = _journal(tmp_path)
    assert journal.suspects == {"culprit", "neighbour"}
    assert "2 images were on the GPU decoder when a worker stopped" in caplog.text
    assert {p.name for p in tmp_path.iterdir()} == {journal._path.name, "suspects.txt"}  # gathered once
    journal.close()
    assert _journal(tmp_path).suspects == {"culprit", "neighbour"}  # and kept for later runs


def test_a_live_processs_journal_is_not_gathered(tmp_path):
    alive = _journal(tmp_path)
    alive.begin(0, ["busy"])
    assert _journal(tmp_path).suspects == frozenset()  # its lock is held: its batches are still running
    alive.close()  # closed with a batch in flight (a failed GPU): left behind for the next process
    assert _journal(tmp_path).suspects == {"busy"}


def test_suspects_are_routed_to_the_cpu_and_the_rest_keep_their_routes(tmp_path):
    (tmp_path / "suspects.txt").write_text("bad\n")
    journal = _journal(tmp_path)
    assert journal.reasons(["ok", "bad"], [None, None]) == [None, SUSPECT]
    assert journal.reasons(["ok", "png"], [None, "not a JPEG"]) is None  # none suspected: as they were
    assert _journal(tmp_path / "empty").reasons(["bad"], [None]) is None


def test_journals_of_different_output_roots_are_apart():
    assert journal_dir("gs://b/out") == journal_dir("gs://b/out/") != journal_dir("gs://b/other")


@pytest.mark.parametrize("error", ["device", "ordinary"])
def test_a_failed_device_leaves_its_batches_in_the_journal_and_an_ordinary_error_does_not(
    tiny_encoder, tmp_path, monkeypatch, error
):
    import torch

    from tests.encoder.test_gpu_stream import _images

    pixels = np.zeros((8, 8, 3), np.uint8)  # decoded already: what the journal holds is the keys' digests

    def launch(batch, eager=False):  # the device fails under the model: raised, not dead-lettered image by image
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    def batches():
        yield [(0, "d0"), (1, "d1")], [pixels, pixels]
        if error == "ordinary":
            raise RuntimeError("the storage went away")  # the source fails with the first batch in flight

    if error == "device":
        monkeypatch.setattr(tiny_encoder, "launch", launch)
    journal = _journal(tmp_path)
    with pytest.raises(torch.AcceleratorError if error == "device" else RuntimeError):
        list(embed_stream(tiny_encoder, _images(tiny_encoder), batches(), journal=journal))
    assert _contents(journal) == (["d0", "d1"] if error == "device" else [])
    journal.close()


def test_a_batch_leaves_the_journal_once_its_vectors_are_taken(tiny_encoder, tmp_path):
    from tests.encoder.test_gpu_stream import _images

    pixels = np.zeros((tiny_encoder.preprocess.height, tiny_encoder.preprocess.width, 3), np.uint8)
    batches = [([(k, f"d{k}-{i}") for i in range(3)], [pixels] * 3) for k in range(6)]
    journal, seen = _journal(tmp_path), []
    for batch in embed_stream(tiny_encoder, _images(tiny_encoder), batches, prefetch=1, in_flight=1, journal=journal):
        listed = _contents(journal)
        seen.append(len(listed) // 3)
        assert not any(d.startswith(f"d{batch.keys[0][0]}-") for d in listed)  # handed over: not in flight
    # At most a batch per decode thread and one more, `prefetch` resized and `in_flight` launched are in flight.
    assert len(seen) == 6 and max(seen) <= 2 + 1 + 1
    assert _contents(journal) == []
    journal.close()
