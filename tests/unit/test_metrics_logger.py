"""The Train callback that keeps every report: metrics.jsonl + TensorBoard per run, and for
a remote experiment a local mirror that is uploaded and then collected."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from raylab.data import fs
from raylab.engine.loop import REPLAYED, RUN
from raylab.runtime.logging_callback import MIRROR_PREFIX, MetricsLogger, drop_orphan_mirrors


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


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_remote_experiments_mirror_is_uploaded_and_collected(tmp_path, monkeypatch):
    """The local mirror of an s3:// experiment is uploaded after each report; it goes
    with the callback, and a mirror whose process ended without cleaning up (Ray's
    controller can) is removed by the next one made on the machine."""
    uploaded = tmp_path / "bucket"
    monkeypatch.setattr(fs, "upload_tree", lambda local, uri: shutil.copytree(
        local, uploaded / uri.removeprefix("s3://b/runs/"), dirs_exist_ok=True))
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    orphan = temp / f"{MIRROR_PREFIX}{_dead_pid()}-x1"
    live = temp / f"{MIRROR_PREFIX}{os.getpid()}-x2"
    unrelated = temp / f"{MIRROR_PREFIX}notapid"
    for folder in (orphan, live, unrelated):
        (folder / "run").mkdir(parents=True)

    logger = MetricsLogger("s3://b/runs")
    logger.after_report(None, [{RUN: "run", "epoch": 1, "loss": 1.0}], None)
    mirror = Path(logger._mirror)
    assert mirror.parent == temp and mirror.name.startswith(f"{MIRROR_PREFIX}{os.getpid()}-")
    assert json.loads((uploaded / "run" / "metrics.jsonl").read_text())["loss"] == 1.0
    assert not orphan.exists() and live.exists() and unrelated.exists()
    del logger
    gc.collect()
    assert not mirror.exists()
    assert drop_orphan_mirrors(str(temp)) == []  # the live process's folder stays
