"""Beam's local worker processes forked warm (`pipelines.worker_fork`), with a stand-in worker module
(`tests.support.fork_probe`) in Beam's SDK worker's place. The runs through Beam are `test_embed.py`'s
`test_several_worker_processes`."""

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipelines import worker_fork
from pipelines.worker_fork import Forker

PROBE = "tests.support.fork_probe"
# Where a worker started fresh finds the probe (Beam's own command finds Beam's worker the same way: installed).
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}


def _gone(pid: int, within_s: float = 10.0) -> bool:
    """Whether the process `pid` ends (and is reaped) within `within_s`."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def _run(command: str, cwd, **env) -> tuple[subprocess.CompletedProcess, dict]:
    """Beam's way: the command through a shell, in its environment; and the probe's report."""
    done = subprocess.run(command, shell=True, cwd=cwd, env={**ENV, **env}, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    return done, json.loads(done.stdout.splitlines()[0])


@pytest.fixture(scope="module")
def forker():
    with Forker(preload=[PROBE, "torch", "pipelines.worker_plugin"], main=PROBE) as forker:
        yield forker


def test_a_worker_is_forked_from_the_warm_process_with_the_clients_streams_environment_and_directory(forker, tmp_path):
    done, report = _run(forker.command, tmp_path, PROBE="asked")
    assert done.returncode == 0, done.stderr
    assert report["ppid"] == forker.pid and report["forked"] == "1"  # forked: a child of the forker
    assert report["preloaded"] and report["heavy_imported"]  # what the forker imported, the worker has
    assert report["worker_set_up"]  # and it set up as a Beam worker, which the forker's import could not know it was
    assert report["probe"] == "asked" and report["cwd"] == str(tmp_path)  # the client's environment and directory
    assert report["argv"] == [PROBE]
    # Its output came through the client's own stdout (captured here); its status is the client's.
    done, _ = _run(forker.command, tmp_path, PROBE_EXIT="3")
    assert done.returncode == 3


def test_workers_asking_at_once_are_each_forked(forker, tmp_path):
    command = shlex.split(forker.command)
    clients = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                                env={**ENV, "PROBE": str(k), "PROBE_SLEEP_S": "0.5"}) for k in range(3)]  # fmt: skip
    reports = [json.loads(c.communicate(timeout=60)[0].splitlines()[0]) for c in clients]
    assert [c.returncode for c in clients] == [0, 0, 0]
    assert sorted(r["probe"] for r in reports) == ["0", "1", "2"]
    assert len({r["pid"] for r in reports}) == 3 and {r["ppid"] for r in reports} == {forker.pid}


def test_the_terminals_ctrl_c_leaves_the_forker_to_end_with_its_launcher(forker, tmp_path):
    """Ctrl-C reaches the whole process group: the workers end their way, the forker goes on until the launcher
    ends (were it to end first, its workers would be killed with it, each run's ending uncertain)."""
    forker.wait_listening()
    os.kill(forker.pid, signal.SIGINT)
    time.sleep(0.2)
    assert forker.alive()
    done, report = _run(forker.command, tmp_path)
    assert done.returncode == 0 and report["forked"] == "1"


def test_without_its_forker_the_command_starts_the_worker_fresh_as_beam_would(tmp_path):
    forker = Forker(preload=[PROBE], main=PROBE)
    command = forker.command
    forker.close()
    done, report = _run(command, tmp_path, PROBE="asked", PROBE_EXIT="4")
    assert done.returncode == 4
    assert report["forked"] is None and not report["preloaded"] and not report["heavy_imported"]
    assert report["probe"] == "asked" and report["cwd"] == str(tmp_path)
    assert "starts fresh, not forked" in done.stderr


def test_a_forker_that_cannot_import_its_modules_leaves_the_workers_to_start_fresh(tmp_path, capfd):
    with Forker(preload=["no_such_module_here"], main=PROBE) as forker:
        done, report = _run(forker.command, tmp_path)
    assert done.returncode == 0 and report["forked"] is None and not report["preloaded"]
    assert "starts fresh, not forked" in done.stderr
    # The forker says why once, on the launcher's stderr.
    assert "not forked (ModuleNotFoundError: No module named 'no_such_module_here')" in capfd.readouterr().err


def test_a_fork_where_cuda_cannot_run_starts_the_worker_fresh_instead(tmp_path):
    with Forker(preload=[PROBE, "tests.support.cuda_forked_badly"], main=PROBE) as forker:
        done, report = _run(forker.command, tmp_path, PROBE_EXIT="5")
    assert done.returncode == 5 and report["forked"] is None and report["ppid"] != forker.pid
    assert "CUDA was initialised in the forker" in done.stderr


def test_a_killed_client_takes_its_worker_with_it(forker, tmp_path):
    client = subprocess.Popen(shlex.split(forker.command), cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                              env={**ENV, "PROBE_SLEEP_S": "60"})  # fmt: skip
    worker = json.loads(client.stdout.readline())["pid"]
    client.kill()  # as Beam stops a worker it waits on no more
    client.wait()
    assert _gone(worker)
    client.stdout.close()


@pytest.mark.parametrize("end", ["closed", "killed"])
def test_a_forker_that_ends_takes_its_workers_with_it_and_their_clients_fail(tmp_path, end):
    forker = Forker(preload=[PROBE], main=PROBE)
    client = subprocess.Popen(shlex.split(forker.command), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**ENV, "PROBE_SLEEP_S": "60"})  # fmt: skip
    worker = json.loads(client.stdout.readline())["pid"]
    if end == "killed":  # no chance to end them: they end with it all the same
        os.kill(forker.pid, signal.SIGKILL)
    forker.close()
    assert _gone(worker)
    _, err = client.communicate(timeout=30)
    assert client.returncode == 1 and "the worker forker stopped before its worker ended" in err


