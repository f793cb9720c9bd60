"""A Train callback that writes every report to ``metrics.jsonl`` and TensorBoard.

Ray Train keeps only the metrics reported with a checkpoint (RAY_NOTES); this callback
runs in the Train controller and sees every report, so the per-epoch history survives.
Each report names its run (``run``: ``run``, a fold, a Tune trial), whose folder under the
experiment receives it: ``<experiment>/<run>/metrics.jsonl`` and ``.../tensorboard/``.
When the experiment is in object storage (``s3://``, ...), both are written to a local
mirror and the run's folder is uploaded after each report (a few small files per epoch).
Ray Train offers a user callback no end-of-run hook, and the controller's process may end
without running Python's finalizers, so a mirror is named after its process and removed
by the next mirror made on that machine once its process is gone.
"""

from __future__ import annotations

import json
import numbers
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import ray.train

from raylab.data import fs
from raylab.engine.loop import REPLAYED, RUN

#: A remote experiment's local mirror: ``<tmp>/raylab-metrics-<pid>-<random>``.
MIRROR_PREFIX = "raylab-metrics-"


class MetricsLogger(ray.train.UserCallback):
    """Append rank-0 metrics to ``<experiment>/<run>/metrics.jsonl`` and TensorBoard."""

    def __init__(self, experiment: str, step_key: str = "epoch") -> None:
        self.experiment = experiment
        self.step_key = step_key
        self._writers: dict[str, Any] = {}
        self._mirror: str | None = None  # the local copy of a remote experiment

    def _local_root(self) -> Path:
        if not fs.is_uri(self.experiment):
            return Path(self.experiment)
        if self._mirror is None:
            drop_orphan_mirrors()
            self._mirror = tempfile.mkdtemp(prefix=f"{MIRROR_PREFIX}{os.getpid()}-")
            # Everything in it is uploaded after each report: it goes with the callback
            # or its process (when that exits normally), the writers closed first.
            weakref.finalize(self, _drop_mirror, self._writers, self._mirror)
        return Path(self._mirror)

    def _tb(self, folder: Path) -> Any:
        key = str(folder)
        if key not in self._writers:
            from tensorboardX import SummaryWriter

            self._writers[key] = SummaryWriter(str(folder / "tensorboard"))
        return self._writers[key]

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
                     ) -> None:
        if not metrics or metrics[0].get(REPLAYED):
            return  # nothing new: the final metrics of a restored, finished run
        row = dict(metrics[0])
        if checkpoint is not None:
            row["checkpoint_path"] = fs.as_uri(checkpoint.path, self.experiment)
        run = str(row.get(RUN) or "run")
        folder = self._local_root() / run
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
        step = int(row.get(self.step_key, 0))
        writer = self._tb(folder)
        for key, value in row.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                writer.add_scalar(key, float(value), step)
        writer.flush()
        if fs.is_uri(self.experiment):
            fs.upload_tree(folder, fs.join(self.experiment, run))


def _drop_mirror(writers: dict[str, Any], mirror: str) -> None:
    for writer in writers.values():
        writer.close()
    shutil.rmtree(mirror, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def drop_orphan_mirrors(root: str | None = None) -> list[str]:
    """Remove the mirrors under ``root`` (the temp folder) whose process has ended; their
    files were uploaded after each report. Returns the removed folders."""
    root = root or tempfile.gettempdir()
    removed = []
    for entry in os.scandir(root):
        if not entry.name.startswith(MIRROR_PREFIX) or not entry.is_dir():
            continue
        pid = entry.name[len(MIRROR_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed
