"""Beam's local worker processes forked from one warm interpreter, not started as fresh ones.

The local runner starts each worker process of a run (`lookalike embed --workers k`, one per GPU on a host of k) as
`python -m apache_beam.runners.worker.sdk_worker_main` once the launcher has built the pipeline, and each imports
Beam, torch and lookalike before its first bundle: ~2.6 s of a 200-image run's ~3.8 s of pipeline on a 2-core CPU
(BENCHMARKS.md, "Worker processes forked warm"). A `Forker` is one process that imports them once, from the run's
start (the command line starts it before its own imports), and forks a worker for each that asks. Beam's worker
command becomes a small client (`Forker.command`, the standard library only) that hands the forker its environment,
working directory and standard streams, and exits with its worker's status. The worker dies with its client (Beam
kills the client to stop a worker) and with the forker (which dies with the launcher).

A forked worker is a fresh interpreter in all but its imports: the forker runs no thread of its own, sets up no
logging, computes nothing and never touches CUDA, so each worker makes a CUDA context of its own. Where that does not
hold (the worker finds torch's CUDA unusable in a fork: something the forker imported asked for the GPUs), and
wherever the forker cannot be reached (it failed to start or to import, or died), the client runs Beam's own command
instead: the run goes on at the old speed.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import selectors
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Sequence

__all__ = ["BEAM_WORKER", "FORKED_ENV", "PRELOAD", "Forker", "connect", "serve", "start_early", "take"]

BEAM_WORKER = "apache_beam.runners.worker.sdk_worker_main"  # what the local runner runs as each worker process
PRELOAD = (BEAM_WORKER, "pipelines.embed")  # what an embed run's worker imports before its first bundle
FORKED_ENV = "LOOKALIKE_FORKED_WORKER"  # set in a forked worker's environment ("1")
READY_S = 10.0  # how long `command` waits for the forker to listen before its clients run Beam's own command

_HEADER = struct.Struct("!Q")  # a request's length; the request is JSON: the client's environment and directory
_WORKING = b"W"  # the worker to the client: forked and running
_EXITED = b"S"  # the forker to the client: the worker's exit status follows (`_STATUS`)
_STATUS = struct.Struct("!i")
_REFUSED = 75  # a fork's exit status when it cannot be a worker (CUDA unusable in it): its client runs Beam's own
_PR_SET_PDEATHSIG = 1
_SOCKET_DIR_MAX = 100  # a Unix socket's path holds 107 bytes at most (Linux); "/socket" takes 7 of them
_CUDA_ERROR_NOT_INITIALIZED = 3


# ---------------------------------------------------------------- the launcher's side


class Forker:
    """A process that has imported `preload` and forks Beam worker processes for the runner (`command`).

    `close` stops it and kills any worker it forked that is still running; so does this process's exit (the forker
    reads its end of a pipe from here). `main` names the module whose `main(argv)` a worker runs (tests give their
    own).
    """

    def __init__(self, preload: Sequence[str] = PRELOAD, main: str = BEAM_WORKER) -> None:
        self._dir = tempfile.mkdtemp(prefix="lookalike-forker-")  # private (0700): only this user reaches the socket
        if len(os.fsencode(self._dir)) > _SOCKET_DIR_MAX and os.path.isdir("/tmp"):  # a long $TMPDIR
            os.rmdir(self._dir)
            self._dir = tempfile.mkdtemp(prefix="lookalike-forker-", dir="/tmp")
        self.path = os.path.join(self._dir, "socket")
        self.main = main
        code = f"import sys; sys.path[:] = {sys.path!r}; from {__name__} import serve; serve(sys.argv[1:])"
        # stdin: its end of a pipe that closes when this process ends; stdout: a line once it listens.
        self._proc = subprocess.Popen([sys.executable, "-c", code, self.path, main, *preload], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE)  # fmt: skip
        self._ready: bool | None = None

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def command(self) -> str:
        """The shell command Beam runs for each worker process: a worker forked from this forker, else the module
        `main` started fresh (as Beam starts it). Waits until the forker listens (`READY_S` at most)."""
        self.wait_listening()
        code = f"import sys; sys.path[:] = {sys.path!r}; from {__name__} import connect; connect({self.path!r}, {self.main!r})"  # fmt: skip
        return shlex.join([sys.executable, "-c", code])

    def wait_listening(self, timeout_s: float = READY_S) -> bool:
        """Whether the forker listens for workers' requests (imports may still run: requests wait for them)."""
        if self._ready is None:
            import select

            ready = select.select([self._proc.stdout], [], [], timeout_s)[0]
            self._ready = bool(ready) and self._proc.stdout.readline() == b"listening\n"
        return self._ready

    def alive(self) -> bool:
        return self._proc.poll() is None

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop the forker (its workers still running are killed) and remove its socket; killed if it has not ended
        within `timeout_s` (0: at once; its workers then die with it, `PR_SET_PDEATHSIG`). An idle forker ends in
        milliseconds; one still importing cannot hear the close, and a run that failed early need not wait for it."""
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Forker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_EARLY: dict[tuple[str, ...], Forker] = {}


def start_early(preload: Sequence[str] = PRELOAD) -> None:
    """Start a forker of `preload` now, for the next `take` of it: a command line that will run worker processes
    calls this before its own imports, so the forker's run beside them."""
    key = tuple(preload)
    if key not in _EARLY:
        try:
            _EARLY[key] = forker = Forker(preload)
        except OSError:  # `take` tries again, and says why where it fails too
            return
        # Never taken (the command failed first, say): killed at exit, not waited for; it has no workers, and
        # its imports would hold a user's mistake's exit for their rest (~2.6 s here).
        atexit.register(forker.close, 0.0)


