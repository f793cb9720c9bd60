"""The Python API end to end on the shared local Ray: the example script under
``examples/`` trains, tunes and analyzes as a notebook would, and gets back the paths
and objects its docstring promises."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import raylab

pytestmark = pytest.mark.ray


def test_example_script_trains_tunes_and_analyzes(python_api_example) -> None:
    tmp_path, made = python_api_example
    run = made["run"]
    assert isinstance(run, raylab.RunResult) and run.method == "skill"
    assert run.experiment == str(tmp_path / "runs" / "skill")
    on_disk = json.loads(Path(run.experiment, "summary.json").read_text())
    assert on_disk["mean_accuracy"] == run.summary["mean_accuracy"]
    folds = [f["fold"] for f in on_disk["folds"]]
    assert sorted(run.models) == sorted(folds) and len(folds) == 3  # trials 1-3: 3 folds
    for model in run.models.values():
        assert Path(model, "state.pt").is_file() and Path(model, "meta.json").is_file()
    assert run.report == str(Path(run.experiment, "report.md"))
    assert Path(run.report).stat().st_size > 0
    assert len(list(Path(run.tensorboard).glob("*/tensorboard/events.out.tfevents.*"))) == 3

    grid = made["grid"]
    assert len(grid) == 2 and grid.num_errors == 0
    assert Path(grid.experiment_path) == tmp_path / "runs" / "skill-search"
    analysis = made["analysis"]
    assert len(analysis["rows"]) == 2
    assert {r["window"] for r in analysis["rows"]} <= {30, 60}
    best = grid.get_best_result(scope="all")
    assert analysis["best"]["trial"] == best.metrics["trial_id"]
    assert analysis["best"]["last_val_accuracy"] == pytest.approx(best.metrics["val_accuracy"])
    assert analysis["best"]["val_accuracy"] == pytest.approx(
        best.metrics_dataframe["val_accuracy"].max())
    assert analysis["best_config"]["window"] == best.config["window"]
    assert Path(analysis["report"]).is_file()


def test_a_local_cluster_tells_its_processes_its_own_state_api(ray_cluster) -> None:
    """What lets two raylab commands (two local clusters) run on one machine: Ray Train's
    placement-group cleaner asks the State API at RAY_API_SERVER_ADDRESS, this cluster's
    dashboard, instead of looking for "the" cluster on the machine and finding two."""
    url = ray_cluster._private.worker.global_worker.node.address_info["webui_url"]
    assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://{url}"
