"""GPU claims: processes spread over a machine's GPUs, one model each while there are GPUs enough."""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from encoder import devices
from encoder.devices import claim_gpu, gpu_for_process, spread_note
from encoder.model import pick_device

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from encoder.devices import claim_gpu
    claim = claim_gpu(sys.argv[2].split(","), Path(sys.argv[1]))
    print(claim.index, claim.slot, claim.path.name, flush=True)
    sys.stdin.read()  # hold the claim until told to go
""")


def _start(where, ids: list[str]) -> subprocess.Popen:
    """A process that claims one of `ids` and holds it."""
    return subprocess.Popen([sys.executable, "-c", _HOLDER, str(where), ",".join(ids)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip


def _claimed(proc: subprocess.Popen) -> tuple[int, int, str]:
    """What a `_start`ed process holds: (index, slot, lock file name)."""
    index, slot, name = proc.stdout.readline().split()
    return int(index), int(slot), name


def _holder(where, ids: list[str]) -> tuple[subprocess.Popen, tuple[int, int, str]]:
    proc = _start(where, ids)
    return proc, _claimed(proc)


def _stop(procs) -> None:
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_claims_in_one_process_fill_every_gpu_before_sharing_one(tmp_path):
    claims = [claim_gpu(["a", "b", "c"], tmp_path) for _ in range(4)]
    assert [(c.index, c.slot) for c in claims] == [(0, 0), (1, 0), (2, 0), (0, 1)]
    claims[1].release()
    again = claim_gpu(["a", "b", "c"], tmp_path)
    assert (again.index, again.slot) == (1, 0)  # the freed GPU, before a second slot of any
    for claim in [*claims, again]:
        claim.release()


def test_processes_spread_evenly_and_a_dead_process_frees_its_gpu(tmp_path):
    ids = ["gpu-x", "gpu-y"]
    procs = [_start(tmp_path, ids) for _ in range(4)]  # all claiming at once
    try:
        held = [_claimed(proc) for proc in procs]
        assert collections.Counter(index for index, _, _ in held) == {0: 2, 1: 2}
        assert sorted(slot for _, slot, _ in held) == [0, 0, 1, 1]
        procs[2].send_signal(signal.SIGKILL)  # dies without releasing anything itself
        procs[2].wait(timeout=30)
        newcomer, claim = _holder(tmp_path, ids)
        assert claim == held[2]
        _stop([newcomer])
    finally:
        _stop([p for i, p in enumerate(procs) if i != 2])


def test_gpus_are_named_by_uuid_whatever_order_a_process_sees_them_in(tmp_path):
    first, (index, slot, name) = _holder(tmp_path, ["gpu-u1", "gpu-u2"])
    assert (index, slot, name) == (0, 0, "gpu-u1.0.lock")
    reversed_view, claim = _holder(tmp_path, ["gpu-u2", "gpu-u1"])  # CUDA_VISIBLE_DEVICES=1,0
    assert claim == (0, 0, "gpu-u2.0.lock")  # its cuda:0 is the other GPU, free
    only_one, claim = _holder(tmp_path, ["gpu-u1"])  # CUDA_VISIBLE_DEVICES=0
    assert claim == (0, 1, "gpu-u1.1.lock")  # shares the first one
    _stop([first, reversed_view, only_one])


def test_claim_needs_gpus(tmp_path):
    with pytest.raises(ValueError, match="no GPUs"):
        claim_gpu([], tmp_path)


@pytest.fixture
def fake_gpus(monkeypatch, tmp_path):
    """torch.cuda as a machine with `state.count` GPUs would answer; claims under tmp_path."""
    state = SimpleNamespace(count=3, current=0, set_to=[])
    monkeypatch.setenv(devices.LOCK_DIR_ENV, str(tmp_path / "locks"))
    monkeypatch.setattr(devices, "_CLAIM", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state.count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state.current)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: state.set_to.append(index))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=f"uuid-{i}"))
    yield state
    if devices._CLAIM is not None:
        devices._CLAIM.release()


def test_a_process_claims_once_and_makes_its_gpu_current(fake_gpus, tmp_path):
    taken = claim_gpu(["gpu-uuid-0"], tmp_path / "locks")  # another process has the first GPU
    assert gpu_for_process() == torch.device("cuda", 1)
    assert gpu_for_process() == torch.device("cuda", 1)  # the same claim, not a second one
    assert fake_gpus.set_to == [1]
    assert sorted(p.name for p in (tmp_path / "locks").iterdir()) == ["gpu-uuid-0.0.lock", "gpu-uuid-1.0.lock"]
    taken.release()


def test_a_process_beyond_the_gpus_shares_one_and_says_so(fake_gpus, tmp_path, caplog):
    fake_gpus.count = 2
    taken = [claim_gpu(["gpu-uuid-0", "gpu-uuid-1"], tmp_path / "locks") for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="encoder.devices"):
        assert gpu_for_process() == torch.device("cuda", 0)
    assert "shares cuda:0 with 1 other process" in caplog.text
    for claim in taken:
        claim.release()


def test_one_gpu_needs_no_claim(fake_gpus, tmp_path):
    fake_gpus.count, fake_gpus.current = 1, 0
    assert gpu_for_process() == torch.device("cuda", 0)
    assert not (tmp_path / "locks").exists() and fake_gpus.set_to == []


def test_an_unusable_lock_directory_leaves_the_current_gpu_with_a_warning(fake_gpus, monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv(devices.LOCK_DIR_ENV, str(blocker))
    fake_gpus.current = 2
    with caplog.at_level(logging.WARNING, logger="encoder.devices"):
        assert gpu_for_process() == torch.device("cuda", 2)
    assert "could not claim a GPU" in caplog.text and fake_gpus.set_to == []


def test_pick_device_claims_for_a_bare_cuda_only(fake_gpus):
    assert pick_device("cuda:2") == torch.device("cuda", 2)
    assert fake_gpus.set_to == []  # a GPU named by the caller is taken as named
    assert pick_device("auto") == torch.device("cuda", 0)
    assert fake_gpus.set_to == [0]


@pytest.mark.parametrize(
    ("gpus", "processes", "expected"),
    [
        (1, 1, None),
        (1, 4, "4 worker processes on 1 GPU: up to 4 model copies per GPU (--workers 1 keeps one each)"),
        (4, 4, None),
        (8, 1, "8 GPUs and the run starts 1 worker process(es), one GPU each: 7 stay idle (--workers 8"),
        (2, 5, "5 worker processes on 2 GPUs: up to 3 model copies per GPU (--workers 2"),
    ],
)
def test_spread_note(gpus, processes, expected):
    note = spread_note(gpus, processes)
    assert note == expected if expected is None else expected in note


_PICKER = textwrap.dedent("""
    import sys
    from encoder.model import pick_device
    print(pick_device("cuda"), flush=True)
    sys.stdin.read()
""")


@pytest.mark.gpu
def test_processes_asking_for_cuda_get_gpus_of_their_own_while_there_are_enough(tmp_path):
    env = dict(os.environ, **{devices.LOCK_DIR_ENV: str(tmp_path / "locks")})
    procs = [subprocess.Popen([sys.executable, "-c", _PICKER], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    try:
        picked = [proc.stdout.readline().strip() for proc in procs]
    finally:
        _stop(procs)
    if torch.cuda.device_count() == 1:
        assert picked == ["cuda:0", "cuda:0"] and not (tmp_path / "locks").exists()
    else:
        assert sorted(picked) == ["cuda:0", "cuda:1"]