def take(preload: Sequence[str] = PRELOAD) -> Forker:
    """The forker of `preload` started early (`start_early`) if it still runs, else one started now. The caller
    closes it."""
    forker = _EARLY.pop(tuple(preload), None)
    if forker is not None:
        atexit.unregister(forker.close)
        if forker.alive():
            return forker
        forker.close()
    return Forker(preload)


# ---------------------------------------------------------------- the worker command's side


def connect(path: str, main: str = BEAM_WORKER) -> None:
    """Beam's worker command: become the exit status of a worker forked by the forker at `path`; where none can be
    forked, run `python -m <main>` in this process instead, as Beam's own command would."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            request = json.dumps({"env": dict(os.environ), "cwd": os.getcwd()}).encode()
            socket.send_fds(sock, [_HEADER.pack(len(request))], [0, 1, 2])  # its standard streams: the worker's
            sock.sendall(request)
            answer = _read(sock, 1)
            if answer == _WORKING:  # from here the run is the worker's: its status is this process's
                reply = _read(sock, 1 + _STATUS.size)
                if reply[:1] != _EXITED:
                    print("lookalike: the worker forker stopped before its worker ended", file=sys.stderr)
                    sys.exit(1)
                sys.exit(_exit_code(_STATUS.unpack(reply[1:])[0]))
            if not answer:  # (a fork that could not be a worker said why)
                print("lookalike: a worker process starts fresh, not forked: the forker stopped", file=sys.stderr)
    except OSError as err:
        print(f"lookalike: a worker process starts fresh, not forked: {err}", file=sys.stderr)
    os.execv(sys.executable, [sys.executable, "-m", main])  # not forked: Beam's own worker, in this process


def _read(sock: socket.socket, n: int) -> bytes:
    """`n` bytes from `sock`, or fewer where it closed first."""
    data = b""
    while len(data) < n and (piece := sock.recv(n - len(data))):
        data += piece
    return data


def _exit_code(status: int) -> int:
    """A worker's `os.waitstatus_to_exitcode` as a shell reports it (128 + the signal that ended it)."""
    return 128 - status if status < 0 else status


# ---------------------------------------------------------------- the forker


def serve(argv: Sequence[str]) -> None:
    """The forker process: `argv` is its socket's path, the module a worker runs (`main(argv)`), and the modules
    to import first. Forks a worker for each request until its stdin ends (the launcher closed it or ended)."""
    path, main, *preload = argv
    # The terminal's Ctrl-C reaches the whole process group: the workers end their way, and the forker with the
    # launcher, which ends its way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
    except OSError as err:  # its clients run Beam's own command
        print(f"lookalike: worker processes start fresh, not forked (a socket at {path}: {err})", file=sys.stderr)
        return
    try:
        _serve(listener, main, preload)
    finally:  # its socket and their folder: the launcher removes them too, unless it was killed
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
            os.rmdir(os.path.dirname(path))


