"""The skill method's data on the driver: trials, folds, z-norm statistics, window datasets.

JIGSAWS shards hold one row per trial. The driver reads the small columns to label trials
and cut folds; a fold's trials are then selected, z-normalised with statistics of the
fold's training trials and cut into windows (:class:`TrialWindows`): on the driver when it
holds the rows and the windows fit in ``materialize_mb``, else in Ray Data ``map_batches``
tasks where the rows are read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylab.data import jigsaws
from raylab.data.shards import iter_rows, read_manifest, shard_paths
from raylab.data.splits import Fold, make_folds
from raylab.errors import ConfigError, DataError
from raylab.methods.skill.config import SkillConfig
from raylab.runtime import datasets as rd
from raylab.transforms.windows import ChannelStats, ChannelStatsAccumulator, windows_from_trials


@dataclass
class Trial:
    name: str
    subject: str
    trial: int
    label: int
    n_frames: int


@dataclass
class SkillData:
    """What the driver knows before Ray starts: the shard files and the task's trials."""

    paths: list[str]
    trials: list[Trial]
    _rows: TrialRows | None = field(default=None, repr=False)

    def select(self, names: list[str]) -> list[Trial]:
        """The trials named in ``names``, in shard order."""
        wanted = set(names)
        return [t for t in self.trials if t.name in wanted]

    def rows(self, cfg: SkillConfig) -> TrialRows:
        """The kinematics rows (:func:`trial_rows`), read once for all folds."""
        if self._rows is None:
            self._rows = trial_rows(self.paths, cfg)
        return self._rows


def load_trials(cfg: SkillConfig) -> SkillData:
    """The shard paths and the labelled trials of ``cfg.task`` (small columns only)."""
    if not cfg.data:
        raise ConfigError("config key 'data': expected the shard folder (--data DST)")
    read_manifest(cfg.data, expected_format="jigsaws")
    trials = []
    columns = ["task", "name", "subject", "trial", "skill", "grs", "n_frames"]
    for row in iter_rows(cfg.data, columns=columns):
        if row["task"] != cfg.task:
            continue
        where = f"trial {row['name']!r}"
        needed = ("skill", "n_frames", "trial") + (("grs",) if cfg.labels == "grs" else ())
        missing = [key for key in needed if row[key] is None]
        if missing:
            raise DataError(f"{where}: column(s) {', '.join(missing)} are null", path=cfg.data)
        try:
            label = jigsaws.skill_label(row["skill"], row["grs"], cfg.labels,
                                        cfg.grs_thresholds)
        except DataError as exc:
            raise DataError(f"{where}: {exc}", path=cfg.data) from None
        trials.append(Trial(row["name"], row["subject"], int(row["trial"]), label,
                            int(row["n_frames"])))
    if not trials:
        raise DataError(f"no trials of task {cfg.task!r} in the shards", path=cfg.data)
    too_short = [t for t in trials if t.n_frames < cfg.window]
    if too_short:
        t = too_short[0]
        raise DataError(f"window {cfg.window} is larger than trial {t.name} "
                        f"({t.n_frames} frames); choose window <= {t.n_frames}", path=cfg.data)
    return SkillData(shard_paths(cfg.data), trials)


def folds_for(cfg: SkillConfig, trials: list[Trial]) -> list[Fold]:
    """The cross-validation folds of ``cfg.cv``, or those named in ``cfg.folds``."""
    folds = make_folds([(t.name, t.subject, t.trial) for t in trials], cfg.cv,
                       holdout_fraction=cfg.holdout_fraction, seed=cfg.seed)
    if cfg.folds:
        known = [f.name for f in folds]
        unknown = [f for f in cfg.folds if f not in known]
        if unknown:
            raise ConfigError(f"config key 'folds': unknown fold {unknown[0]!r}; "
                              f"folds of cv={cfg.cv}: {', '.join(known)}")
        folds = [f for f in folds if f.name in cfg.folds]
    return folds


