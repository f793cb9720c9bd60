"""Surgical skill assessment from robot kinematics with a 1-D CNN.

Paper: Z. Wang and A. Majewicz Fey, "Deep learning with convolutional neural network for
objective skill evaluation in robot-assisted surgery", IJCARS 2018 (arXiv 1806.05796).
Checked against the paper's description (10-layer CNN, W=60/L=30 windows, z-normalised
kinematics, LOSO) and, for the validation schemes, against hfawaz/miccai18.

Data flow: JIGSAWS shards (one row per trial) -> Ray Data ``map_batches`` selects the
fold's trials, z-normalises with training-split statistics and cuts windows -> Train
workers fit :class:`~raylab.models.skillnet.SkillNet` -> each worker evaluates its
share of the held-out windows; confusion counts and per-trial votes are summed over
workers -> the driver aggregates folds into the report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from raylab import config as cfglib
from raylab.data import jigsaws
from raylab.data.shards import iter_rows, read_manifest, shard_paths
from raylab.data.splits import Fold, make_folds, validation_split
from raylab.errors import ConfigError, DataError
from raylab.methods.base import Method, save_run_record
from raylab.registry import register_method
from raylab.runtime.options import RunOptions, local_path
from raylab.transforms.windows import ChannelStats, ChannelStatsAccumulator

log = logging.getLogger("raylab")

CLASS_NAMES = ("novice", "intermediate", "expert")


@dataclass
class SkillModelConfig:
    """SkillNet widths; the paper does not give them, so Tune may choose."""

    channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    kernel_size: int = 5
    pool: int = 2
    fc_dim: int = 128
    dropout_conv: float = 0.2
    dropout_fc: float = 0.5

    def validate(self) -> None:
        cfglib.require(len(self.channels) == 3 and min(self.channels) > 0, "model.channels",
                       "three positive widths", self.channels)
        cfglib.require(self.kernel_size >= 1, "model.kernel_size", "an integer >= 1",
                       self.kernel_size)
        cfglib.require(self.pool >= 1, "model.pool", "an integer >= 1", self.pool)
        cfglib.require(self.fc_dim >= 1, "model.fc_dim", "an integer >= 1", self.fc_dim)
        for key in ("dropout_conv", "dropout_fc"):
            p = getattr(self, key)
            cfglib.require(0.0 <= p < 1.0, f"model.{key}", "a probability in [0, 1)", p)


@dataclass
class SkillOptimConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    epochs: int = 30
    schedule: Literal["cosine", "constant"] = "cosine"

    def validate(self) -> None:
        cfglib.require(self.lr > 0, "optim.lr", "a positive number", self.lr)
        cfglib.require(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)
        cfglib.require(self.batch_size >= 1, "optim.batch_size", "an integer >= 1",
                       self.batch_size)
        cfglib.require(self.epochs >= 1, "optim.epochs", "an integer >= 1", self.epochs)


@dataclass
class SkillConfig:
    """Defaults follow the paper: W=60, L=30, self-proclaimed labels, LOSO."""

    data: str = ""
    task: str = "Suturing"
    labels: Literal["self", "grs"] = "self"
    #: GRS total < t0 -> novice, < t1 -> intermediate, else expert (GRS ranges 6..30).
    grs_thresholds: list[float] = field(default_factory=lambda: [16.0, 24.0])
    window: int = 60
    step: int = 30
    cv: Literal["loso", "louo", "holdout"] = "loso"
    #: Run only these folds (names such as supertrial1, userB); empty runs every fold.
    folds: list[str] = field(default_factory=list)
    holdout_fraction: float = 0.25
    #: Share of training trials held out for validation in `raylab tune` (never the test).
    val_fraction: float = 0.2
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    shuffle_buffer: int = 4096
    #: Keep each worker's windows in memory after the first epoch when they fit in this
    #: many MiB (0 streams every epoch); see raylab.runtime.batch_cache.
    cache_mb: int = 1024
    #: Read the shards once into Ray's object store when they total at most this many MiB
    #: (0: stream from Parquet every epoch); see raylab.runtime.datasets.
    materialize_mb: int = 512
    checkpoint_every: int = 5
    model: SkillModelConfig = field(default_factory=SkillModelConfig)
    optim: SkillOptimConfig = field(default_factory=SkillOptimConfig)

    def validate(self) -> None:
        cfglib.require(self.task in jigsaws.TASKS, "task", "one of " + ", ".join(jigsaws.TASKS),
                       self.task)
        cfglib.require(self.window >= 1, "window", "an integer >= 1", self.window)
        cfglib.require(self.step >= 1, "step", "an integer >= 1", self.step)
        cfglib.require(len(self.grs_thresholds) == 2
                       and self.grs_thresholds[0] <= self.grs_thresholds[1],
                       "grs_thresholds", "two increasing numbers", self.grs_thresholds)
        cfglib.require(0.0 < self.holdout_fraction < 1.0, "holdout_fraction", "in (0, 1)",
                       self.holdout_fraction)
        cfglib.require(0.0 <= self.val_fraction < 1.0, "val_fraction", "in [0, 1)",
                       self.val_fraction)
        cfglib.require(self.shuffle_buffer >= 0, "shuffle_buffer", ">= 0", self.shuffle_buffer)
        cfglib.require(self.checkpoint_every >= 1, "checkpoint_every", ">= 1",
                       self.checkpoint_every)
        cfglib.require(self.cache_mb >= 0, "cache_mb", "an integer >= 0 (MiB)", self.cache_mb)
        cfglib.require(self.materialize_mb >= 0, "materialize_mb", "an integer >= 0 (MiB)",
                       self.materialize_mb)


# ----------------------------------------------------------------------------- driver side


@dataclass
class Trial:
    name: str
    subject: str
    trial: int
    label: int
    n_frames: int


def load_trials(cfg: SkillConfig) -> tuple[list[str], list[Trial]]:
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
    return shard_paths(cfg.data), trials


class TrialWindows:
    """Ray Data batch function: keep the split's trials, z-normalise, cut windows.

    ``assign`` maps trial name -> (label, trial index within the split). The index lets
    workers count window votes per trial in a fixed-size tensor that can be all-reduced.
    """

    def __init__(self, assign: dict[str, tuple[int, int]], width: int, step: int,
                 stats: dict[str, list[float]]) -> None:
        self.assign = assign
        self.width = width
        self.step = step
        self.stats = ChannelStats.from_dict(stats)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raylab.transforms.windows import windows_from_trials

        keep = np.array([n in self.assign for n in batch["name"]], dtype=bool)
        names = batch["name"][keep]
        sub = {
            "kinematics": batch["kinematics"][keep],
            "n_frames": batch["n_frames"][keep],
            "label": np.array([self.assign[n][0] for n in names], dtype=np.int64),
            "trial_idx": np.array([self.assign[n][1] for n in names], dtype=np.int64),
        }
        return windows_from_trials(sub, width=self.width, step=self.step, stats=self.stats,
                                   n_channels=jigsaws.N_CHANNELS)


def _accumulate(tables: list[Any]) -> ChannelStatsAccumulator:
    """Channel statistics of the flat ``kinematics`` column of pyarrow Tables."""
    import pyarrow.compute as pc

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
    from raylab.runtime.datasets import dataset_from_tables, local_tables, stream_shards

    tables = local_tables(paths, TRIAL_COLUMNS, cfg.materialize_mb)
    if tables is None:
        return TrialRows(stream_shards(paths, TRIAL_COLUMNS, shuffle_files=True), None)
    return TrialRows(dataset_from_tables(tables, shuffle_files=True), tables)


def channel_stats(rows: TrialRows, names: set[str]) -> ChannelStats:
    """Mean/std per channel over the training trials, computed where the data lives.

    Rows the driver already holds are summed here, which spares every fold a Ray Data
    pass over them; streamed rows are summed by Ray Data tasks and merged here.
    """
    if rows.tables is not None:
        return table_channel_stats(rows.tables, names)
    from ray.data.expressions import col

    ds = rows.dataset.select_columns(["name", "kinematics"])
    ds = ds.filter(expr=col("name").is_in(sorted(names)))
    total = ChannelStatsAccumulator()
    for part in ds.map_batches(_partial_stats, batch_format="pyarrow").iter_rows():
        total.merge_state(part)
    return total.result()


def table_channel_stats(tables: list[Any], names: set[str]) -> ChannelStats:
    """:func:`channel_stats` over pyarrow Tables with ``name`` and flat ``kinematics``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = pa.array(sorted(names), type=pa.string())
    kept = [t.filter(pc.is_in(t["name"], value_set=wanted)) for t in tables]
    return _accumulate(kept).result()