def test_the_forker_and_its_workers_end_with_the_process_that_started_them(tmp_path):
    launcher = textwrap.dedent(f"""
        import json, os, shlex, subprocess, sys
        from pipelines.worker_fork import Forker
        forker = Forker(preload=[{PROBE!r}], main={PROBE!r})
        client = subprocess.Popen(shlex.split(forker.command), stdout=subprocess.PIPE, text=True,
                                  env={{**os.environ, "PROBE_SLEEP_S": "60"}})
        print(json.dumps({{"forker": forker.pid, "worker": json.loads(client.stdout.readline())["pid"],
                           "socket": forker.path}}), flush=True)
        os._exit(0)  # no close: as a launcher killed
    """)
    done = subprocess.run([sys.executable, "-c", launcher], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env=ENV)  # fmt: skip
    pids = json.loads(done.stdout)
    assert _gone(pids["forker"]) and _gone(pids["worker"])
    assert not os.path.exists(os.path.dirname(pids["socket"]))  # nor is its socket's folder left behind


def test_a_forker_started_early_is_taken_once_and_a_dead_one_replaced(monkeypatch):
    monkeypatch.setattr(worker_fork, "_EARLY", {})
    worker_fork.start_early([PROBE])
    early = worker_fork._EARLY[(PROBE,)]
    taken = worker_fork.take([PROBE])
    assert taken is early and taken.alive()
    again = worker_fork.take([PROBE])  # nothing early left: a new one
    assert again is not early
    for forker in (taken, again):
        forker.close()
    worker_fork.start_early([PROBE])
    dead = worker_fork._EARLY[(PROBE,)]
    os.kill(dead.pid, signal.SIGKILL)
    dead._proc.wait()
    replaced = worker_fork.take([PROBE])
    assert replaced is not dead and replaced.alive()
    replaced.close()


