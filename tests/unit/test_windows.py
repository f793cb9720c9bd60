"""Sliding windows, channel statistics and the Ray Data batch function (pure numpy)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raylab.errors import ConfigError, DataError
from raylab.transforms.windows import (
    ChannelStats,
    ChannelStatsAccumulator,
    sliding_windows,
    windows_from_trials,
    znorm,
)


def test_sliding_windows_hand_made():
    x = np.arange(20, dtype=np.float32).reshape(10, 2)  # frame t holds [2t, 2t + 1]
    w = sliding_windows(x, width=4, step=3)
    # N = (10 - 4) // 3 + 1 = 3 windows, starting at frames 0, 3, 6.
    assert w.shape == (3, 4, 2)
    for i, start in enumerate((0, 3, 6)):
        np.testing.assert_array_equal(w[i], x[start:start + 4])
    assert w[2, 3, 1] == 19  # the last frame is used exactly
    assert np.shares_memory(w, x)  # a view, not a copy


def test_sliding_windows_drops_the_tail_and_handles_exact_fit():
    x = np.arange(11)[:, None]
    assert sliding_windows(x, 4, 3)[:, 0, 0].tolist() == [0, 3, 6]  # frames 9, 10 unused
    assert sliding_windows(x, 11, 5).shape == (1, 11, 1)
    assert sliding_windows(x, 1, 1).shape == (11, 1, 1)


def test_sliding_windows_errors():
    x = np.zeros((80, 3))
    with pytest.raises(DataError, match=r"window width 90 is larger than the trial \(80 frames\)"):
        sliding_windows(x, 90, 30)
    for width, step in ((0, 1), (4, 0), (-1, 2), (2.5, 1)):
        with pytest.raises(ConfigError):
            sliding_windows(x, width, step)
    with pytest.raises(DataError, match="expected a"):
        sliding_windows(np.zeros(10), 2, 1)


def test_accumulator_matches_numpy_over_the_concatenation():
    rng = np.random.default_rng(0)
    trials = [rng.normal(5.0, 3.0, size=(n, 4)).astype(np.float32) for n in (7, 30, 1, 12)]
    acc = ChannelStatsAccumulator()
    for t in trials:
        acc.update(t)
    stats = acc.result()
    allx = np.concatenate(trials).astype(np.float64)
    np.testing.assert_allclose(stats.mean, allx.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.std, allx.std(axis=0), rtol=1e-12)
    assert acc.count == 50


def test_accumulator_chunks_equal_one_shot_and_merge():
    rng = np.random.default_rng(1)
    x = rng.normal(1e4, 0.5, size=(101, 3))  # large offset: a naive sum-of-squares loses digits
    one = ChannelStatsAccumulator()
    one.update(x)
    chunked = ChannelStatsAccumulator()
    for chunk in np.array_split(x, 9):
        chunked.update(chunk)
    a, b = ChannelStatsAccumulator(), ChannelStatsAccumulator()
    a.update(x[:40])
    b.update(x[40:])
    a.merge(b)
    for acc in (chunked, a):
        np.testing.assert_allclose(acc.result().mean, one.result().mean, rtol=1e-12)
        np.testing.assert_allclose(acc.result().std, one.result().std, rtol=1e-9)
    np.testing.assert_allclose(one.result().std, x.std(axis=0), rtol=1e-9)


def test_constant_channel_does_not_give_inf():
    x = np.stack([np.arange(6.0), np.full(6, 3.0)], axis=1)
    acc = ChannelStatsAccumulator()
    acc.update(x)
    stats = acc.result(eps=1e-6)
    assert stats.std[1] == pytest.approx(1e-6)
    z = znorm(x, stats)
    assert z.dtype == np.float32
    assert np.all(np.isfinite(z))
    np.testing.assert_array_equal(z[:, 1], 0.0)


def test_accumulator_errors():
    with pytest.raises(DataError, match="no frames"):
        ChannelStatsAccumulator().result()
    acc = ChannelStatsAccumulator()
    acc.update(np.zeros((3, 2)))
    with pytest.raises(DataError, match="channel count"):
        acc.update(np.zeros((3, 4)))
    with pytest.raises(DataError, match="NaN"):
        acc.update(np.array([[np.nan, 1.0]]))


def test_channel_stats_round_trip_through_json():
    stats = ChannelStats(mean=np.array([1.0, -2.5]), std=np.array([0.5, 3.0]))
    back = ChannelStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    np.testing.assert_array_equal(back.mean, stats.mean)
    np.testing.assert_array_equal(back.std, stats.std)
    with pytest.raises(DataError, match="missing"):
        ChannelStats.from_dict({"mean": [0.0]})
    with pytest.raises(DataError, match="> 0"):
        ChannelStats(mean=np.zeros(2), std=np.array([1.0, 0.0]))


def test_znorm_values_and_channel_check():
    stats = ChannelStats(mean=np.array([1.0, 2.0]), std=np.array([2.0, 4.0]))
    z = znorm(np.array([[3.0, 2.0], [1.0, 10.0]]), stats)
    np.testing.assert_allclose(z, [[1.0, 0.0], [0.0, 2.0]])
    with pytest.raises(DataError, match="2 channels"):
        znorm(np.zeros((4, 3)), stats)


def _trial(n_frames: int, offset: float) -> np.ndarray:
    return (np.arange(n_frames * 2, dtype=np.float32) + offset).reshape(n_frames, 2)


def test_windows_from_trials_hand_made_batch():
    t5, t9 = _trial(5, 0.0), _trial(7, 100.0)
    kin = np.empty(2, dtype=object)
    kin[0], kin[1] = t5.reshape(-1), t9.reshape(-1)
    batch = {"kinematics": kin, "n_frames": np.array([5, 7]), "label": np.array([0, 2]),
             "trial_idx": np.array([5, 9])}
    stats = ChannelStats(mean=np.array([1.0, 2.0]), std=np.array([2.0, 4.0]))
    out = windows_from_trials(batch, width=3, step=2, stats=stats, n_channels=2)
    # Trial 5: (5 - 3) // 2 + 1 = 2 windows; trial 9: (7 - 3) // 2 + 1 = 3 windows.
    assert out["x"].shape == (5, 3, 2) and out["x"].dtype == np.float32
    assert out["y"].tolist() == [0, 0, 2, 2, 2]
    assert out["trial_idx"].tolist() == [5, 5, 9, 9, 9]
    assert out["window_idx"].tolist() == [0, 1, 0, 1, 2]
    for key in ("y", "trial_idx", "window_idx"):
        assert out[key].dtype == np.int64
    mean, std = np.array([1.0, 2.0]), np.array([2.0, 4.0])
    np.testing.assert_allclose(out["x"][1], (t5[2:5] - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(out["x"][4], (t9[4:7] - mean) / std, rtol=1e-6)
    raw = windows_from_trials(batch, width=3, step=2, stats=None, n_channels=2)
    np.testing.assert_array_equal(raw["x"][2], t9[0:3])


def test_windows_from_trials_accepts_a_2d_column_and_empty_batch():
    t = np.stack([_trial(6, 0.0).reshape(-1), _trial(6, 50.0).reshape(-1)])  # [B, T * C]
    batch = {"kinematics": t, "n_frames": [6, 6], "label": [1, 0], "trial_idx": [0, 1]}
    out = windows_from_trials(batch, width=4, step=1, stats=None, n_channels=2)
    assert out["x"].shape == (6, 4, 2)
    assert out["window_idx"].tolist() == [0, 1, 2, 0, 1, 2]
    empty = {"kinematics": np.empty(0, dtype=object), "n_frames": np.empty(0, np.int64),
             "label": np.empty(0, np.int64), "trial_idx": np.empty(0, np.int64)}
    out = windows_from_trials(empty, width=4, step=1, stats=None, n_channels=2)
    assert out["x"].shape == (0, 4, 2) and out["y"].shape == (0,)


def test_windows_from_trials_errors():
    kin = np.empty(2, dtype=object)
    kin[0], kin[1] = _trial(10, 0).reshape(-1), _trial(4, 0).reshape(-1)
    batch = {"kinematics": kin, "n_frames": [10, 4], "label": [0, 1], "trial_idx": [3, 8]}
    with pytest.raises(DataError, match=r"trial 8: window width 5 .*\(4 frames\)"):
        windows_from_trials(batch, width=5, step=2, stats=None, n_channels=2)
    with pytest.raises(DataError, match="trial 3: kinematics hold 20 values"):
        windows_from_trials(batch, width=2, step=2, stats=None, n_channels=3)
    with pytest.raises(DataError, match="missing columns"):
        windows_from_trials({"kinematics": kin}, width=2, step=1, stats=None, n_channels=2)
    with pytest.raises(ConfigError):
        windows_from_trials(batch, width=2, step=0, stats=None, n_channels=2)
    stats3 = ChannelStats(mean=np.zeros(3), std=np.ones(3))
    with pytest.raises(ConfigError, match="3 channels"):
        windows_from_trials(batch, width=2, step=1, stats=stats3, n_channels=2)


def _batch(*trials: np.ndarray) -> dict[str, np.ndarray]:
    kin = np.empty(len(trials), dtype=object)
    for i, t in enumerate(trials):
        kin[i] = t.reshape(-1)
    return {"kinematics": kin, "n_frames": np.array([len(t) for t in trials]),
            "label": np.zeros(len(trials), dtype=np.int64),
            "trial_idx": np.arange(len(trials))}


def test_per_trial_normalisation_uses_each_trials_own_statistics():
    """normalize: recording. Trial 0's frames are 2k + c (k = 0..4, channel c), so
    channel c has mean 4 + c and population std sqrt(8)."""
    t0, t1 = _trial(5, 0.0), _trial(7, 100.0)
    out = windows_from_trials(_batch(t0, t1), width=3, step=2, stats=None, n_channels=2,
                              per_trial=True)
    by_hand = (t0[0:3] - np.array([4.0, 5.0])) / np.sqrt(8.0)
    np.testing.assert_allclose(out["x"][0], by_hand, rtol=1e-6)
    # Invariant: a recording scaled and shifted as a whole normalises to the same values
    # (trial 1 is trial 0's pattern, longer and offset; compare it with 3x + 7 of itself).
    moved = windows_from_trials(_batch(t0, t1 * 3.0 + 7.0), width=3, step=2, stats=None,
                                n_channels=2, per_trial=True)
    np.testing.assert_allclose(moved["x"], out["x"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="per-trial"):
        windows_from_trials(_batch(t0), width=3, step=2, n_channels=2, per_trial=True,
                            stats=ChannelStats(mean=np.zeros(2), std=np.ones(2)))
