"""Surgical skill assessment from robot kinematics with a 1-D CNN.

Paper: Z. Wang and A. Majewicz Fey, "Deep learning with convolutional neural network for
objective skill evaluation in robot-assisted surgery", IJCARS 2018 (arXiv 1806.05796).
Checked against the paper's description (10-layer CNN, W=60/L=30 windows, z-normalised
kinematics, LOSO) and, for the validation schemes, against hfawaz/miccai18.

Data flow: JIGSAWS shards (one row per trial) -> the fold's trials are selected,
z-normalised with training-split statistics and cut into windows (:mod:`.data`: on the
driver for a small shard set, in Ray Data tasks for one that streams) -> Train
workers fit :class:`~raylab.models.skillnet.SkillNet` (:mod:`.task`) -> each worker
evaluates its share of the held-out windows; confusion counts and per-trial votes are
summed over workers -> the driver pools the folds into the report.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from raylab import config as cfglib
from raylab.data import jigsaws
from raylab.data.splits import validation_split
from raylab.engine.keys import TEST, TRAIN, VAL, metric_key
from raylab.methods.base import Method, PlanResult, RunPlan
from raylab.methods.skill.config import CLASS_NAMES, SkillConfig
from raylab.methods.skill.data import (
    SkillData,
    Trial,
    channel_stats,
    folds_for,
    load_trials,
    window_count,
    window_dataset,
)
from raylab.methods.skill.task import SkillTask, vote_predictions
from raylab.metrics.classification import ConfusionMatrix
from raylab.registry import register_method
from raylab.transforms.windows import ChannelStats

log = logging.getLogger("raylab")


def checkpoint_meta(cfg: SkillConfig, stats: ChannelStats | None, fold: str
                    ) -> dict[str, Any]:
    """What `raylab assess` needs to use the model without the training data (``stats``
    None: each recording is normalised with its own, ``normalize: recording``)."""
    return {
        "method": "skill",
        "config": cfglib.to_dict(cfg),
        "stats": None if stats is None else stats.to_dict(),
        "class_names": list(CLASS_NAMES),
        "n_channels": jigsaws.N_CHANNELS,
        "fold": fold,
    }


def fold_plan(cfg: SkillConfig, name: str, split: str, train: list[Trial],
              evaluate: list[Trial]) -> RunPlan:
    return RunPlan(name, split, eval_rows=window_count(evaluate, cfg.window, cfg.step),
                   data={TRAIN: train, split: evaluate})


@register_method
class SkillMethod(Method):
    name = "skill"
    paper = "Wang & Majewicz Fey 2018, surgical skill CNN on JIGSAWS kinematics"
    Config = SkillConfig
    Task = SkillTask
    main_metric = "accuracy"
    default_space = {
        "window": "[30, 60, 90]",
        "optim.lr": "log(3e-4, 3e-3)",
        "model.dropout_fc": "(0.3, 0.6)",
    }

    def load(self, cfg: SkillConfig) -> SkillData:
        data = load_trials(cfg)
        folds_for(cfg, data.trials)  # an unknown fold name fails here, before Ray
        return data

    def plan(self, cfg: SkillConfig, data: SkillData, tune: bool) -> list[RunPlan]:
        """One run per fold; a Tune trial fits the first fold's training trials minus
        ``val_fraction`` of them and validates on those. The fold's test trials never
        reach Tune: model selection uses only data the final evaluation does not, as the
        paper did."""
        folds = folds_for(cfg, data.trials)
        if tune:
            fold = folds[0]
            train, val = validation_split(fold.train, cfg.val_fraction, cfg.seed)
            return [fold_plan(cfg, VAL, VAL, data.select(train), data.select(val))]
        return [fold_plan(cfg, f.name, TEST, data.select(f.train), data.select(f.test))
                for f in folds]

    def inputs(self, cfg: SkillConfig, data: SkillData, plan: RunPlan
               ) -> tuple[dict[str, Any], dict[str, Any]]:
        train, evaluate = plan.data[TRAIN], plan.data[plan.split]
        rows = data.rows(cfg)
        stats = (channel_stats(rows, {t.name for t in train}) if cfg.normalize == "train"
                 else None)
        datasets = {TRAIN: window_dataset(rows, train, cfg, stats),
                    plan.split: window_dataset(rows, evaluate, cfg, stats)}
        args = {"eval_trial_labels": [t.label for t in evaluate],
                "checkpoint_meta": checkpoint_meta(cfg, stats, plan.name)}
        return datasets, args

    def eval_row_ids(self, cfg: SkillConfig, data: SkillData, plan: RunPlan) -> set[str]:
        """``<trial>@<first frame>`` of every window the plan's evaluation scores."""
        return {f"{t.name}@{k * cfg.step}" for t in plan.data[plan.split]
                for k in range((t.n_frames - cfg.window) // cfg.step + 1)}

    def describe(self, cfg: SkillConfig, options: Any, data: SkillData) -> None:
        print(f"{cfg.task}: {len(data.trials)} trials, {cfg.cv.upper()} "
              f"({len(folds_for(cfg, data.trials))} folds), window {cfg.window} step "
              f"{cfg.step}, {cfg.optim.epochs} epochs", flush=True)

    def after_run(self, cfg: SkillConfig, result: PlanResult) -> None:
        r = fold_result(result)
        print(f"  fold {r['fold']:<12} window acc {r['accuracy']:.3f}  "
              f"trial acc {r['trial_correct']}/{r['trial_total']}  ({r['seconds']:.0f} s)",
              flush=True)

    def summarise(self, cfg: SkillConfig, data: SkillData, results: list[PlanResult]
                  ) -> dict[str, Any]:
        return summarise(cfg, [fold_result(r) for r in results])

    def write_report(self, cfg: SkillConfig, summary: dict[str, Any], folder: Path) -> None:
        write_report(cfg, summary, folder)

    def print_summary(self, summary: dict[str, Any]) -> None:
        print_summary(summary)


def fold_result(result: PlanResult) -> dict[str, Any]:
    """One fold's figures from its final report."""
    test: list[Trial] = result.plan.data[result.plan.split]
    metrics = result.metrics
    key = lambda name: metric_key(result.plan.split, name)  # noqa: E731
    predicted = vote_predictions(metrics[key("votes")], len(test))
    correct = int(sum(int(p == t.label) for p, t in zip(predicted, test)))
    return {
        "fold": result.plan.name,
        "test_trials": len(test),
        "accuracy": float(metrics[key("accuracy")]),
        "loss": float(metrics[key("loss")]),
        "windows": int(metrics[key("rows")]),
        "trial_correct": correct,
        "trial_total": len(test),
        "trial_predictions": {t.name: CLASS_NAMES[int(p)] for p, t in zip(predicted, test)},
        "confusion": metrics[key("confusion")],
        "epochs": int(metrics["epoch"]),
        "checkpoint": result.checkpoint,
        "seconds": round(result.seconds, 2),
    }


def summarise(cfg: SkillConfig, fold_results: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the folds: per-fold and mean accuracy, pooled per-class metrics, votes."""
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


def write_report(cfg: SkillConfig, summary: dict[str, Any], folder: Path) -> None:
    """confusion.png and report.md in the experiment folder."""
    # matplotlib (raylab.plots) only when figures are drawn: its import costs seconds.
    from raylab.plots import plot_confusion

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