def window_dataset(rows: TrialRows, trials: list[Trial], cfg: SkillConfig,
                   stats: ChannelStats) -> Any:
    """The windowed Ray Dataset of ``trials`` (``rows`` from :func:`trial_rows`)."""
    from ray.data.expressions import col

    assign = {t.name: (t.label, i) for i, t in enumerate(trials)}
    # Filtering before windowing keeps batches non-empty: Ray Data cannot store an empty
    # batch of [0, W, C] tensors as a tensor column and would fall back to pickling.
    ds = rows.dataset.filter(expr=col("name").is_in(sorted(assign)))
    windows = TrialWindows(assign, cfg.window, cfg.step, stats.to_dict())
    return ds.map_batches(windows, batch_format="numpy", batch_size=16)


def checkpoint_meta(cfg: SkillConfig, stats: ChannelStats, fold: str) -> dict[str, Any]:
    """What `raylab assess` needs to use the model without the training data."""
    return {
        "method": "skill",
        "config": cfglib.to_dict(cfg),
        "stats": stats.to_dict(),
        "class_names": list(CLASS_NAMES),
        "n_channels": jigsaws.N_CHANNELS,
        "fold": fold,
    }


def fit_fold(cfg: SkillConfig, options: RunOptions, paths: list[str], train: list[Trial],
             evaluate_on: list[Trial], eval_split: str, storage: str, name: str,
             callbacks: list[Any] | None = None) -> Any:
    """Compute statistics, build the streamed datasets and fit one TorchTrainer run."""
    from raylab.methods.skill_loop import train_loop
    from raylab.runtime.trainer import fit

    rows = trial_rows(paths, cfg)
    stats = channel_stats(rows, {t.name for t in train})
    datasets = {
        "train": window_dataset(rows, train, cfg, stats),
        eval_split: window_dataset(rows, evaluate_on, cfg, stats),
    }
    loop_config = {
        "config": cfglib.to_dict(cfg),
        "eval_split": eval_split,
        "eval_trial_labels": [t.label for t in evaluate_on],
        "checkpoint_meta": checkpoint_meta(cfg, stats, name),
    }
    return fit(train_loop, loop_config, datasets, options, storage=storage, name=name,
               callbacks=callbacks)


