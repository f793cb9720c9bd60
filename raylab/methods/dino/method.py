"""DINO: self-distillation with no labels, on image shards streamed through Ray Data.

Paper: M. Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
ICCV 2021 (facebookresearch/dino). The pieces are pure torch elsewhere
(:mod:`raylab.losses.dino`, :mod:`raylab.models.dino`, :mod:`raylab.transforms.multicrop`,
:mod:`raylab.metrics.knn`); the worker side is :mod:`.task`; this module is the wiring:

shards -> Ray Data ``map_batches`` decodes and cuts 2 global + N local crops (uint8) ->
Train workers run :class:`~raylab.methods.dino.task.DINOTask` -> rank 0 evaluates the
teacher's features with a weighted k-NN every ``eval_every`` epochs and a linear probe at
the end.

Data: an ImageFolder shard folder (``train_split``/``eval_split`` such as train/test) or a
CLEAR stream folder, whose splits are its buckets' shard folders (``bucket_00``, ...). DINO
trains on ``train_split`` without its labels, so that may be CLEAR's unlabeled bucket 0;
the k-NN bank and the linear probe's training set come from ``knn_split`` (default: the
train split), which must be labelled, and both are scored on ``eval_split``. CLEAR's
"unsupervised representation" setting pre-trains on bucket 0::

    raylab train dino --data STREAM --set train_split=bucket_00 --set knn_split=bucket_01 \\
        --set eval_split=bucket_02 ...

The teacher's backbone is reusable as a frozen feature extractor by other methods via
:func:`raylab.models.backbones.load_backbone` (e.g. ``raylab train clear --set
features=CHECKPOINT``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from raylab import config as cfglib
from raylab.data import fs
from raylab.data.clear import is_stream
from raylab.data.shards import iter_rows
from raylab.engine.checkpoint import load_meta
from raylab.engine.keys import RUN, TEST, TRAIN, VAL, metric_key
from raylab.methods.base import Method, PlanResult, RunPlan
from raylab.methods.dino.config import DINOConfig
from raylab.methods.dino.task import KNN_BANK, KNN_QUERY, DINOTask
from raylab.models import count_params
from raylab.models.backbones import backbone_from_config, load_backbone
from raylab.models.dino import cls_attention_maps
from raylab.registry import register_method
from raylab.runtime.datasets import without_allocator_if_small_files
from raylab.runtime.options import RunOptions
from raylab.tasks.classification.data import (
    ImageData,
    encoded_images,
    holdout_paths,
    holdout_rows,
    knn_split_name,
    load_image_data,
    row_paths,
    transform_batch,
)
from raylab.transforms.images import build_transform, decode_image


def crop_dataset(paths: list[str], cfg: DINOConfig, hold_out: bool | None, limit: int) -> Any:
    """Multi-crop batches (uint8) for training, cut in Ray Data tasks."""
    ds = encoded_images(paths, cfg, True, hold_out, limit)
    ds = ds.map_batches(transform_batch, fn_kwargs=dict(
        kind="multicrop", out_dtype="uint8", img_size=cfg.img_size, n_local=cfg.n_local_crops,
        global_scale=tuple(cfg.global_scale), local_scale=tuple(cfg.local_scale)),
        batch_format="numpy", batch_size=32)
    # Per row at most 2 global + n_local crops of img_size^2 uint8 pixels (locals are smaller).
    return without_allocator_if_small_files(
        ds, paths, (2 + cfg.n_local_crops) * cfg.img_size ** 2 * 3)


def eval_dataset(paths: list[str], cfg: DINOConfig, hold_out: bool | None,
                 limit: int = 0) -> Any:
    """Centre-cropped images for feature extraction (k-NN bank or queries)."""
    ds = encoded_images(paths, cfg, False, hold_out, limit)
    ds = ds.map_batches(transform_batch, fn_kwargs=dict(
        kind="classify", is_training=False, input_size=cfg.img_size, out_dtype="uint8"),
        batch_format="numpy", batch_size=128)
    return without_allocator_if_small_files(ds, paths, cfg.img_size ** 2 * 3)


@register_method
class DINOMethod(Method):
    name = "dino"
    paper = "Caron et al. 2021, DINO self-distillation (timm ViT/ResNet), k-NN + linear eval"
    Config = DINOConfig
    Task = DINOTask
    main_metric = "knn_top1"
    whole_datasets = (KNN_BANK, KNN_QUERY)
    default_space = {
        "teacher_temp": "(0.04, 0.07)",
        "momentum_teacher": "[0.99, 0.996, 0.999]",
        "n_local_crops": "[2, 6, 10]",
        "optim.lr": "log(2e-4, 2e-3)",
    }

    def load(self, cfg: DINOConfig) -> ImageData:
        return load_image_data(cfg)

    def tune_config(self, cfg: DINOConfig) -> DINOConfig:
        # ASHA compares trials every epoch, so every epoch must carry the metric.
        return cfglib.apply_overrides(cfg, {"eval_every": 1})

    def plan(self, cfg: DINOConfig, data: ImageData, tune: bool) -> list[RunPlan]:
        """``train`` scores the eval split's images against the k-NN split's; a Tune trial
        scores a hold-out of the k-NN split (by a hash of the image path) against the
        rest of it. When the k-NN split is the train split, the hold-out is also kept out
        of training, so Tune's queries are never trained on."""
        if tune:
            return [RunPlan(VAL, VAL, holdout_rows(data.knn_paths, cfg.val_fraction))]
        return [RunPlan(RUN, TEST, data.eval_rows)]

    def inputs(self, cfg: DINOConfig, data: ImageData, plan: RunPlan
               ) -> tuple[dict[str, Any], dict[str, Any]]:
        shared = knn_split_name(cfg) == cfg.train_split
        bank_limit = cfg.max_train_rows if shared else 0
        train_rows = data.train_rows
        if plan.split == VAL:
            train_hold_out = False if shared else None
            if shared:
                train_rows = int(data.train_rows * (1 - cfg.val_fraction))
            datasets = {
                TRAIN: crop_dataset(data.train_paths, cfg, train_hold_out, cfg.max_train_rows),
                KNN_BANK: eval_dataset(data.knn_paths, cfg, False, bank_limit),
                KNN_QUERY: eval_dataset(data.knn_paths, cfg, True),
            }
        else:
            datasets = {
                TRAIN: crop_dataset(data.train_paths, cfg, None, cfg.max_train_rows),
                KNN_BANK: eval_dataset(data.knn_paths, cfg, None, bank_limit),
                KNN_QUERY: eval_dataset(data.eval_paths, cfg, None),
            }
        args = {"num_classes": len(data.class_names), "train_rows": train_rows,
                "checkpoint_meta": {"method": "dino", "config": cfglib.to_dict(cfg),
                                    "class_names": data.class_names}}
        return datasets, args

    def eval_row_ids(self, cfg: DINOConfig, data: ImageData, plan: RunPlan) -> set[str]:
        """The image paths of the plan's k-NN queries."""
        if plan.split == VAL:
            return set(holdout_paths(data.knn_paths, cfg.val_fraction))
        return set(row_paths(data.eval_paths))

    def describe(self, cfg: DINOConfig, options: RunOptions, data: ImageData) -> None:
        params = count_params(backbone_from_config(cfglib.to_dict(cfg)))
        print(f"DINO {cfg.arch} at {cfg.img_size} px ({params:,} backbone params), "
              f"2 global + {cfg.n_local_crops} local crops, lr {cfg.effective_lr:.3g} for "
              f"global batch {cfg.optim.batch_size}", flush=True)

    def summarise(self, cfg: DINOConfig, data: ImageData, results: list[PlanResult]
                  ) -> dict[str, Any]:
        result = results[0]
        m = result.metrics
        key = lambda name: metric_key(result.plan.split, name)  # noqa: E731
        return {
            "method": "dino",
            "arch": cfg.arch,
            "img_size": cfg.img_size,
            "epochs": int(m["epoch"]),
            "knn_top1": float(m[key("knn_top1")]),
            "knn_top1_student": (float(m[key("knn_top1_student")])
                                 if key("knn_top1_student") in m else None),
            "knn_k": cfg.knn_k,
            "linear_top1": float(m.get(key("linear_top1"), float("nan"))),
            "train_loss": float(m["train_loss"]),
            "img_per_s": float(m["img_per_s"]),
            "backbone_params": count_params(backbone_from_config(cfglib.to_dict(cfg))),
            "train_split": cfg.train_split,
            "knn_split": knn_split_name(cfg),
            "knn_rows": data.knn_rows,
            "eval_split": cfg.eval_split,
            "eval_rows": data.eval_rows,
            "checkpoint": result.checkpoint,
            "seconds": round(result.seconds, 1),
        }

    def write_report(self, cfg: DINOConfig, summary: dict[str, Any], folder: Path) -> None:
        write_report(cfg, summary, folder)

    def print_summary(self, summary: dict[str, Any]) -> None:
        print(f"\nDINO {summary['arch']} after {summary['epochs']} epochs: k-NN top-1 "
              f"{summary['knn_top1']:.4f} (k={summary['knn_k']}), linear probe top-1 "
              f"{summary['linear_top1']:.4f} on {summary['eval_rows']} "
              f"{summary['eval_split']} images; {summary['img_per_s']:.1f} img/s "
              f"({summary['seconds']:.0f} s)")
        if summary.get("attention"):
            print(f"attention maps: {summary['attention']}")


