"""Detection and instance segmentation on COCO shards: Mask R-CNN with a ViTDet or CNN
backbone.

Papers: Y. Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection"
(ViTDet, ECCV 2022; detectron2 ``projects/ViTDet``), the first backbone; a timm CNN + FPN
is the second. The pieces are shared with the other detection methods
(:mod:`raylab.tasks.detection`): COCO shards -> Ray Data tasks decode and scale-jitter
image, boxes and masks together on CPU -> Train workers step torchvision's Mask R-CNN
(AdamW, layer-wise lr decay, warm-up + step decay, AMP) -> each worker predicts on its
share of the evaluation images, and the chief scores all of them with COCOeval.

Data: ``--data ROOT`` with one coco shard folder per split (``ROOT/train``,
``ROOT/val``; ``raylab data convert coco`` writes each).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from raylab import config as cfglib
from raylab.data.shards import iter_rows
from raylab.engine.keys import RUN, TEST, TRAIN, VAL, metric_key
from raylab.methods.base import Method, PlanResult, RunPlan
from raylab.metrics.detection import AP_KEYS, frequency_bins
from raylab.models.freeze import freeze_summary
from raylab.registry import register_method
from raylab.runtime.datasets import EpochClock
from raylab.runtime.options import RunOptions
from raylab.tasks.detection.config import DetectionConfig
from raylab.tasks.detection.data import (
    DetectionData,
    eval_dataset,
    holdout_ids,
    load_detection_data,
    row_ids,
    split_folder,
    train_dataset,
)
from raylab.tasks.detection.pictures import augmentation_grid
from raylab.tasks.detection.predict import TrainedDetector, draw_detections, read_image
from raylab.tasks.detection.task import IOU_TYPES, DetectionTask, build_model


def checkpoint_meta(cfg: DetectionConfig, data: DetectionData) -> dict[str, Any]:
    """What a run's model folder needs besides the weights (``raylab predict``)."""
    return {"method": "detection", "config": cfglib.to_dict(cfg),
            "categories": data.categories, "image_size": cfg.image_size}


