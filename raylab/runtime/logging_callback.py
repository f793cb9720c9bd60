"""A Train callback that writes every report to ``metrics.jsonl`` and TensorBoard.

Ray Train keeps only the metrics reported with a checkpoint (RAY_NOTES); this callback
runs in the Train controller and sees every report, so the per-epoch history survives.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any

import ray.train


class MetricsLogger(ray.train.UserCallback):
    """Append rank-0 metrics to ``<folder>/metrics.jsonl`` and TensorBoard scalars."""

    def __init__(self, folder: str, step_key: str = "epoch") -> None:
        self.folder = folder
        self.step_key = step_key
        self._writer = None

    def _tb(self) -> Any:
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(Path(self.folder) / "tensorboard"))
        return self._writer

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
                     ) -> None:
        if not metrics or metrics[0].get("replayed_from_checkpoint"):
            return  # nothing new: the final metrics of a restored, finished run
        row = dict(metrics[0])
        if checkpoint is not None:
            row["checkpoint_path"] = checkpoint.path
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        with open(Path(self.folder) / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
        step = int(row.get(self.step_key, 0))
        writer = self._tb()
        for key, value in row.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                writer.add_scalar(key, float(value), step)
        writer.flush()
