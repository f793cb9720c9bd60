"""ConvNeXt with its training recipe, on image shards streamed through Ray Data.

Paper: Z. Liu et al., "A ConvNet for the 2020s", CVPR 2022 (facebookresearch/ConvNeXt).
The network is timm's ``convnext_*`` (never re-implemented here); what this method adds is
the paper's recipe as defaults (:mod:`.config`) on the shared classification task:

shards (encoded images) -> Ray Data ``map_batches`` on CPU decodes and applies timm's
``create_transform`` (RandAugment, bicubic) -> Train workers normalise and randomly erase
on their device, apply Mixup / CutMix and train with AdamW, cosine per iteration with
warm-up, optional AMP, channels_last, gradient accumulation, ``torch.compile`` and EMA
(:mod:`raylab.tasks.classification`) -> top-1/top-5 counts are all-reduced across workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from raylab import config as cfglib
from raylab.engine.keys import RUN, TEST, TRAIN, VAL, metric_key
from raylab.methods.base import Method, PlanResult, RunPlan
from raylab.methods.convnext.config import ConvNeXtConfig
from raylab.models import count_macs, count_params
from raylab.registry import register_method
from raylab.runtime.options import RunOptions
from raylab.tasks.classification.data import (
    ImageData,
    holdout_paths,
    holdout_rows,
    image_dataset,
    load_image_data,
    row_paths,
)
from raylab.tasks.classification.task import ClassificationTask, build_model

if TYPE_CHECKING:
    from torch import nn


def model_cost(model: nn.Module, input_size: int) -> tuple[int, int]:
    """Parameters and multiply-accumulates at the training resolution."""
    return count_params(model), count_macs(model, (3, input_size, input_size))


@register_method
class ConvNeXtMethod(Method):
    name = "convnext"
    paper = "Liu et al. 2022, ConvNeXt (timm convnext_*) with the paper's training recipe"
    Config = ConvNeXtConfig
    Task = ClassificationTask
    main_metric = "top1"
    default_space = {
        "optim.lr": "log(1e-3, 8e-3)",
        "optim.weight_decay": "log(0.01, 0.1)",
        "drop_path": "(0.0, 0.3)",
        "aug.mixup": "(0.0, 0.8)",
        "aug.cutmix": "(0.0, 1.0)",
    }

    def build_model(self, cfg: ConvNeXtConfig, num_classes: int) -> nn.Module:
        """The network the workers train (random init), for its cost on the driver."""
        return build_model(cfg, num_classes)

    def model_from_meta(self, meta: dict[str, Any]) -> nn.Module:
        cfg = cfglib.from_dict(self.Config, meta["config"])
        return self.build_model(cfg, len(meta["class_names"]))

    def checkpoint_meta(self, cfg: ConvNeXtConfig, class_names: list[str]) -> dict[str, Any]:
        return {"method": self.name, "config": cfglib.to_dict(cfg),
                "class_names": class_names, "input_size": cfg.input_size}

    def load(self, cfg: ConvNeXtConfig) -> ImageData:
        return load_image_data(cfg)

    def plan(self, cfg: ConvNeXtConfig, data: ImageData, tune: bool) -> list[RunPlan]:
        """``train`` evaluates on the eval split; a Tune trial on ``val_fraction`` of the
        training split (by a hash of the image path), which it does not train on."""
        if tune:
            return [RunPlan(VAL, VAL, holdout_rows(data.train_paths, cfg.val_fraction))]
        return [RunPlan(RUN, TEST, data.eval_rows)]

    def inputs(self, cfg: ConvNeXtConfig, data: ImageData, plan: RunPlan
               ) -> tuple[dict[str, Any], dict[str, Any]]:
        if plan.split == VAL:
            train = image_dataset(data.train_paths, cfg, True, hold_out=False,
                                  limit=cfg.max_train_rows)
            evaluate = image_dataset(data.train_paths, cfg, False, hold_out=True)
            train_rows = int(data.train_rows * (1 - cfg.val_fraction))
        else:
            train = image_dataset(data.train_paths, cfg, True, limit=cfg.max_train_rows)
            evaluate = image_dataset(data.eval_paths, cfg, False)
            train_rows = data.train_rows
        args = {"num_classes": len(data.class_names), "train_rows": train_rows,
                "checkpoint_meta": self.checkpoint_meta(cfg, data.class_names),
                "class_names": data.class_names}
        return {TRAIN: train, plan.split: evaluate}, args

    def eval_row_ids(self, cfg: ConvNeXtConfig, data: ImageData, plan: RunPlan) -> set[str]:
        """The image paths the plan's evaluation scores."""
        if plan.split == VAL:
            return set(holdout_paths(data.train_paths, cfg.val_fraction))
        return set(row_paths(data.eval_paths))

    def describe(self, cfg: ConvNeXtConfig, options: RunOptions, data: ImageData) -> None:
        params, macs = model_cost(self.build_model(cfg, len(data.class_names)), cfg.input_size)
        o = cfg.optim
        print(f"{cfg.model}: {params:,} params, {macs / 1e9:.3f} GMACs at {cfg.input_size} px; "
              f"drop-path {cfg.drop_path_rate}", flush=True)
        print(f"recipe: AdamW lr {o.lr:g} @ batch {o.reference_batch} -> {o.effective_lr:.3g} "
              f"@ global batch {o.batch_size} ({max(options.workers, 1)} worker(s) x "
              f"grad_accum {cfg.grad_accum}), wd {o.weight_decay:g}, cosine over {o.epochs} "
              f"epochs with {o.warmup_epochs} warm-up, mixup {cfg.aug.mixup:g} / cutmix "
              f"{cfg.aug.cutmix:g} / smoothing {cfg.aug.smoothing:g}, {cfg.precision}",
              flush=True)

    def warnings(self, cfg: ConvNeXtConfig) -> list[str]:
        """Heavy regularisation on a short schedule (every classification method that
        builds on this one inherits it)."""
        warning = cfg.short_schedule_warning()
        return [warning] if warning else []

    def summarise(self, cfg: ConvNeXtConfig, data: ImageData, results: list[PlanResult]
                  ) -> dict[str, Any]:
        result = results[0]
        m = result.metrics
        key = lambda name: metric_key(result.plan.split, name)  # noqa: E731
        params, macs = model_cost(self.build_model(cfg, len(data.class_names)), cfg.input_size)
        return {
            "method": "convnext",
            "model": cfg.model,
            "input_size": cfg.input_size,
            "eval_split": cfg.eval_split,
            "eval_rows": data.eval_rows,
            "train_rows": data.train_rows,
            "epochs": int(m["epoch"]),
            "top1": float(m[key("top1")]),
            "top5": float(m[key("top5")]),
            "ema_top1": float(m[key("ema_top1")]) if key("ema_top1") in m else None,
            "loss": float(m[key("loss")]),
            "train_img_per_s": float(m["img_per_s"]),
            "params": params,
            "gmacs": macs / 1e9,
            "effective_lr": cfg.optim.effective_lr,
            "checkpoint": result.checkpoint,
            "seconds": round(result.seconds, 1),
        }

    def write_report(self, cfg: ConvNeXtConfig, summary: dict[str, Any], folder: Path) -> None:
        """Learning curves and report.md in the experiment folder."""
        # matplotlib (raylab.plots) only when figures are drawn: its import costs seconds.
        from raylab.plots import plot_metric_history, read_metrics

        rows = read_metrics(folder / RUN / "metrics.jsonl")
        curves = plot_metric_history(rows, {"top-1": "test_top1", "EMA top-1": "test_ema_top1"},
                                     "top-1", folder / "top1.png")
        ema = "" if summary["ema_top1"] is None else f" | EMA top-1 {summary['ema_top1']:.4f}"
        lines = [
            f"# ConvNeXt run: {cfg.model} at {cfg.input_size} px",
            "",
            f"top-1 {summary['top1']:.4f} | top-5 {summary['top5']:.4f}{ema} on "
            f"{summary['eval_rows']} {cfg.eval_split} images after {summary['epochs']} epochs.",
            "",
            f"- params {summary['params']:,}, {summary['gmacs']:.3f} GMACs per image",
            f"- training throughput {summary['train_img_per_s']:.1f} img/s (all workers)",
            f"- lr {summary['effective_lr']:.3g} (scaled from {cfg.optim.lr:g} at batch "
            f"{cfg.optim.reference_batch} to {cfg.optim.batch_size}), wd "
            f"{cfg.optim.weight_decay:g}",
            f"- wall time {summary['seconds']:.0f} s",
            "",
        ]
        if curves:
            lines += ["![top-1 per epoch](top1.png)", ""]
        cfglib.atomic_write_text(folder / "report.md", "\n".join(lines))

    def print_summary(self, summary: dict[str, Any]) -> None:
        line = (f"\n{summary['model']} on {summary['eval_rows']} {summary['eval_split']} images "
                f"after {summary['epochs']} epochs: top-1 {summary['top1']:.4f}, "
                f"top-5 {summary['top5']:.4f}")
        if summary.get("ema_top1") is not None:
            line += f", EMA top-1 {summary['ema_top1']:.4f}"
        print(line)
        print(f"params {summary['params']:,}  GMACs {summary['gmacs']:.3f} at "
              f"{summary['input_size']} px  train {summary['train_img_per_s']:.1f} img/s  "
              f"({summary['seconds']:.0f} s)")
