"""Sliding windows and per-channel z-normalisation of kinematic time series.

Used by the surgical skill method (Wang & Majewicz Fey, IJCARS 2018, arXiv 1806.05796): a
JIGSAWS trial is a float32 array ``[T, 76]`` at 30 Hz, cut into windows of width ``W`` with
step ``L`` (paper: W=60, L=30) after z-normalising every channel with statistics computed
on the training split only. :func:`windows_from_trials` is the function Ray Data runs in
``map_batches(batch_format="numpy")``; everything here is plain numpy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from raylab.errors import ConfigError, DataError

_TRIAL_COLUMNS = ("kinematics", "n_frames", "label", "trial_idx")


def _check_window(width: int, step: int) -> None:
    for name, value in (("width", width), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"window {name} must be an integer >= 1, got {value!r}")


def sliding_windows(x: np.ndarray, width: int, step: int) -> np.ndarray:
    """Cut a time-major series into windows, as a read-only strided view (no copy).

    Args:
        x: Array ``[T, C]`` (time first).
        width: Window width in frames (>= 1).
        step: Frames between the starts of consecutive windows (>= 1).

    Returns:
        Array ``[N, width, C]`` with ``N = (T - width) // step + 1``; window ``i`` is
        ``x[i * step : i * step + width]``. Frames after the last full window are dropped.
        The result is a view of ``x``: copy it before writing to it.

    Raises:
        ConfigError: ``width`` or ``step`` is not an integer >= 1.
        DataError: ``x`` is not 2-D, or ``width`` is larger than the trial.
    """
    _check_window(width, step)
    x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(f"expected a [T, C] array for windowing, got shape {tuple(x.shape)}")
    if width > x.shape[0]:
        raise DataError(f"window width {width} is larger than the trial ({x.shape[0]} frames)")
    # sliding_window_view gives [T - width + 1, C, width]; put time back in the middle.
    view = np.lib.stride_tricks.sliding_window_view(x, width, axis=0)
    return view.transpose(0, 2, 1)[::step]


@dataclass
class ChannelStats:
    """Per-channel mean and standard deviation (population, ddof=0) used for z-normalisation.

    Attributes:
        mean: Array ``[C]``.
        std: Array ``[C]``, strictly positive.
    """

    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, dtype=np.float64)
        self.std = np.asarray(self.std, dtype=np.float64)
        if self.mean.ndim != 1 or self.mean.shape != self.std.shape:
            raise DataError(
                f"channel stats need 1-D mean and std of the same length, got shapes "
                f"{self.mean.shape} and {self.std.shape}"
            )
        if not (np.all(np.isfinite(self.mean)) and np.all(np.isfinite(self.std))):
            raise DataError("channel stats contain NaN or infinite values")
        if np.any(self.std <= 0):
            bad = np.flatnonzero(self.std <= 0).tolist()
            raise DataError(f"channel stats std must be > 0; channels {bad} are not")

    @property
    def n_channels(self) -> int:
        """Number of channels ``C``."""
        return int(self.mean.shape[0])

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-friendly form: ``{"mean": [...], "std": [...]}``."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChannelStats:
        """Inverse of :meth:`to_dict`.

        Raises:
            DataError: ``mean`` or ``std`` is missing or malformed.
        """
        missing = [k for k in ("mean", "std") if k not in data]
        if missing:
            raise DataError(f"channel stats are missing {missing}; expected keys 'mean', 'std'")
        try:
            mean = np.asarray(data["mean"], dtype=np.float64)
            std = np.asarray(data["std"], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise DataError(f"channel stats must be lists of numbers: {exc}") from None
        return cls(mean=mean, std=std)


class ChannelStatsAccumulator:
    """Streaming per-channel mean/std over many ``[T, C]`` arrays.

    Chunks are combined with Chan et al.'s parallel update in float64 (each chunk's mean and
    sum of squared deviations, then merged), so that the result matches numpy over the
    concatenation without the cancellation of a plain sum/sum-of-squares. Accumulators built
    on different workers can be combined with :meth:`merge`.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.count = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    def _combine(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if count == 0:
            return
        if self._mean is None or self._m2 is None:
            self.count, self._mean, self._m2 = count, mean.copy(), m2.copy()
            return
        if mean.shape != self._mean.shape:
            raise DataError(
                f"channel count changed: accumulated {self._mean.shape[0]} channels, "
                f"got {mean.shape[0]}"
            )
        total = self.count + count
        delta = mean - self._mean
        self._mean = self._mean + delta * (count / total)
        self._m2 = self._m2 + m2 + delta**2 * (self.count * count / total)
        self.count = total

    def update(self, x: np.ndarray) -> None:
        """Add the frames of one ``[T, C]`` array.

        Raises:
            DataError: ``x`` is not 2-D, has a different channel count, or is not finite.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise DataError(f"expected a [T, C] array for channel stats, got {tuple(x.shape)}")
        if not np.all(np.isfinite(x)):
            raise DataError("kinematics contain NaN or infinite values")
        if x.shape[0] == 0:
            return
        mean = x.mean(axis=0)
        m2 = ((x - mean) ** 2).sum(axis=0)
        self._combine(x.shape[0], mean, m2)

    def merge(self, other: ChannelStatsAccumulator) -> None:
        """Add everything ``other`` has seen (e.g. another worker's accumulator)."""
        if other._mean is not None and other._m2 is not None:
            self._combine(other.count, other._mean, other._m2)

    def state(self) -> dict[str, np.ndarray]:
        """The partial sums as arrays, so that accumulators built in Ray Data tasks can be
        shipped back to the driver as ordinary columns and combined with :meth:`merge_state`."""
        c = 0 if self._mean is None else self._mean.shape[0]
        return {"count": np.array([self.count]),
                "mean": np.zeros(c) if self._mean is None else self._mean.copy(),
                "m2": np.zeros(c) if self._m2 is None else self._m2.copy()}

    def merge_state(self, state: Mapping[str, Any]) -> None:
        """Add a partial state produced by :meth:`state`."""
        count = int(np.asarray(state["count"]).reshape(-1)[0])
        self._combine(count, np.asarray(state["mean"], dtype=np.float64),
                      np.asarray(state["m2"], dtype=np.float64))

    def result(self, eps: float = 1e-6) -> ChannelStats:
        """Return the statistics of every frame seen.

        Args:
            eps: Floor for the standard deviation, so that a constant channel normalises to
                zero instead of dividing by zero.

        Raises:
            DataError: Nothing has been seen.
        """
        if self._mean is None or self._m2 is None or self.count == 0:
            raise DataError("no frames were seen; cannot compute channel statistics")
        std = np.sqrt(self._m2 / self.count)
        return ChannelStats(mean=self._mean.copy(), std=np.maximum(std, eps))


def znorm(x: np.ndarray, stats: ChannelStats) -> np.ndarray:
    """Z-normalise the last axis of ``x`` with ``stats``; returns a new float32 array.

    Raises:
        DataError: The last axis of ``x`` is not ``stats.n_channels`` long.
    """
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[-1] != stats.n_channels:
        raise DataError(
            f"z-normalisation stats have {stats.n_channels} channels, data has shape "
            f"{tuple(x.shape)}"
        )
    mean = stats.mean.astype(np.float32)
    inv_std = (1.0 / stats.std).astype(np.float32)
    out = np.subtract(x, mean, dtype=np.float32)
    out *= inv_std
    return out


def trial_stats(x: np.ndarray, eps: float = 1e-6) -> ChannelStats:
    """The per-channel statistics of one ``[T, C]`` recording (std floored at ``eps``: a
    channel constant within the recording normalises to zero)."""
    acc = ChannelStatsAccumulator()
    acc.update(x)
    return acc.result(eps)


def _trial_array(kinematics: Any, n_frames: int, n_channels: int, trial: int) -> np.ndarray:
    flat = np.asarray(kinematics, dtype=np.float32).reshape(-1)
    if flat.size != n_frames * n_channels:
        raise DataError(
            f"trial {trial}: kinematics hold {flat.size} values, expected n_frames x channels "
            f"= {n_frames} x {n_channels} = {n_frames * n_channels}"
        )
    return flat.reshape(n_frames, n_channels)


def windows_from_trials(
    batch: dict[str, np.ndarray],
    *,
    width: int,
    step: int,
    stats: ChannelStats | None,
    n_channels: int = 76,
    per_trial: bool = False,
) -> dict[str, np.ndarray]:
    """Turn a batch of trials into a batch of (z-normalised) windows.

    Meant for ``ds.map_batches(windows_from_trials, batch_format="numpy", fn_kwargs=...)``.
    Each trial is z-normalised once (cheaper than normalising overlapping windows), cut with
    :func:`sliding_windows`, and the windows of all trials are concatenated with one copy.

    Args:
        batch: Columns ``kinematics`` (object array of flattened ``[T * C]`` float arrays, or a
            2-D/3-D numeric array when every trial has the same length), ``n_frames``,
            ``label`` and ``trial_idx`` (integers, one per trial).
        width: Window width in frames.
        step: Window step in frames.
        stats: Training-split channel statistics, or None to leave values as they are.
        n_channels: Channels per frame ``C``.
        per_trial: Z-normalise each trial with its own statistics (:func:`trial_stats`)
            instead of ``stats`` (which must then be None).

    Returns:
        ``x`` float32 ``[N, width, C]``, ``y`` int64 ``[N]`` (the trial's label),
        ``trial_idx`` int64 ``[N]`` and ``window_idx`` int64 ``[N]`` (the window's index
        within its trial), where ``N`` sums ``(T_i - width) // step + 1`` over the trials.

    Raises:
        ConfigError: ``width``/``step`` below 1, or ``stats`` for another channel count.
        DataError: A column is missing, the columns differ in length, a trial's size does
            not match ``n_frames * n_channels``, or a trial is shorter than ``width``.
    """
    _check_window(width, step)
    missing = [c for c in _TRIAL_COLUMNS if c not in batch]
    if missing:
        raise DataError(f"trial batch is missing columns {missing}; has {sorted(batch)}")
    if per_trial and stats is not None:
        raise ConfigError("per-trial normalisation takes no training-split stats")
    if stats is not None and stats.n_channels != n_channels:
        raise ConfigError(
            f"normalisation stats have {stats.n_channels} channels, expected {n_channels}"
        )
    kin = batch["kinematics"]
    n_frames = np.asarray(batch["n_frames"], dtype=np.int64).reshape(-1)
    labels = np.asarray(batch["label"], dtype=np.int64).reshape(-1)
    trial_ids = np.asarray(batch["trial_idx"], dtype=np.int64).reshape(-1)
    sizes = {len(kin), n_frames.size, labels.size, trial_ids.size}
    if len(sizes) != 1:
        raise DataError(f"trial batch columns differ in length: {sorted(sizes)}")

    short = np.flatnonzero(n_frames < width)
    if short.size:
        i = int(short[0])
        raise DataError(
            f"trial {int(trial_ids[i])}: window width {width} is larger than the trial "
            f"({int(n_frames[i])} frames)"
        )

    parts = []
    for i in range(len(kin)):
        trial = _trial_array(kin[i], int(n_frames[i]), n_channels, int(trial_ids[i]))
        if stats is not None or per_trial:
            trial = znorm(trial, trial_stats(trial) if per_trial else stats)
        parts.append(sliding_windows(trial, width, step))

    counts = (n_frames - width) // step + 1
    total = int(counts.sum())
    if parts:
        x = np.concatenate(parts, axis=0).astype(np.float32, copy=False)
    else:
        x = np.empty((0, width, n_channels), dtype=np.float32)
    starts = np.cumsum(counts) - counts
    return {
        "x": x,
        "y": np.repeat(labels, counts),
        "trial_idx": np.repeat(trial_ids, counts),
        "window_idx": np.arange(total, dtype=np.int64) - np.repeat(starts, counts),
    }