def attention_figures(checkpoint: str | Path, data: str, split: str, out: Path,
                      n_images: int = 4) -> list[Path]:
    """CLS attention of each head of the teacher's last block, overlaid on a few images.

    ``data`` is an ImageFolder shard folder or a CLEAR stream (``split``: a bucket folder).
    """
    # matplotlib (raylab.plots) only when figures are drawn: its import costs seconds.
    from raylab.plots import plot_attention_maps

    backbone = load_backbone(checkpoint)
    if not hasattr(backbone, "blocks"):
        return []  # a ResNet has no attention to show
    img_size = int(load_meta(checkpoint)["config"]["img_size"])
    transform = build_transform(False, img_size)
    rows = []
    if is_stream(data):  # a bucket's shard folder holds that bucket only
        source, columns = fs.join(data, split), ["image", "path"]
    else:
        source, columns = data, ["image", "path", "split"]
    for row in iter_rows(source, columns=columns):
        if row.get("split", split) == split:
            rows.append(row)
        if len(rows) == n_images:
            break
    written = []
    out.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        img = decode_image(row["image"], row["path"])
        x = transform(img)[None]
        maps = cls_attention_maps(backbone, x)[0].numpy()
        shown = np.asarray(img.resize((img_size, img_size)))
        written.append(plot_attention_maps(shown, maps, out / f"attention_{i}.png",
                                           title=Path(row["path"]).name))
    return written


