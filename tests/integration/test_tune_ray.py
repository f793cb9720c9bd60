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
def experiment(ray_cluster, small_jigsaws_shards, tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("tune")
    rc = main(["tune", "skill", "--data", str(small_jigsaws_shards), "--set", "optim.epochs=2",
               "--space", "window=[30,60]", "--trials", "2", "--grace-period", "1",
               "--storage", str(storage), "--name", "exp"])
    assert rc == 0
    return storage / "exp"


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
                                                      tmp_path: Path) -> None:
    """SIGINT while the second (last) trial runs; --resume finishes it, keeps the first."""
    storage, exp = tmp_path / "store", tmp_path / "store" / "exp"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    log = (tmp_path / "tune.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "raylab", "tune", "skill", "--data", str(sample_shards),
         "--set", "optim.epochs=2", "--set", "step=10", "--space", "window=[30,60]",
         "--trials", "2", "--grace-period", "2", "--storage", str(storage), "--name", "exp"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
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
