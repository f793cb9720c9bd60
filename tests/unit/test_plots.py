"""Every plot writes a non-empty image atomically (no temporary files left behind)."""

from __future__ import annotations

import numpy as np
import pytest

from raylab.errors import ConfigError, DataError
from raylab.plots import (
    plot_confusion,
    plot_learning_curves,
    plot_metric_vs_knobs,
    plot_timeline,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_only_png(folder, name):
    assert sorted(p.name for p in folder.iterdir()) == [name]
    data = (folder / name).read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_plot_confusion(tmp_path):
    out = plot_confusion([[5, 1, 0], [2, 3, 1], [0, 0, 0]], ["N", "I", "E"],
                         tmp_path / "cm.png", title="fold 1")
    assert out == tmp_path / "cm.png"
    _assert_only_png(tmp_path, "cm.png")
    plot_confusion(np.eye(2, dtype=int), ["a", "b"], tmp_path / "cm.png", normalise=False)
    _assert_only_png(tmp_path, "cm.png")  # overwritten in place


def test_plot_timeline(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=20)
    plot_timeline(np.arange(20) + 1.0, probs, ["N", "I", "E"], tmp_path / "sub" / "t.png")
    _assert_only_png(tmp_path / "sub", "t.png")
    running = np.cumsum(probs, axis=0) / np.arange(1, 21)[:, None]
    plot_timeline(np.arange(20), probs, ["N", "I", "E"], tmp_path / "sub" / "t.png",
                  running=running, title="trial 4")
    with pytest.raises(DataError, match="probs"):
        plot_timeline(np.arange(3), probs, ["N", "I", "E"], tmp_path / "x.png")


def test_plot_metric_vs_knobs(tmp_path):
    rows = [
        {"val_acc": 0.5 + 0.01 * i, "optim": {"lr": 10.0 ** -(1 + i % 4)},
         "window": 30 * (1 + i % 3), "arch": ["small", "large"][i % 2]}
        for i in range(12)
    ]
    rows.append({"window": 60})  # no metric: skipped
    plot_metric_vs_knobs(rows, ["optim.lr", "window", "arch", "missing"], "val_acc",
                         tmp_path / "knobs.png")
    _assert_only_png(tmp_path, "knobs.png")
    with pytest.raises(DataError, match="no run"):
        plot_metric_vs_knobs([{"a": 1}], ["a"], "val_acc", tmp_path / "k2.png")
    with pytest.raises(ConfigError):
        plot_metric_vs_knobs(rows, [], "val_acc", tmp_path / "k2.png")


def test_plot_learning_curves(tmp_path):
    curves = {"trial_a": ([1, 2, 3], [0.4, 0.6, 0.7]), "trial_b": ([1, 2], [0.3, 0.35])}
    plot_learning_curves(curves, "val_acc", tmp_path / "lc.png")
    _assert_only_png(tmp_path, "lc.png")
    with pytest.raises(DataError, match="2 epochs but 1 values"):
        plot_learning_curves({"x": ([1, 2], [0.1])}, "val_acc", tmp_path / "bad.png")


def test_bad_suffix_leaves_nothing(tmp_path):
    with pytest.raises(ConfigError, match="suffix"):
        plot_learning_curves({"a": ([1], [1.0])}, "m", tmp_path / "lc.nope")
    assert list(tmp_path.iterdir()) == []
