"""The skill method end to end on the shared local Ray cluster, through the CLI.

Train runs are the expensive part (~15 s each on 2 cores), so each test here earns its
run: one fold, a few epochs, on the synthetic sample whose skill signal is learnable.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylab.cli import main

pytestmark = pytest.mark.ray

CHANCE = 1 / 3


def _train(shards: Path, storage: Path, name: str, *extra: str) -> int:
    # step=10 triples the windows of the short synthetic trials: enough steps per epoch
    # for a few epochs to learn.
    return main(["train", "skill", "--data", str(shards), "--set", "folds=[supertrial1]",
                 "--set", "step=10", "--storage", str(storage), "--name", name, *extra])


def _epochs_logged(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines]


#: The shard folder each experiment trained on.
SHARDS_OF: dict[Path, Path] = {}


@pytest.fixture(scope="module")
def one_worker_run(ray_cluster, sample_shards, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    assert _train(sample_shards, storage, "w1", "--set", "optim.epochs=4",
                  "--workers", "1") == 0
    SHARDS_OF[storage / "w1"] = sample_shards
    return storage / "w1"


def test_train_writes_report_and_learns(one_worker_run: Path) -> None:
    exp = one_worker_run
    summary = json.loads((exp / "summary.json").read_text())
    for name in ("report.md", "confusion.png", "config.yaml"):
        assert (exp / name).stat().st_size > 0, name
    assert [f["fold"] for f in summary["folds"]] == ["supertrial1"]
    assert summary["mean_accuracy"] > CHANCE + 0.2
    # Every test window scored exactly once: the confusion counts add up to the windows of
    # supertrial 1 (trial 1 of every subject), counted here from the shards' frame counts
    # with the window rule (T - W) // L + 1 for W=60, L=10.
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(SHARDS_OF[exp].glob("*.parquet")),
                          columns=["task", "trial", "n_frames"]).to_pylist()
    windows = sum((r["n_frames"] - 60) // 10 + 1 for r in table
                  if r["task"] == "Suturing" and r["trial"] == 1)
    assert sum(map(sum, summary["pooled"]["confusion"])) == windows
    assert summary["folds"][0]["windows"] == windows
    assert _epochs_logged(exp / "supertrial1") == [1, 2, 3, 4]
    assert list((exp / "supertrial1").glob("checkpoint_*-supertrial1")), "no checkpoint kept"
    assert (exp / "supertrial1" / "model" / "state.pt").is_file()  # the final model
    assert any((exp / "supertrial1" / "tensorboard").iterdir())


def test_two_workers_match_one(one_worker_run: Path, sample_shards: Path,
                               tmp_path: Path) -> None:
    assert _train(sample_shards, tmp_path, "w2", "--set", "optim.epochs=4",
                  "--workers", "2") == 0
    one = json.loads((one_worker_run / "summary.json").read_text())["mean_accuracy"]
    two = json.loads((tmp_path / "w2" / "summary.json").read_text())["mean_accuracy"]
    # Same global batch and schedule, so quality matches up to shuffling noise.
    assert two > CHANCE + 0.2
    assert abs(one - two) < 0.15
    # The two workers held identical weights after every epoch (gradients all-reduced).
    rows = [json.loads(x) for x in
            (tmp_path / "w2" / "supertrial1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["replica_drift"] for r in rows] == [0.0] * 4


def test_rerun_with_same_name_resumes_from_checkpoint(ray_cluster, sample_shards: Path,
                                                      tmp_path: Path) -> None:
    assert _train(sample_shards, tmp_path, "r", "--set", "optim.epochs=2",
                  "--set", "checkpoint_every=1", "--workers", "0") == 0
    assert _epochs_logged(tmp_path / "r" / "supertrial1") == [1, 2]
    # A longer schedule under the same name continues at epoch 3, not from scratch.
    assert _train(sample_shards, tmp_path, "r", "--set", "optim.epochs=4",
                  "--set", "checkpoint_every=1", "--workers", "0") == 0
    assert _epochs_logged(tmp_path / "r" / "supertrial1") == [1, 2, 3, 4]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    # A finished run restored again trains nothing and reports its saved final metrics
    # (what a Tune trial interrupted after its last checkpoint relies on).
    assert _train(sample_shards, tmp_path, "r", "--set", "optim.epochs=4",
                  "--set", "checkpoint_every=1", "--workers", "0") == 0
    assert _epochs_logged(tmp_path / "r" / "supertrial1") == [1, 2, 3, 4]
    again = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert again["folds"][0]["accuracy"] == summary["folds"][0]["accuracy"]


def test_assess_streams_a_recording(one_worker_run: Path, sample_shards: Path,
                                    tmp_path: Path, capsys) -> None:
    summary = json.loads((one_worker_run / "summary.json").read_text())
    checkpoint = summary["folds"][0]["checkpoint"]
    manifest = json.loads((sample_shards / "manifest.json").read_text())
    raw = Path(manifest["extra"]["source"]) / "Suturing" / "kinematics" / "AllGestures"
    recording = sorted(raw.glob("Suturing_D001.txt*"))[0]
    out = tmp_path / "timeline.png"
    assert main(["assess", "--checkpoint", checkpoint, str(recording), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "estimate: " in text and "latency per window" in text
    assert out.stat().st_size > 0


def test_a_request_the_local_cluster_cannot_hold_is_refused_at_once(
        ray_cluster, sample_shards: Path, tmp_path: Path, capsys) -> None:
    # Without the check, Ray waits forever and prints a controller traceback every 60 s.
    assert _train(sample_shards, tmp_path, "huge", "--workers", "64") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "--workers 64 x --cpus-per-worker 1 needs 64 CPUs in all (the cluster has" in \
        err[0] and "this local cluster cannot grow" in err[0]
    assert not (tmp_path / "huge" / "run" / "metrics.jsonl").exists()