@register_method
class DetectionMethod(Method):
    name = "detection"
    paper = ("Li et al. 2022, ViTDet (plain ViT backbone, simple feature pyramid, window "
             "attention) with torchvision's Mask R-CNN; timm CNN + FPN as second backbone")
    Config = DetectionConfig
    Task = DetectionTask
    main_metric = "bbox_AP"
    default_space = {
        "optim.lr": "log(3e-5, 3e-4)",
        # The jitter range as its two presets (0.1-2.0 or 0.8-1.25): Optuna's categorical
        # choices must be plain values, not lists.
        "aug.jitter": "[lsj, ssj]",
        "optim.layer_decay": "(0.6, 0.9)",
        "global_blocks": "[2, 4]",
        # Simple Copy-Paste: off, half the images, every image; blended edges or hard ones.
        "aug.copy_paste.prob": "[0.0, 0.5, 1.0]",
        "aug.copy_paste.blend": "[true, false]",
    }
    path_keys = ("data", "backbone_checkpoint", "pseudo")

    def model_from_meta(self, meta: dict[str, Any]) -> Any:
        """The run's detector without its backbone run's folder (the run's own weights,
        loaded next, hold the backbone)."""
        cfg = cfglib.apply_overrides(cfglib.from_dict(DetectionConfig, meta["config"]),
                                     {"backbone_checkpoint": ""})
        return build_model(cfg, len(meta["categories"]) + 1)

    def load(self, cfg: DetectionConfig) -> DetectionData:
        return load_detection_data(cfg)

    def tune_config(self, cfg: DetectionConfig) -> DetectionConfig:
        # ASHA compares trials every epoch (and Tune refuses a result without the metric),
        # so every epoch of a trial is scored.
        return cfglib.apply_overrides(cfg, {"eval_every": 1})

    def plan(self, cfg: DetectionConfig, data: DetectionData, tune: bool) -> list[RunPlan]:
        """``train`` scores the evaluation split; a Tune trial scores ``val_fraction`` of
        the training images (by a hash of the image id), which it does not train on."""
        if tune:  # the held-out image ids travel in the plan (read once)
            held_out = holdout_ids(data.train_paths, cfg.val_fraction)
            return [RunPlan(VAL, VAL, len(held_out), data=held_out)]
        return [RunPlan(RUN, TEST, data.eval_rows)]

    def inputs(self, cfg: DetectionConfig, data: DetectionData, plan: RunPlan
               ) -> tuple[dict[str, Any], dict[str, Any]]:
        labels = data.label_map
        # Pseudo-labeled images (self-training) join the training rows only.
        train_paths = data.train_paths + data.pseudo_paths
        # The augmentation draws follow the epoch the chief sets (a resumed run replays them).
        clock = EpochClock()
        # Only ground truth is pasted (onto labeled and pseudo-labeled images alike) or
        # held out.
        sources = data.train_paths
        if plan.split == VAL:
            train = train_dataset(train_paths, cfg, labels, hold_out=False, epoch=clock,
                                  labeled=sources)
            evaluate = eval_dataset(data.train_paths, cfg, labels, hold_out=True)
            train_rows = data.train_rows + data.pseudo_rows - len(plan.data)
        else:
            train = train_dataset(train_paths, cfg, labels, epoch=clock,
                                  labeled=sources)
            evaluate = eval_dataset(data.eval_paths, cfg, labels)
            train_rows = data.train_rows + data.pseudo_rows
        if cfg.max_train_rows:
            train_rows = min(train_rows, cfg.max_train_rows)
        args = {"categories": data.categories, "train_rows": train_rows, "epoch_clock": clock,
                "checkpoint_meta": checkpoint_meta(cfg, data),
                "ap_bins": None if data.train_counts is None else frequency_bins(
                    data.train_counts, cfg.frequency_ranges())}
        return {TRAIN: train, plan.split: evaluate}, args

    def eval_row_ids(self, cfg: DetectionConfig, data: DetectionData, plan: RunPlan
                     ) -> set[str]:
        """The image ids the plan's evaluation scores (COCO ids are unique across splits)."""
        if plan.split == VAL:
            return {str(i) for i in plan.data}
        return {str(i) for i in row_ids(data.eval_paths)}

    def _params(self, cfg: DetectionConfig, num_classes: int) -> tuple[int, int]:
        """The detector's parameters, all and trainable (``freeze``), built once per config
        (a ViT-B Mask R-CNN takes seconds to build; ``describe`` and ``summarise`` both
        report them)."""
        counts = self.__dict__.setdefault("_param_counts", {})
        key = (repr(cfglib.to_dict(cfg)), num_classes)
        if key not in counts:
            summary = freeze_summary(build_model(cfg, num_classes))
            counts[key] = (summary.total, summary.trainable)
        return counts[key]

    @staticmethod
    def _bins(cfg: DetectionConfig, data: DetectionData) -> dict[str, list[str]]:
        """Bin name -> the names of its categories (AP by class frequency)."""
        if data.train_counts is None:
            return {}
        names = {int(c["id"]): str(c["name"]) for c in data.categories}
        bins = frequency_bins(data.train_counts, cfg.frequency_ranges())
        return {name: [names[i] for i in ids] for name, ids in bins.items()}

    def describe(self, cfg: DetectionConfig, options: RunOptions, data: DetectionData) -> None:
        params, trainable = self._params(cfg, data.num_classes)
        o = cfg.optim
        kind = (f"ViTDet {cfg.model} (window {cfg.window_size}, global blocks "
                f"{cfg.global_blocks}, propagation {cfg.propagation}, pyramid {cfg.pyramid})"
                if cfg.backbone == "vitdet" else f"{cfg.model} + FPN")
        if data.pseudo_rows:
            print(f"self-training: {data.train_rows} labeled + {data.pseudo_rows} "
                  f"pseudo-labeled training images ({cfg.pseudo})", flush=True)
        print(f"Mask R-CNN with {kind}: {params:,} params ({trainable:,} trainable: freeze "
              f"{cfg.freeze}, adapters every {cfg.adapters.every}), {data.num_classes - 1} "
              f"classes, {cfg.image_size} px", flush=True)
        print(f"recipe: AdamW lr {o.lr:g} @ batch {o.reference_batch} -> {o.effective_lr:.3g} "
              f"@ global batch {o.batch_size} ({max(options.workers, 1)} worker(s)), wd "
              f"{o.weight_decay:g}, layer decay {o.layer_decay}, {o.schedule} over {o.epochs} "
              f"epochs ({o.warmup_iters} warm-up iterations), jitter {cfg.aug.jitter} "
              f"{cfg.aug.scale()}, {_copy_paste_text(cfg)}, drop-path {cfg.drop_path:g}, "
              f"{cfg.precision}", flush=True)

    def summarise(self, cfg: DetectionConfig, data: DetectionData, results: list[PlanResult]
                  ) -> dict[str, Any]:
        result = results[0]
        m = result.metrics
        split = result.plan.split
        keys = [*AP_KEYS, *(f"AP_{name}" for name in self._bins(cfg, data))]
        ap = {kind: {k: _number(m.get(metric_key(split, f"{kind}_{k}"))) for k in keys}
              for kind in IOU_TYPES}
        return {
            "method": "detection",
            "backbone": cfg.backbone,
            "model": cfg.model,
            "image_size": cfg.image_size,
            "eval_split": cfg.eval_split,
            "eval_images": data.eval_rows,
            "train_images": data.train_rows,
            "pseudo_images": data.pseudo_rows,
            "classes": data.class_names,
            "frequency_bins": self._bins(cfg, data),
            "epochs": int(m["epoch"]),
            "bbox": ap["bbox"],
            "segm": ap["segm"],
            "train_loss": _number(m.get("train_loss")),
            "train_img_per_s": _number(m.get("img_per_s")),
            "params": self._params(cfg, data.num_classes)[0],
            "trainable_params": self._params(cfg, data.num_classes)[1],
            "freeze": cfg.freeze,
            "checkpoint": result.checkpoint,
            "seconds": round(result.seconds, 1),
        }

    def write_report(self, cfg: DetectionConfig, summary: dict[str, Any], folder: Path) -> None:
        """AP tables, loss and AP curves, and a few evaluation images with detections."""
        # matplotlib (raylab.plots) only when figures are drawn: its import costs seconds.
        from raylab.plots import plot_metric_history, read_metrics

        rows = read_metrics(folder / RUN / "metrics.jsonl")
        losses = plot_metric_history(rows, {k: f"train_{k}" for k in (
            "loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
            "loss_rpn_box_reg")}, "training loss", folder / "losses.png")
        aps = plot_metric_history(rows, {"box AP": metric_key(TEST, "bbox_AP"),
                                         "mask AP": metric_key(TEST, "segm_AP")},
                                  "AP", folder / "ap.png")
        pictures = self._pictures(cfg, summary, folder)
        samples = augmentation_grid(cfg, folder / "samples.png")
        lines = [f"# Detection run: Mask R-CNN, {summary['backbone']} {summary['model']} at "
                 f"{summary['image_size']} px", "",
                 f"{summary['eval_images']} {summary['eval_split']} images, "
                 f"{len(summary['classes'])} classes, after {summary['epochs']} epochs "
                 f"({summary['train_images']} training images"
                 f"{_pseudo_text(summary)}).", "",
                 "| | AP | AP50 | AP75 | APs | APm | APl |", "|---|---|---|---|---|---|---|"]
        for kind, label in (("bbox", "box"), ("segm", "mask")):
            lines.append(f"| {label} | " + " | ".join(_percent(summary[kind][k])
                                                      for k in AP_KEYS) + " |")
        bins = summary.get("frequency_bins") or {}
        if bins:
            lines += ["", f"AP by class frequency ({cfg.ap_bins_count} per category in the "
                          f"training split; n/a: no ground truth of that bin evaluated):", "",
                      "| bin | count range | classes | box AP | mask AP |",
                      "|---|---|---|---|---|"]
            for name, (lo, hi) in cfg.frequency_ranges().items():
                classes = bins.get(name, [])
                shown = ", ".join(classes[:8]) + (" ..." if len(classes) > 8 else "")
                lines.append(f"| {name} | {lo}-{'' if hi is None else hi} | "
                             f"{len(classes)}{': ' + shown if classes else ''} | "
                             f"{_percent(summary['bbox'].get('AP_' + name))} | "
                             f"{_percent(summary['segm'].get('AP_' + name))} |")
        lines += ["", f"- params {summary['params']:,} ({summary['trainable_params']:,} "
                      f"trainable; freeze {summary['freeze']}); training "
                      f"{_fmt(summary['train_img_per_s'])} img/s (all workers); wall time "
                      f"{summary['seconds']:.0f} s", ""]
        for path, caption in ((losses, "training losses per epoch"), (aps, "AP per epoch")):
            if path:
                lines += [f"![{caption}]({Path(path).name})", ""]
        if samples:
            what = ("jittered (left), then after Simple Copy-Paste (right; pasted objects "
                    "boxed in white)" if cfg.aug.copy_paste.prob > 0 else "jittered")
            lines += [f"What the pipeline feeds the model: training images {what}.", "",
                      f"![training samples]({samples.name})", ""]
        lines += [f"![detections on {name}](pictures/{name})" for name in pictures]
        cfglib.atomic_write_text(folder / "report.md", "\n".join(lines) + "\n")

    def _pictures(self, cfg: DetectionConfig, summary: dict[str, Any], folder: Path
                  ) -> list[str]:
        """Draw the final model's detections on the first evaluation images."""
        if not cfg.report_images or not summary.get("checkpoint") or \
                not Path(str(summary["checkpoint"])).exists():
            return []
        detector = TrainedDetector(summary["checkpoint"])
        (folder / "pictures").mkdir(exist_ok=True)
        names = []
        eval_folder = split_folder(cfg, cfg.eval_split)
        for row in iter_rows(eval_folder, columns=["image_id", "file_name", "image"]):
            if len(names) >= cfg.report_images:
                break
            pixels = read_image(row["image"])
            found = detector(pixels, int(row["image_id"]))
            name = f"{Path(str(row['file_name'])).stem}.png"
            draw_detections(pixels, found, detector.names).save(folder / "pictures" / name)
            names.append(name)
        return names

    def print_summary(self, summary: dict[str, Any]) -> None:
        b, s = summary["bbox"], summary["segm"]
        print(f"\nMask R-CNN ({summary['backbone']} {summary['model']}) on "
              f"{summary['eval_images']} {summary['eval_split']} images after "
              f"{summary['epochs']} epochs: box AP {_percent(b['AP'])} (AP50 "
              f"{_percent(b['AP50'])}), mask AP {_percent(s['AP'])} (AP50 "
              f"{_percent(s['AP50'])})")
        print(f"params {summary['params']:,}  train {_fmt(summary['train_img_per_s'])} img/s  "
              f"({summary['seconds']:.0f} s)")


def _pseudo_text(summary: dict[str, Any]) -> str:
    n = summary.get("pseudo_images") or 0
    return f" + {n} pseudo-labeled" if n else ""


def _copy_paste_text(cfg: DetectionConfig) -> str:
    cp = cfg.aug.copy_paste
    if cp.prob <= 0:
        return "no copy-paste"
    edges = f"blended, sigma {cp.sigma:g}" if cp.blend else "hard edges"
    return f"copy-paste p {cp.prob:g} ({edges})"


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _percent(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.1f}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"
