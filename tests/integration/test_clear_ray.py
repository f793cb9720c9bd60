"""CLEAR end to end on the shared local Ray cluster: the stream actor feeding TorchTrainer
workers, and the actor killed mid-stream (Ray restarts it from its state file).

A tiny stream (4 labelled buckets of ~24 synthetic shape images at 16 px) and timm's
``test_resnet`` keep each run to seconds; the protocol, restarts and strategies are tested
without Ray in tests/unit/test_clear_runner.py and tests/unit/test_stream.py.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from raylab.cli import main

pytestmark = pytest.mark.ray

SMALL = ["--set", "model=test_resnet", "--set", "input_size=16", "--set", "optim.epochs=2",
         "--set", "optim.batch_size=8"]


@pytest.fixture(scope="module")
def stream(tiny_clear_stream: Path) -> Path:
    return tiny_clear_stream


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_worker_clear_run(ray_cluster, stream: Path, tmp_path: Path) -> None:
    from raylab.engine.checkpoint import load_checkpoint

    rc = main(["train", "clear", "--data", str(stream), *SMALL, "--set", "strategy=ewc",
               "--workers", "2", "--storage", str(tmp_path), "--name", "c"])
    assert rc == 0
    exp = tmp_path / "c"
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["buckets"] == [1, 2, 3, 4] and summary["row"] == "EWC"
    assert all(v is not None for row in summary["matrix"] for v in row)
    assert set(summary["metrics"]) == {"in_domain", "next_domain", "accuracy",
                                       "backward_transfer", "forward_transfer"}
    rows = _rows(exp / "run")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]  # one report per bucket
    assert all(r["replica_drift"] == 0.0 for r in rows)  # both learners stayed identical
    # Each report carries the row of R the stream recorded for that bucket.
    for r in rows:
        assert [r[f"test_acc_bucket_{b}"] for b in (1, 2, 3, 4)] == \
            summary["matrix"][r["epoch"] - 1]
    state = json.loads((exp / "run" / "stream_state.json").read_text())
    assert state["finished"] == [1, 2, 3, 4] and state["cursor"] == 4
    checkpoint = load_checkpoint(summary["checkpoint"])
    assert checkpoint["extra"]["stream"]["bucket"] == 4
    assert checkpoint["extra"]["strategy"]["strategy"] == "ewc"
    terms = checkpoint["extra"]["strategy"]["terms"]  # EWC's Fisher and anchor weights
    assert terms and all(torch.is_tensor(v) for t in terms for part in t.values()
                         for v in part.values())
    for name in ("report.md", "accuracy_matrix.png", "config.yaml"):
        assert (exp / name).stat().st_size > 0, name


def test_killing_the_stream_actor_mid_stream_gives_the_same_matrix(
        ray_cluster, stream: Path, tmp_path: Path) -> None:
    import ray

    from raylab.methods.clear.method import stream_actor_name
    from raylab.runtime.actors import NAMESPACE

    common = ["--data", str(stream), *SMALL, "--set", "strategy=er", "--workers", "1",
              "--storage", str(tmp_path)]
    assert main(["train", "clear", *common, "--name", "ref"]) == 0
    reference = json.loads((tmp_path / "ref" / "summary.json").read_text())["matrix"]

    run = tmp_path / "killed" / "run"
    killed_at: list[list[int]] = []

    def kill_after_two_buckets() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed_at:
            try:
                finished = json.loads((run / "stream_state.json").read_text())["finished"]
            except (OSError, ValueError):
                finished = []
            if len(finished) >= 2:
                actor = ray.get_actor(stream_actor_name(run), namespace=NAMESPACE)
                ray.kill(actor, no_restart=False)  # a crash: Ray restarts it
                killed_at.append(finished)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_after_two_buckets, daemon=True)
    killer.start()
    assert main(["train", "clear", *common, "--name", "killed"]) == 0
    killer.join(timeout=5)
    assert killed_at and len(killed_at[0]) < 4, "the actor was not killed mid-stream"
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["matrix"] == reference
    assert [r["epoch"] for r in _rows(run)] == [1, 2, 3, 4]  # none twice, none skipped
