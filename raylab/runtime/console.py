"""Progress from Ray Train workers to the person at the driver.

The chief worker's loop calls an :class:`~raylab.engine.progress.Progress`; in a Train
worker process that is a :class:`WorkerProgress`, which writes each call (and the
``raylab`` logger's warnings of every worker) into Ray's key-value store (the GCS, which
every Ray process already talks to: no actor, so no process to start). The driver's
:class:`ProgressRelay` reads them a few times a second and replays them on its own console.
Ray's own worker logs stay out of the driver's output unless ``--verbose`` (see
:func:`raylab.runtime.cluster.ensure_ray`); raylab's warnings still arrive this way.

Keys, under the namespace ``raylab-progress`` and a per-run token: ``<token>:n`` (how many
events), ``<token>:<i>`` (event ``i``: a progress call as JSON), ``<token>:bar`` (the
epoch's ``epoch_start`` event, and its steps and rows so far, rewritten at most every
:data:`ADVANCE_EVERY_S` seconds).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any

from ray.experimental import internal_kv

from raylab.engine.progress import Progress

#: Seconds between two in-epoch updates a worker writes.
ADVANCE_EVERY_S = 0.5
NAMESPACE = "raylab-progress"


def _put(key: str, value: Any) -> None:
    internal_kv._internal_kv_put(key, json.dumps(value), namespace=NAMESPACE)


def _get(key: str) -> Any:
    raw = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
    return None if raw is None else json.loads(raw)


class WorkerProgress(Progress):
    """A worker's side: writes each progress call for the driver; never waits for it."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.count = 0
        self._epoch_event = -1  # the index of the epoch_start event of the epoch in progress
        self._steps = 0
        self._rows = 0
        self._written = 0.0
        self._lock = threading.Lock()  # warnings may come from other threads

    def _event(self, name: str, *args: Any) -> None:
        try:
            with self._lock:
                _put(f"{self.token}:{self.count}", [name, list(args)])
                self.count += 1
                _put(f"{self.token}:n", self.count)
        except Exception:  # the cluster is going away: progress is not worth failing a run
            pass

    def _bar(self) -> None:
        try:
            _put(f"{self.token}:bar", [self._epoch_event, self._steps, self._rows])
        except Exception:
            pass

    def run_start(self, run: str, epochs: int, start_epoch: int) -> None:
        self._event("run_start", run, epochs, start_epoch)

    def epoch_start(self, epoch: int, batches: int | None) -> None:
        self._steps = self._rows = 0
        self._epoch_event = self.count
        self._event("epoch_start", epoch, batches)

    def advance(self, rows: int) -> None:
        self._steps += 1
        self._rows += rows
        now = time.monotonic()
        if now - self._written >= ADVANCE_EVERY_S:
            self._written = now
            self._bar()

    def epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        plain = {k: v for k, v in metrics.items()
                 if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        self._event("epoch_end", epoch, plain)

    def message(self, text: str) -> None:
        self._event("message", text)


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
    """The driver's side: a thread that replays what the workers write on ``console``
    until :meth:`close`. Use as a context manager around ``fit()``; pass :attr:`token` to
    the workers."""

    def __init__(self, console: Progress, interval_s: float = 0.5) -> None:
        self.console = console
        self.interval_s = interval_s
        self.token = uuid.uuid4().hex
        self._seen = 0
        self._bar: tuple[int, int, int] = (-1, 0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="raylab-progress",
                                        daemon=True)

    def __enter__(self) -> ProgressRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _replay(self) -> None:
        count = _get(f"{self.token}:n") or 0
        while self._seen < count:
            index = self._seen
            event = _get(f"{self.token}:{index}")
            self._seen += 1
            if event is not None:
                name, args = event
                getattr(self.console, name)(*args)
                if name == "epoch_start":
                    self._bar = (index, 0, 0)
        bar = _get(f"{self.token}:bar")
        if bar is not None and bar[0] == self._bar[0] and bar[1] > self._bar[1]:
            # The steps since the last look; the console draws the bar from them.
            steps, rows = bar[1] - self._bar[1], bar[2] - self._bar[2]
            for _ in range(steps - 1):
                self.console.advance(0)
            self.console.advance(rows)
            self._bar = (bar[0], bar[1], bar[2])

    def _pump(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._replay()
            except Exception:  # the cluster is going away: stop quietly
                return

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self._replay()  # what arrived since the last look
            for key in internal_kv._internal_kv_list(self.token, namespace=NAMESPACE):
                internal_kv._internal_kv_del(key, namespace=NAMESPACE)
        except Exception:
            pass
