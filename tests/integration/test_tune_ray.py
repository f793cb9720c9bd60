"""A 2-trial Ray Tune search over the window width, then `raylab analyze` and `--resume`.
An interrupted search and its resume run against object storage
(tests/integration/test_object_storage.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylab.cli import main

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def experiment(python_api_example) -> Path:
    """The search of examples/python_api.py: `raylab tune` and `raylab.tune` are one path
    (skill on the small sample, window in [30, 60], 2 trials of 1 epoch)."""
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