def write_report(cfg: DINOConfig, summary: dict[str, Any], folder: Path) -> None:
    """Attention maps, k-NN and loss curves and report.md (adds ``attention`` to the
    summary)."""
    from raylab.plots import plot_metric_history, read_metrics

    if summary["checkpoint"]:
        figures = attention_figures(summary["checkpoint"], cfg.data, cfg.eval_split, folder)
        summary["attention"] = [str(p) for p in figures]
    rows = read_metrics(folder / RUN / "metrics.jsonl")
    curves = {"k-NN top-1 (teacher)": metric_key(TEST, "knn_top1")}
    if cfg.knn_student:
        curves["k-NN top-1 (student)"] = metric_key(TEST, "knn_top1_student")
    plot_metric_history(rows, curves, "k-NN top-1", folder / "knn_top1.png")
    plot_metric_history(rows, {"DINO loss": "train_loss"}, "train loss", folder / "loss.png")
    lines = [
        f"# DINO run: {cfg.arch} at {cfg.img_size} px",
        "",
        f"k-NN top-1 {summary['knn_top1']:.4f} (k={cfg.knn_k}, T={cfg.knn_temperature}); "
        f"linear probe top-1 {summary['linear_top1']:.4f}; on {summary['eval_rows']} "
        f"{cfg.eval_split} images with the {summary['knn_rows']} {summary['knn_split']} "
        f"images as the bank and probe training set, after {summary['epochs']} epochs of "
        f"DINO on {cfg.train_split}.",
        "",
    ]
    if summary.get("knn_top1_student") is not None:
        lines += [f"The student's features: k-NN top-1 {summary['knn_top1_student']:.4f} "
                  "(the teacher is the exported extractor).", ""]
    lines += [
        f"- crops: 2 x {cfg.img_size} px global + {cfg.n_local_crops} local",
        f"- teacher momentum {cfg.momentum_teacher} -> 1 (cosine), teacher temperature "
        f"{cfg.warmup_teacher_temp} -> {cfg.teacher_temp} over "
        f"{cfg.warmup_teacher_temp_epochs} epochs, student {cfg.student_temp}",
        f"- lr {cfg.effective_lr:.3g} (= {cfg.optim.lr:g} x {cfg.optim.batch_size}/256), "
        f"weight decay {cfg.optim.weight_decay} -> {cfg.optim.weight_decay_end}",
        f"- {summary['img_per_s']:.1f} img/s, wall time {summary['seconds']:.0f} s",
        "",
    ]
    for name in ("knn_top1.png", "loss.png"):
        if (folder / name).is_file():
            lines += [f"![{name}]({name})", ""]
    for p in summary.get("attention", []):
        lines += [f"![attention]({Path(p).name})", ""]
    cfglib.atomic_write_text(folder / "report.md", "\n".join(lines))
