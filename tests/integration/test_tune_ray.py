"""A 2-trial Ray Tune search over the window width, then `raylab analyze` and `--resume`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raylab.cli import main

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def experiment(python_api_example) -> Path:
    """The search of examples/python_api.py: `raylab tune` and `raylab.tune` are one path
    (skill on the small sample, window in [30, 60], 2 trials of 2 epochs, grace 1)."""
    root, _ = python_api_example
    return root / "runs" / "skill-search"


def test_tune_reports_every_trial(experiment: Path) -> None:
    report = json.loads((experiment / "analysis" / "analysis.json").read_text())
    rows = report["rows"]
    assert len(rows) == 2
    assert {r["window"] for r in rows} <= {30, 60}
    for r in rows:
        assert 0.0 <= r["val_accuracy"] <= 1.0
        assert r["epochs"] >= 1
    best = report["best"]
    assert best["val_accuracy"] == max(r["val_accuracy"] for r in rows)
    assert Path(best["checkpoint"], "state.pt").is_file()
    assert report["best_config"]["window"] == best["window"]


def test_analyze_prints_table_and_writes_plots(experiment: Path, capsys) -> None:
    assert main(["analyze", str(experiment)]) == 0
    out = capsys.readouterr().out
    assert "val_accuracy" in out and "best config:" in out
    for name in ("report.md", "metric_vs_knobs.png", "learning_curves.png"):
        assert (experiment / "analysis" / name).stat().st_size > 0, name


def test_resume_of_a_finished_search_reruns_nothing(experiment: Path) -> None:
    runs_before = sorted(p.name for p in (experiment / "train_runs").iterdir())
    lines_before = {p.name: (p / "metrics.jsonl").read_text()
                    for p in (experiment / "train_runs").iterdir()}
    assert main(["tune", "--resume", str(experiment)]) == 0
    assert sorted(p.name for p in (experiment / "train_runs").iterdir()) == runs_before
    for name, text in lines_before.items():
        assert (experiment / "train_runs" / name / "metrics.jsonl").read_text() == text



def _wait_for(predicate, timeout: float, proc) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"raylab tune exited early with {proc.returncode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the search to progress")
        time.sleep(0.5)


def test_interrupted_search_resumes_without_rerunning(ray_cluster, sample_shards,
                                                      tiny_jigsaws_shards,
                                                      tmp_path: Path) -> None:
    """SIGINT while the second (last) trial runs; --resume finishes it, keeps the first.

    The search starts its own local cluster while this process's cluster is up and a
    `raylab train` with a third one runs beside it: three commands on one machine. Its
    second trial can only start once Train has released the first one's CPUs, which
    took the State API of the right cluster (it hung before, README "Several commands").
    """
    storage, exp = tmp_path / "store", tmp_path / "store" / "exp"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    log = (tmp_path / "tune.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "raylab", "tune", "skill", "--data", str(sample_shards),
         "--set", "optim.epochs=2", "--set", "step=10", "--space", "window=[30,60]",
         "--trials", "2", "--grace-period", "2", "--storage", str(storage), "--name", "exp"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    beside_log = (tmp_path / "beside.log").open("w")
    beside = subprocess.Popen(
        [sys.executable, "-m", "raylab", "train", "skill", "--data",
         str(tiny_jigsaws_shards), "--set", "optim.epochs=1", "--set", "cv=holdout",
         "--workers", "0", "--storage", str(tmp_path / "beside"), "--name", "b"],
        stdout=beside_log, stderr=subprocess.STDOUT, env=env)
    runs = exp / "train_runs"

    def finished_runs() -> list[Path]:
        return [p for p in runs.glob("*/metrics.jsonl") if '"epoch": 2' in p.read_text()]

    def second_trial_running() -> bool:
        started = [p for p in runs.glob("*/metrics.jsonl") if p.stat().st_size > 0]
        return len(finished_runs()) == 1 and len(started) == 2

    _wait_for(lambda: runs.is_dir() and second_trial_running(), 240, proc)
    first = finished_runs()[0]
    first_text = first.read_text()
    interrupted = next(p for p in runs.glob("*/metrics.jsonl") if p != first)
    logged_before = len(interrupted.read_text().splitlines())
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, (tmp_path / "tune.log").read_text()[-2000:]
    exit_s = time.monotonic() - t0
    assert "raylab tune --resume" in (tmp_path / "tune.log").read_text()

    t0 = time.monotonic()
    assert main(["tune", "--resume", str(exp)]) == 0
    epochs = [json.loads(x)["epoch"] for x in interrupted.read_text().splitlines()]
    # Time lost (BENCHMARKS.md): the epochs the interrupted trial logged and ran again
    # (those after its last checkpoint), plus the driver's exit and the resume's start-up.
    print(f"\ninterrupted search: driver exited {exit_s:.1f} s after SIGINT; resume ran "
          f"{time.monotonic() - t0:.1f} s for the rest; the interrupted trial had logged "
          f"{logged_before} epoch(s), repeated {len(epochs) - len(set(epochs))}")
    report = json.loads((exp / "analysis" / "analysis.json").read_text())
    assert len(report["rows"]) == 2
    assert all(r["epochs"] == 2 for r in report["rows"])
    assert first.read_text() == first_text  # the finished trial was not run again
    assert beside.wait(timeout=300) == 0, (tmp_path / "beside.log").read_text()[-2000:]
    assert (tmp_path / "beside" / "b" / "summary.json").is_file()
