"""A 2-trial Ray Tune search over the window width, then `raylab analyze` and `--resume`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylab.cli import main

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def experiment(ray_cluster, sample_shards, tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("tune")
    rc = main(["tune", "skill", "--data", str(sample_shards), "--set", "optim.epochs=2",
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


def test_interrupted_search_resumes_without_rerunning_finished_trials(
        ray_cluster, sample_shards: Path, tmp_path: Path) -> None:
    """Ctrl-C the driver after the first trial finished; --resume runs only the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    exp = tmp_path / "exp"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    proc = subprocess.Popen(
        [sys.executable, "-m", "raylab.cli", "tune", "skill", "--data", str(sample_shards),
         "--set", "optim.epochs=2", "--space", "window=[30,60]", "--trials", "3",
         "--storage", str(tmp_path), "--name", "exp"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    finished: list[Path] = []
    try:
        while time.time() < deadline and not finished:
            time.sleep(1)
            finished = [p for p in (exp / "train_runs").glob("*/metrics.jsonl")
                        if len(p.read_text().splitlines()) == 2]
        assert finished, "no trial finished within 240 s"
        time.sleep(2)  # let Tune record the trial as terminated
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = {p.parent.name: p.read_text() for p in finished}

    assert main(["tune", "--resume", str(exp)]) == 0
    report = json.loads((exp / "analysis" / "analysis.json").read_text())
    assert len(report["rows"]) == 3
    assert all(r["epochs"] == 2 for r in report["rows"])
    for trial_id, text in done_before.items():  # finished trials were not trained again
        assert (exp / "train_runs" / trial_id / "metrics.jsonl").read_text() == text