def _select(trials: list[Trial], names: list[str]) -> list[Trial]:
    wanted = set(names)
    return [t for t in trials if t.name in wanted]


def folds_for(cfg: SkillConfig, trials: list[Trial]) -> list[Fold]:
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


def summarise(cfg: SkillConfig, fold_results: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the folds: per-fold and mean accuracy, pooled per-class metrics, votes."""
    from raylab.metrics.classification import ConfusionMatrix

    pooled = ConfusionMatrix(len(CLASS_NAMES))
    for r in fold_results:
        pooled.merge(np.asarray(r["confusion"]))
    report = pooled.result(list(CLASS_NAMES))
    accs = [r["accuracy"] for r in fold_results]
    trial_correct = sum(r["trial_correct"] for r in fold_results)
    trial_total = sum(r["trial_total"] for r in fold_results)
    return {
        "method": "skill",
        "task": cfg.task,
        "cv": cfg.cv,
        "labels": cfg.labels,
        "window": cfg.window,
        "step": cfg.step,
        "folds": fold_results,
        "mean_accuracy": float(np.mean(accs)),
        "std_accuracy": float(np.std(accs)),
        "pooled": report,
        "trial_accuracy": trial_correct / trial_total if trial_total else float("nan"),
    }


def fold_result(fold: Fold, test: list[Trial], metrics: dict[str, Any], checkpoint: Any,
                seconds: float) -> dict[str, Any]:
    from raylab.methods.skill_loop import vote_predictions

    predicted = vote_predictions(metrics["test_votes"], len(test))
    correct = int(sum(int(p == t.label) for p, t in zip(predicted, test)))
    return {
        "fold": fold.name,
        "test_trials": len(test),
        "accuracy": float(metrics["test_accuracy"]),
        "loss": float(metrics["test_loss"]),
        "trial_correct": correct,
        "trial_total": len(test),
        "trial_predictions": {t.name: CLASS_NAMES[int(p)] for p, t in zip(predicted, test)},
        "confusion": metrics["test_confusion"],
        "epochs": int(metrics["epoch"]),
        "checkpoint": checkpoint.path if checkpoint is not None else None,
        "seconds": round(seconds, 2),
    }


@register_method("skill")
class SkillMethod(Method):
    name = "skill"
    paper = "Wang & Majewicz Fey 2018, surgical skill CNN on JIGSAWS kinematics"
    Config = SkillConfig
    metric = "val_accuracy"
    mode = "max"
    default_space = {
        "window": "[30, 60, 90]",
        "optim.lr": "log(3e-4, 3e-3)",
        "model.dropout_fc": "(0.3, 0.6)",
    }

    def check(self, cfg: SkillConfig) -> None:
        _, trials = load_trials(cfg)
        folds_for(cfg, trials)

    def train(self, cfg: SkillConfig, options: RunOptions, storage: str, experiment: str
              ) -> dict[str, Any]:
        paths, trials = load_trials(cfg)
        folds = folds_for(cfg, trials)
        exp_storage = f"{storage.rstrip('/')}/{experiment}"
        results = []
        for i, fold in enumerate(folds, 1):
            train, test = _select(trials, fold.train), _select(trials, fold.test)
            log.info("fold %d/%d %s: %d train / %d test trials", i, len(folds), fold.name,
                     len(train), len(test))
            t0 = time.perf_counter()
            result = fit_fold(cfg, options, paths, train, test, "test", exp_storage, fold.name)
            r = fold_result(fold, test, result.metrics, result.checkpoint,
                            time.perf_counter() - t0)
            print(f"  fold {fold.name:<12} window acc {r['accuracy']:.3f}  "
                  f"trial acc {r['trial_correct']}/{r['trial_total']}  ({r['seconds']:.0f} s)",
                  flush=True)
            results.append(r)
        summary = summarise(cfg, results)
        write_train_report(cfg, summary, local_path(storage, experiment))
        return summary

    def print_summary(self, summary: dict[str, Any]) -> None:
        print_summary(summary)

    def tune_trial(self, cfg: SkillConfig, options: RunOptions, storage: str, run_name: str,
                   callbacks: list[Any]) -> None:
        """Fit on the first fold's training trials; validate on a split of them.

        The test trials of the fold never reach Tune: model selection uses only data the
        final evaluation does not, as the paper did.
        """
        paths, trials = load_trials(cfg)
        fold = folds_for(cfg, trials)[0]
        train_names, val_names = validation_split(fold.train, cfg.val_fraction or 0.2,
                                                  cfg.seed)
        fit_fold(cfg, options, paths, _select(trials, train_names), _select(trials, val_names),
                 "val", storage, run_name, callbacks=callbacks)


def write_train_report(cfg: SkillConfig, summary: dict[str, Any], folder: Path | None) -> None:
    """summary.json, config.yaml, confusion.png and report.md in the experiment folder."""
    if folder is None:
        return
    from raylab.plots import plot_confusion

    save_run_record(cfg, summary, folder)
    pooled = summary["pooled"]
    plot_confusion(pooled["confusion"], list(CLASS_NAMES), folder / "confusion.png",
                   title=f"{cfg.task} {cfg.cv.upper()} (row-normalised)")
    lines = [
        f"# Skill assessment: {cfg.task}, {cfg.cv.upper()}, labels={cfg.labels}",
        "",
        f"Window W={cfg.window}, step L={cfg.step}; {len(summary['folds'])} folds.",
        "",
        "| fold | test trials | window accuracy | trial accuracy (vote) | epochs |",
        "|---|---|---|---|---|",
    ]
    for r in summary["folds"]:
        lines.append(f"| {r['fold']} | {r['test_trials']} | {r['accuracy']:.3f} | "
                     f"{r['trial_correct']}/{r['trial_total']} | {r['epochs']} |")
    lines += [
        f"| **mean** | | **{summary['mean_accuracy']:.3f}** ± {summary['std_accuracy']:.3f} "
        f"| {summary['trial_accuracy']:.3f} | |",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for c in CLASS_NAMES:
        lines.append(f"| {c} | {pooled['precision'][c]:.3f} | {pooled['recall'][c]:.3f} | "
                     f"{pooled['f1'][c]:.3f} | {pooled['support'][c]} |")
    lines += ["", "![confusion matrix](confusion.png)", ""]
    cfglib.atomic_write_text(folder / "report.md", "\n".join(lines))


def print_summary(summary: dict[str, Any]) -> None:
    pooled = summary["pooled"]
    print(f"\n{summary['task']} {summary['cv'].upper()} over {len(summary['folds'])} folds: "
          f"window accuracy {summary['mean_accuracy']:.3f} ± {summary['std_accuracy']:.3f}, "
          f"trial accuracy (majority vote) {summary['trial_accuracy']:.3f}")
    print(f"{'class':<14}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
    for c in CLASS_NAMES:
        print(f"{c:<14}{pooled['precision'][c]:>10.3f}{pooled['recall'][c]:>10.3f}"
              f"{pooled['f1'][c]:>10.3f}{pooled['support'][c]:>9}")


