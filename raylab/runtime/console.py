"""Progress from Ray Train workers to the person at the driver.

The chief worker's loop calls an :class:`~raylab.engine.progress.Progress`; in a Train
worker process that is a :class:`WorkerProgress`, which posts each call (and the
``raylab`` logger's warnings of every worker) to a small inbox actor. The driver's
:class:`ProgressRelay` empties the inbox a few times a second and replays the calls on its
own console. Ray's own worker logs stay out of the driver's output unless ``--verbose``
(see :func:`raylab.runtime.cluster.ensure_ray`); raylab's warnings still arrive this way.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray

from raylab.engine.progress import Progress

#: Seconds between two in-epoch updates a worker posts (each is one actor call).
ADVANCE_EVERY_S = 0.25


class _Inbox:
    """Collects posted calls until the driver takes them."""

    def __init__(self) -> None:
        self.items: list[tuple[str, tuple[Any, ...]]] = []

    def post(self, item: tuple[str, tuple[Any, ...]]) -> None:
        self.items.append(item)

    def take(self) -> list[tuple[str, tuple[Any, ...]]]:
        items, self.items = self.items, []
        return items


class WorkerProgress(Progress):
    """A worker's side: forwards progress calls to the driver's inbox without waiting.

    ``advance`` calls are summed and posted at most every :data:`ADVANCE_EVERY_S`
    seconds; the rest go one by one, in order (Ray runs one caller's calls to an actor in
    the order they were made).
    """

    def __init__(self, inbox: Any) -> None:
        self.inbox = inbox
        self._rows = 0
        self._steps = 0
        self._posted = 0.0

    def _post(self, name: str, *args: Any) -> None:
        try:
            self.inbox.post.remote((name, args))
        except Exception:  # the driver went away: progress is not worth failing a run
            pass

    def _flush(self) -> None:
        if self._steps:
            self._post("advance_many", self._steps, self._rows)
            self._rows = self._steps = 0

    def run_start(self, run: str, epochs: int, start_epoch: int) -> None:
        self._post("run_start", run, epochs, start_epoch)

    def epoch_start(self, epoch: int, batches: int | None) -> None:
        self._post("epoch_start", epoch, batches)

    def advance(self, rows: int) -> None:
        self._rows += rows
        self._steps += 1
        now = time.monotonic()
        if now - self._posted >= ADVANCE_EVERY_S:
            self._posted = now
            self._flush()

    def epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        self._flush()
        plain = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        self._post("epoch_end", epoch, plain)

    def message(self, text: str) -> None:
        self._post("message", text)


class ForwardWarnings(logging.Handler):
    """Sends the ``raylab`` logger's warnings of a worker to the driver's console."""

    def __init__(self, progress: WorkerProgress, rank: int) -> None:
        super().__init__(logging.WARNING)
        self.progress = progress
        self.rank = rank

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.message(f"worker {self.rank}: {record.levelname.lower()}: "
                                  f"{record.getMessage()}")
        except Exception:
            self.handleError(record)


class ProgressRelay:
    """The driver's side: an inbox actor, and a thread that replays what arrives on
    ``console`` until :meth:`close`. Use as a context manager around ``fit()``."""

    def __init__(self, console: Progress, interval_s: float = 0.2) -> None:
        self.console = console
        self.interval_s = interval_s
        self.inbox = ray.remote(num_cpus=0)(_Inbox).options(
            max_concurrency=1).remote()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="raylab-progress",
                                        daemon=True)

    def __enter__(self) -> ProgressRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _replay(self) -> None:
        for name, args in ray.get(self.inbox.take.remote()):
            if name == "advance_many":
                steps, rows = args
                for _ in range(max(steps - 1, 0)):
                    self.console.advance(0)
                self.console.advance(rows)
            else:
                getattr(self.console, name)(*args)

    def _pump(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._replay()
            except Exception:  # the actor is gone (cluster shutting down): stop quietly
                return

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self._replay()  # what arrived since the last pass
        except Exception:
            pass
        try:
            ray.kill(self.inbox)
        except Exception:
            pass
