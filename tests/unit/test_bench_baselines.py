"""The plain-torch baselines of `raylab bench` (no Ray): they run, and a failing rank
ends the DDP baseline with an error instead of a hang."""

from __future__ import annotations

import numpy as np
import pytest

from raylab import config as cfglib
from raylab.bench import skill as bench
from raylab.methods.skill import SkillConfig


def _cfg(epochs: int = 2) -> SkillConfig:
    return cfglib.apply_overrides(SkillConfig(), {
        "window": 30, "optim.epochs": epochs, "optim.batch_size": 16,
        "model.channels": [8, 8, 8], "model.fc_dim": 8})


def _windows(n: int = 96) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 30, 76)).astype(np.float32), rng.integers(0, 3, n)


def test_plain_ddp_two_processes_report_a_rate():
    x, y = _windows()
    rate = bench._plain_ddp_samples_per_s(_cfg(), x, y, world=2)
    assert np.isfinite(rate) and rate > 0


def test_a_failing_rank_raises():
    x, y = _windows()
    y = y + 10  # labels outside the 3 classes: cross-entropy fails in every rank
    with pytest.raises(RuntimeError, match="plain DDP baseline: a process exited with"):
        bench._plain_ddp_samples_per_s(_cfg(), x, y, world=2)


def test_benches_find_the_shared_data_beside_the_checkout(monkeypatch) -> None:
    """The real-data default is ../shared/data from the repository root (a bench that
    silently fell back to a synthetic sample once measured the wrong data)."""
    from pathlib import Path

    from raylab.bench import shared_data

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.delenv("RAYLAB_DATA", raising=False)
    assert shared_data() == repo.parent / "shared" / "data"
    monkeypatch.setenv("RAYLAB_DATA", "/somewhere/else")
    assert shared_data() == Path("/somewhere/else")
