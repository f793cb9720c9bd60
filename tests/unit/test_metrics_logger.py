"""The Train callback that keeps every report: metrics.jsonl + TensorBoard per run."""

from __future__ import annotations

import json
import os

from raylab.engine.loop import REPLAYED, RUN
from raylab.runtime.logging_callback import MetricsLogger


def test_reports_append_to_the_runs_own_folder(tmp_path):
    logger = MetricsLogger(str(tmp_path))
    logger.after_report(None, [{RUN: "trial_1", "epoch": 1, "loss": 0.5}], None)
    logger.after_report(None, [{RUN: "trial_1", "epoch": 2, "loss": 0.25}], None)
    rows = [json.loads(line) for line in (tmp_path / "trial_1" / "metrics.jsonl").open()]
    assert [(r["epoch"], r["loss"]) for r in rows] == [(1, 0.5), (2, 0.25)]
    assert os.listdir(tmp_path / "trial_1" / "tensorboard")


def test_a_replayed_final_report_is_not_written_again(tmp_path):
    logger = MetricsLogger(str(tmp_path))
    logger.after_report(None, [{RUN: "run", "epoch": 3, "loss": 0.1}], None)
    logger.after_report(None, [{RUN: "run", "epoch": 3, "loss": 0.1, REPLAYED: True}], None)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
