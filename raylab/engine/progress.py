"""What a person sees while a run trains: a line per epoch and, on a terminal, a bar.

The loop calls a :class:`Progress` (on the chief worker only); :class:`ConsoleProgress`
prints. With Ray Train the chief worker is another process, so the runtime forwards these
calls to the driver, which replays them on its own :class:`ConsoleProgress`: every call is
``progress.<name>(*plain values)`` for that reason.

    epoch  3/30  train_loss 0.4123  test_accuracy 0.8731  3,104 samples/s  4.1 s  ETA 1m50s
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO


class Progress:
    """Receives the loop's progress; the base class ignores it."""

    def run_start(self, run: str, epochs: int, start_epoch: int) -> None:
        """A run (a fold, or the whole run) starts at ``start_epoch`` (0-based) of ``epochs``."""

    def epoch_start(self, epoch: int, batches: int | None) -> None:
        """Epoch ``epoch`` (0-based) starts; ``batches`` this worker will take, if known."""

    def advance(self, rows: int) -> None:
        """One training step of ``rows`` rows (this worker's) is done."""

    def epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Epoch ``epoch`` ended with ``metrics`` (what was reported)."""

    def message(self, text: str) -> None:
        """A line for the person watching (e.g. a warning from a worker)."""


NullProgress = Progress


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


class ConsoleProgress(Progress):
    """Prints one line per epoch (epoch/N, the chosen metrics, throughput, time, ETA) and,
    when ``stream`` is a terminal, a bar within the epoch that the line replaces.

    Args:
        keys: Metric keys to show, in order, when a report has them (the method's loss
            and main metric); others are left to metrics.jsonl and TensorBoard.
        throughput_key: The report's rows/s key (``samples_per_s``, ``img_per_s``).
        stream: Where to print (default stdout).
        bar: Draw the in-epoch bar; default: when ``stream`` is a terminal.
        scale: Rows per ``advance`` row of the chief worker in the whole job (the world
            size), so that the bar's rate is the job's, as in the epoch line.
        show_run: Start each line with the run's name (when an experiment has several
            runs, e.g. cross-validation folds).
    """

    def __init__(self, keys: Sequence[str] = ("train_loss",),
                 throughput_key: str = "samples_per_s", stream: TextIO | None = None,
                 bar: bool | None = None, unit: str = "samples", scale: int = 1,
                 show_run: bool = True) -> None:
        self.keys = list(keys)
        self.throughput_key = throughput_key
        self.stream = stream or sys.stdout
        self.bar = self._is_tty() if bar is None else bar
        self.unit = unit
        self.scale = scale
        self.show_run = show_run
        self.run = ""
        self.epochs = 0
        self.start_epoch = 0
        self.epoch_seconds: list[float] = []
        self._epoch_t0 = 0.0
        self._batches: int | None = None
        self._done = 0
        self._rows = 0
        self._drawn = 0.0
        self._bar_visible = False

    def _is_tty(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:  # a closed stream
            return False

    def run_start(self, run: str, epochs: int, start_epoch: int) -> None:
        self.run, self.epochs, self.start_epoch = run, epochs, start_epoch
        self.epoch_seconds = []
        if start_epoch:
            self._print(f"{self._prefix()}resuming at epoch {start_epoch + 1}/{epochs}")

    def epoch_start(self, epoch: int, batches: int | None) -> None:
        self._epoch_t0 = time.perf_counter()
        self._batches, self._done, self._rows = batches, 0, 0
        self._drawn = 0.0

    def advance(self, rows: int) -> None:
        self._done += 1
        self._rows += rows
        if not self.bar:
            return
        now = time.perf_counter()
        if now - self._drawn < 0.1 and self._done != self._batches:
            return
        self._drawn = now
        elapsed = max(now - self._epoch_t0, 1e-9)
        rate = self._rows * self.scale / elapsed
        if self._batches:
            frac = min(self._done / self._batches, 1.0)
            filled = int(frac * 24)
            bar = f"[{'#' * filled}{'.' * (24 - filled)}] {self._done}/{self._batches}"
        else:
            bar = f"{self._done} steps"
        self._write(f"\r{self._prefix()}epoch {self._epoch_label()}  {bar}  "
                    f"{rate:,.0f} {self.unit}/s\x1b[K")
        self._bar_visible = True

    def epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        seconds = time.perf_counter() - self._epoch_t0 if self._epoch_t0 else 0.0
        self.epoch_seconds.append(seconds)
        parts = [f"{self._prefix()}epoch {self._epoch_label(epoch)}"]
        parts += [f"{key} {_value(metrics[key])}" for key in self.keys if key in metrics]
        rate = metrics.get(self.throughput_key)
        if isinstance(rate, (int, float)):
            parts.append(f"{rate:,.0f} {self.unit}/s")
        parts.append(f"{seconds:.1f}s")
        left = self.epochs - epoch - 1
        if left > 0:
            # The first epoch carries the start-up (workers, data pipeline): leave it out of
            # the estimate once there is another.
            recent = self.epoch_seconds[1:] or self.epoch_seconds
            parts.append(f"ETA {format_duration(sum(recent) / len(recent) * left)}")
        self._print("  ".join(parts))

    def message(self, text: str) -> None:
        self._print(text)

    # ------------------------------------------------------------------ output

    def _epoch_label(self, epoch: int | None = None) -> str:
        shown = (self.start_epoch + len(self.epoch_seconds) if epoch is None else epoch) + 1
        width = len(str(self.epochs))
        return f"{shown:>{width}}/{self.epochs}"

    def _prefix(self) -> str:
        return f"[{self.run}] " if self.run and self.show_run else ""

    def _print(self, line: str) -> None:
        if self._bar_visible:
            self._write("\r\x1b[K")
            self._bar_visible = False
        self._write(line + "\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not stop training
            pass