def test_a_command_that_fails_before_taking_its_forker_ends_without_waiting_for_its_imports(tmp_path):
    """A user's mistake found after the forker started early (a catalog or model that cannot be used) ends the
    command at once: the forker, still importing, is killed at exit, not waited for."""
    launcher = textwrap.dedent("""
        import sys
        from pipelines import worker_fork
        worker_fork.start_early(["tests.support.slow_import"])
        print(worker_fork._EARLY[("tests.support.slow_import",)].pid, flush=True)
        sys.exit("error: a user's mistake")
    """)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", launcher], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env=ENV)  # fmt: skip
    took = time.monotonic() - started
    assert done.returncode == 1 and "a user's mistake" in done.stderr
    assert took < 4.0, took  # the interpreter's start and exit; waiting 5 s for the forker took 5.1 here
    assert _gone(int(done.stdout), within_s=1.0)


@pytest.mark.parametrize(("loaded", "answer", "initialised"), [(False, None, False), (True, 3, False), (True, 0, True)])
def test_the_forker_knows_whether_an_import_initialised_the_cuda_driver(monkeypatch, loaded, answer, initialised):
    """A forker whose imports called `cuInit` (libcuda loaded, a context asked for without CUDA_ERROR_NOT_INITIALIZED)
    forks no worker: CUDA fails in a fork of it. Without a GPU here, the driver is stood in."""
    import ctypes

    class Driver:
        def cuCtxGetCurrent(self, context):
            return answer

    def cdll(name, mode=0):
        assert name == "libcuda.so.1" and mode == os.RTLD_NOLOAD  # never loads the driver itself
        if not loaded:
            raise OSError("libcuda.so.1: cannot open shared object file")
        return Driver()

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    assert worker_fork._cuda_driver_initialised() is initialised


@pytest.mark.gpu
def test_forked_workers_embed_on_cuda_each_with_a_context_of_its_own(demo_catalog, tiny_model, tmp_path):
    """The forker imports torch's CUDA build without touching CUDA: each forked worker makes its own context (were it
    made in the forker, CUDA would fail in the forks, or the workers would start fresh)."""
    from pipelines.embed import EmbedConfig, run_embed

    result = run_embed(EmbedConfig(catalog=str(demo_catalog.manifest), model=str(tiny_model), out=str(tmp_path),
                                   device="cuda", workers=2, batch_size=32))  # fmt: skip
    assert result.counts == {"items_in": 100, "embedded": 95, "reused": 0, "dead_lettered": 5}
    assert result.manifest["worker_processes"] == {"embedding": 2, "forked": 2}
    assert result.manifest["batches"]["decoded_on_gpu"] > 0


def test_a_long_temp_directory_puts_the_socket_in_tmp_where_its_path_fits(tmp_path, monkeypatch):
    """A Unix socket's path holds 107 bytes at most: a deep $TMPDIR would leave every worker to start fresh."""
    import tempfile

    deep = tmp_path / ("x" * 60) / ("y" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    with Forker(preload=[PROBE], main=PROBE) as forker:
        assert forker.path.startswith("/tmp/lookalike-forker-") and forker.wait_listening()
        done, report = _run(forker.command, tmp_path)
    assert done.returncode == 0 and report["forked"] == "1"
    assert not list(deep.iterdir())  # the directory it first made there is gone


def test_a_forker_that_cannot_listen_says_why_in_a_line(tmp_path):
    code = f"from pipelines.worker_fork import serve; serve([{str(tmp_path / 'missing' / 'socket')!r}, {PROBE!r}])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=ENV)
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert "worker processes start fresh, not forked (a socket at" in done.stderr


def test_a_forker_that_cannot_start_leaves_the_run_to_beams_workers(monkeypatch, caplog, tmp_path):
    from pipelines import embed

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(worker_fork.tempfile, "mkdtemp", refused)
    monkeypatch.setattr(worker_fork, "_EARLY", {})
    worker_fork.start_early([PROBE])  # quietly nothing: the run's `take` says why
    assert worker_fork._EARLY == {}
    assert embed._take_forker() is None
    assert "worker processes start fresh, not forked: the forker could not start" in caplog.text