def window_count(trials: list[Trial], width: int, step: int) -> int:
    """How many windows :class:`TrialWindows` cuts from ``trials`` (what an evaluation
    must score, every window exactly once)."""
    return sum((t.n_frames - width) // step + 1 for t in trials if t.n_frames >= width)


class TrialWindows:
    """Ray Data batch function: keep the split's trials, z-normalise, cut windows.

    ``assign`` maps trial name -> (label, trial index within the split). The index lets
    workers count window votes per trial in a fixed-size tensor that can be all-reduced.
    """

    def __init__(self, assign: dict[str, tuple[int, int]], width: int, step: int,
                 stats: dict[str, list[float]] | None) -> None:
        self.assign = assign
        self.width = width
        self.step = step
        # None: each trial with its own statistics (normalize: recording).
        self.stats = None if stats is None else ChannelStats.from_dict(stats)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = np.array([n in self.assign for n in batch["name"]], dtype=bool)
        names = batch["name"][keep]
        sub = {
            "kinematics": batch["kinematics"][keep],
            "n_frames": batch["n_frames"][keep],
            "label": np.array([self.assign[n][0] for n in names], dtype=np.int64),
            "trial_idx": np.array([self.assign[n][1] for n in names], dtype=np.int64),
        }
        return windows_from_trials(sub, width=self.width, step=self.step, stats=self.stats,
                                   n_channels=jigsaws.N_CHANNELS,
                                   per_trial=self.stats is None)


def _accumulate(tables: list[Any]) -> ChannelStatsAccumulator:
    """Channel statistics of the flat ``kinematics`` column of pyarrow Tables."""
    acc = ChannelStatsAccumulator()
    for table in tables:
        if table.num_rows:
            values = pc.list_flatten(table["kinematics"]).to_numpy(zero_copy_only=False)
            acc.update(values.reshape(-1, jigsaws.N_CHANNELS))
    return acc


def _partial_stats(batch: Any) -> dict[str, np.ndarray]:
    """One Ray Data batch's (a pyarrow Table) partial statistics, merged on the driver."""
    acc = _accumulate([batch])
    state = acc.state()
    if acc.count == 0:  # keep the column shapes equal across batches
        state = {"count": np.array([0]), "mean": np.zeros(jigsaws.N_CHANNELS),
                 "m2": np.zeros(jigsaws.N_CHANNELS)}
    return {k: v[None] for k, v in state.items()}


@dataclass
class TrialRows:
    """The kinematics rows of a run: a Ray Dataset, and the same rows as pyarrow Tables
    when the driver read them itself (small local shard sets; None when they stream)."""

    dataset: Any
    tables: list[Any] | None


TRIAL_COLUMNS = ["name", "n_frames", "kinematics"]


def trial_rows(paths: list[str], cfg: SkillConfig) -> TrialRows:
    """The kinematics rows, read once per run and held in the object store when small."""
    tables = rd.local_tables(paths, TRIAL_COLUMNS, cfg.materialize_mb)
    if tables is None:
        return TrialRows(rd.stream_shards(paths, TRIAL_COLUMNS, shuffle_files=True), None)
    return TrialRows(rd.dataset_from_tables(tables, shuffle_files=True), tables)


def channel_stats(rows: TrialRows, names: set[str]) -> ChannelStats:
    """Mean/std per channel over the training trials, computed where the data lives.

    Rows the driver already holds are summed here, which spares every fold a Ray Data
    pass over them; streamed rows are summed by Ray Data tasks and merged here.
    """
    if rows.tables is not None:
        return table_channel_stats(rows.tables, names)
    ds = rd.keep_rows(rows.dataset.select_columns(["name", "kinematics"]), "name", names)
    total = ChannelStatsAccumulator()
    for part in ds.map_batches(_partial_stats, batch_format="pyarrow").iter_rows():
        total.merge_state(part)
    return total.result()


def tables_of_trials(tables: list[Any], names: set[str] | dict[str, Any]) -> list[Any]:
    """The rows of pyarrow Tables whose ``name`` is one of ``names``."""
    wanted = pa.array(sorted(names), type=pa.string())
    return [t.filter(pc.is_in(t["name"], value_set=wanted)) for t in tables]


def table_channel_stats(tables: list[Any], names: set[str]) -> ChannelStats:
    """:func:`channel_stats` over pyarrow Tables with ``name`` and flat ``kinematics``."""
    return _accumulate(tables_of_trials(tables, names)).result()


def window_bytes(trials: list[Trial], cfg: SkillConfig) -> int:
    """The size of the windows :class:`TrialWindows` cuts from ``trials`` (float32)."""
    return window_count(trials, cfg.window, cfg.step) * cfg.window * jigsaws.N_CHANNELS * 4


def window_dataset(rows: TrialRows, trials: list[Trial], cfg: SkillConfig,
                   stats: ChannelStats | None) -> Any:
    """The windowed Ray Dataset of ``trials`` (``rows`` from :func:`trial_rows`);
    ``stats`` None normalises each trial with its own statistics.

    Rows the driver already holds are windowed here when the windows fit in
    ``materialize_mb``: a fold's windowing is a fraction of a second of numpy, while
    as Ray Data tasks it cost the first epoch of every fold 1-4 s more (task processes
    starting beside the Train worker; BENCHMARKS.md, "What a user waits for"). Streamed
    rows are windowed by Ray Data tasks where they are read.
    """
    assign = {t.name: (t.label, i) for i, t in enumerate(trials)}
    windows = TrialWindows(assign, cfg.window, cfg.step,
                           None if stats is None else stats.to_dict())
    if rows.tables is not None and window_bytes(trials, cfg) <= cfg.materialize_mb << 20:
        return rd.dataset_from_arrays(windows_of_tables(rows.tables, windows),
                                      shuffle_blocks=True)
    # Filtering before windowing keeps batches non-empty: Ray Data cannot store an empty
    # batch of [0, W, C] tensors as a tensor column and would fall back to pickling.
    ds = rd.keep_rows(rows.dataset, "name", set(assign))
    return ds.map_batches(windows, batch_format="numpy", batch_size=16)


def windows_of_tables(tables: list[Any], windows: TrialWindows) -> dict[str, np.ndarray]:
    """``windows`` applied to the rows of pyarrow Tables (``name``, ``n_frames``, flat
    ``kinematics``) here, as Ray Data applies it to their numpy batches."""
    parts = [windows({column: kept[column].to_numpy(zero_copy_only=False)
                      for column in TRIAL_COLUMNS})
             for kept in tables_of_trials(tables, windows.assign) if kept.num_rows]
    if not parts:
        raise DataError(f"none of the trials {sorted(windows.assign)[:3]} ... is in the shards")
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
