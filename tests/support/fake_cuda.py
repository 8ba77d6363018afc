"""Stand-ins for CUDA's streams and events that log what the code under test asks of them, so GPU stream logic
runs on the CPU: which stream each step runs on, which events it records and waits for, which streams wait for
which, and which tensors it hands to another stream (`record_stream`).

    cuda = FakeCuda(monkeypatch)
    ... code that calls torch.cuda.Stream / stream / current_stream / Event, Tensor.record_stream ...
    assert cuda.log == [(thread name, stream name, what), ...]
"""

from __future__ import annotations

import contextlib
import itertools
import threading

import torch


class FakeCuda:
    """`events_done`: whether an event has completed as soon as it is recorded (`Event.query`); if not, it completes
    when something waits for it on the host (`Event.synchronize`, logged)."""

    def __init__(self, monkeypatch, events_done: bool = True) -> None:
        self.log: list[tuple[str, ...]] = []
        self._current = threading.local()
        numbers = itertools.count(1)
        fake = self

        class Stream:
            def __init__(self, name: str | torch.device | None = None, priority: int = 0) -> None:
                self.name = name if isinstance(name, str) else f"stream {next(numbers)}"

            def wait_event(self, event) -> None:
                fake.note(self, "waits for", event.stream.name)

            def wait_stream(self, other) -> None:
                fake.note(self, "waits for", other.name)

        class Event:
            def record(self, stream) -> None:
                self.stream, self.done = stream, events_done
                fake.note(stream, "event")

            def query(self) -> bool:
                return self.done

            def synchronize(self) -> None:
                fake.note(self.stream, "host waits for event")
                self.done = True

        self.Stream, self.default = Stream, Stream("default")
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "stream", self.on)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current())
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: fake.note(stream, "holds"))

    def note(self, stream, *what: str) -> None:
        """Log `what` happens on `stream`, from the calling thread."""
        self.log.append((threading.current_thread().name, stream.name, *what))

    def current(self):
        return getattr(self._current, "stream", self.default)

    @contextlib.contextmanager
    def on(self, stream):
        before, self._current.stream = self.current(), stream
        try:
            yield
        finally:
            self._current.stream = before