def _serve(listener: socket.socket, main: str, preload: Sequence[str]) -> None:
    listener.listen(128)  # requests wait here while the imports below run
    sys.stdout.write("listening\n")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # what it prints from now on: on the terminal, not the pipe
    import gc
    import importlib

    try:
        os.close(os.pidfd_open(os.getpid()))  # how it learns a worker ended (Linux 5.3 on)
        for name in preload:
            importlib.import_module(name)
    except Exception as err:  # its clients run Beam's own command
        print(f"lookalike: worker processes start fresh, not forked ({type(err).__name__}: {err})", file=sys.stderr)
        return
    if _cuda_driver_initialised():  # a fork could not use it: CUDA calls there fail
        print(f"lookalike: worker processes start fresh, not forked (importing {', '.join(preload)} initialised "
              "the CUDA driver)", file=sys.stderr)  # fmt: skip
        return
    gc.freeze()  # what the imports made is never collected: the workers share its pages instead of copying them
    workers: dict[int, socket.socket] = {}  # pid → its client's connection
    events = selectors.DefaultSelector()
    events.register(sys.stdin.fileno(), selectors.EVENT_READ, ("launcher", 0))
    events.register(listener, selectors.EVENT_READ, ("request", 0))
    try:
        while True:
            for key, _ in events.select():
                kind, pid = key.data
                if kind == "launcher" and not os.read(key.fd, 4096):
                    return
                if kind == "request":
                    _take_request(listener, events, workers, main)
                elif kind == "client":  # the client ended (its runner killed it) before its worker: end that too
                    events.unregister(key.fileobj)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                elif kind == "exit":
                    events.unregister(key.fd)
                    os.close(key.fd)
                    _report_exit(pid, workers.pop(pid), events)
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in workers:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _cuda_driver_initialised() -> bool:
    """Whether this process has initialised the CUDA driver (`cuInit`): asked of the driver only if it is loaded
    already (a process that never touched CUDA has not loaded it)."""
    import ctypes

    try:
        driver = ctypes.CDLL("libcuda.so.1", mode=os.RTLD_NOLOAD)
    except OSError:
        return False
    context = ctypes.c_void_p()
    return driver.cuCtxGetCurrent(ctypes.byref(context)) != _CUDA_ERROR_NOT_INITIALIZED


def _take_request(listener: socket.socket, events: selectors.BaseSelector, workers: dict[int, socket.socket],
                  main: str) -> None:  # fmt: skip
    """Read one request and fork its worker; a request that cannot be read is dropped (its client runs Beam's own
    command)."""
    conn, _ = listener.accept()
    fds: list[int] = []
    try:
        conn.settimeout(5.0)
        head, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        if len(head) != _HEADER.size or len(fds) != 3:
            raise ValueError("a malformed request")
        request = json.loads(_read(conn, _HEADER.unpack(head)[0]))
        conn.settimeout(None)
    except (OSError, ValueError):
        conn.close()
        for fd in fds:
            os.close(fd)
        return
    forker = os.getpid()
    pid = os.fork()
    if pid == 0:  # the worker
        code = _REFUSED
        try:
            for key in list(events.get_map().values()):  # the forker's ends: its socket, other workers' clients
                if isinstance(key.fileobj, socket.socket):  # (its stdin: the client's takes its place)
                    key.fileobj.close()
                elif key.data[0] == "exit":
                    os.close(key.fd)
            events.close()
            code = _be_worker(conn, fds, request, main, forker)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    for fd in fds:
        os.close(fd)
    workers[pid] = conn
    events.register(conn, selectors.EVENT_READ, ("client", pid))
    exited = os.pidfd_open(pid)
    events.register(exited, selectors.EVENT_READ, ("exit", pid))


def _report_exit(pid: int, conn: socket.socket, events: selectors.BaseSelector) -> None:
    """Reap the worker `pid` and send its client the status."""
    _, status = os.waitpid(pid, 0)
    with contextlib.suppress(KeyError, ValueError):
        events.unregister(conn)
    with contextlib.suppress(OSError):
        conn.sendall(_EXITED + _STATUS.pack(os.waitstatus_to_exitcode(status)))
    conn.close()


def _be_worker(conn: socket.socket, fds: list[int], request: dict, main: str, forker: int) -> int:
    """In the fork: take the client's streams, environment and directory, run `main`, and give its exit status."""
    import ctypes
    import importlib

    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # ends with the forker...
    if os.getppid() != forker:  # ...which may have ended already
        return _REFUSED
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"], **{FORKED_ENV: "1"})
    torch = sys.modules.get("torch")
    in_bad_fork = getattr(getattr(torch, "_C", None), "_cuda_isInBadFork", None)
    if in_bad_fork is not None and in_bad_fork():  # CUDA was initialised in the forker: no GPU in a fork
        print("lookalike: a worker process starts fresh, not forked: CUDA was initialised in the forker",
              file=sys.stderr)  # fmt: skip
        return _REFUSED
    conn.sendall(_WORKING)
    conn.close()
    sys.argv = [main]
    code = 0
    try:
        # What a worker sets up as it starts, which the forker's imports did not know to (`pipelines.worker_plugin`)
        if plugin := sys.modules.get("pipelines.worker_plugin"):
            plugin.start_worker()
        importlib.import_module(main).main(sys.argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    # What a fresh interpreter does as it ends: its threads joined, then its `atexit` hooks run.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return code
