"""STEGO: unsupervised semantic segmentation by distilling feature correspondences.

Paper: M. Hamilton et al., "Unsupervised Semantic Segmentation by Distilling Feature
Correspondences", ICLR 2022 (mhamilton723/STEGO). The pieces are pure torch elsewhere
(:mod:`raylab.losses.stego`, :mod:`raylab.models.stego`,
:mod:`raylab.metrics.segmentation`); this module wires them:

segmentation shards (``raylab data convert segmentation``) -> a Ray Data batch-inference
job embeds every image once with the frozen DINO backbone of a ``raylab train dino`` run
and finds each training image's nearest neighbours (:mod:`.features`, cached beside the
shards) -> Train workers train the segmentation head on the cached features with the
correspondence loss, and the cluster and linear probes on its detached code
(:mod:`.task`) -> rank 0 scores the evaluation split: the cluster probe's unsupervised
mIoU and accuracy after Hungarian matching (the paper's metric), the linear probe's, and
after the last epoch the paper's baseline, cosine k-means and a linear probe on the raw
DINO features of the same backbone.

Labels are read for the probes and the scores only: the head never sees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from raylab import config as cfglib
from raylab.data import segmentation
from raylab.engine.checkpoint import load_checkpoint, load_meta
from raylab.engine.keys import RUN, TEST, TRAIN, VAL, metric_key
from raylab.errors import CheckpointError, ConfigError
from raylab.methods.base import Method, PlanResult, RunPlan
from raylab.methods.stego.config import StegoConfig
from raylab.methods.stego.features import (
    FeatureCache,
    backbone_input_size,
    build_cache,
    cache_folder,
    decode_batch,
    source_of,
)
from raylab.methods.stego.models import StegoModel, predict, score
from raylab.methods.stego.task import BANK, EVAL, StegoTask
from raylab.metrics.segmentation import per_class_table
from raylab.registry import register_method
from raylab.runtime.options import RunOptions
from raylab.tasks.classification.data import HoldOut, in_val, row_paths

#: The scores of a run, each with ``_miou`` and ``_accuracy``: the head's cluster probe
#: (unsupervised) and linear probe, and the baseline's k-means and linear probe on the
#: raw features.
SCORES = {"cluster": "STEGO cluster probe (unsupervised)",
          "linear": "STEGO linear probe",
          "kmeans": "k-means on raw features (unsupervised)",
          "raw_linear": "linear probe on raw features"}


@dataclass
class StegoData:
    """What the driver knows before Ray starts; ``cache`` once the features exist."""

    class_names: list[str]
    rows: dict[str, int]
    cache: FeatureCache | None = None


def cache_dataset(cache: FeatureCache, split: str, columns: list[str], cfg: StegoConfig,
                  *, training: bool, hold_out: bool | None = None) -> Any:
    """A split of the feature cache as decoded arrays; ``hold_out`` as in the image
    methods (by the source image, so an image's five crops stay on one side)."""
    from raylab.runtime.datasets import read_shards

    ds = read_shards(cache.paths(split), columns + ["source"], shuffle_files=training,
                     materialize_mb=cfg.materialize_mb)
    if hold_out is not None and cfg.val_fraction > 0:
        ds = ds.map_batches(HoldOut(cfg.val_fraction, keep_val=hold_out, column="source"),
                            batch_format="numpy")
    return ds.map_batches(decode_batch, fn_kwargs={"shape": list(cache.shape),
                                                   "size": cache.img_size},
                          batch_format="numpy")


@register_method
class StegoMethod(Method):
    name = "stego"
    paper = ("Hamilton et al. 2022, STEGO: unsupervised segmentation on frozen DINO "
             "features (Hungarian mIoU)")
    Config = StegoConfig
    Task = StegoTask
    main_metric = "cluster_miou"
    path_keys = ("data", "backbone", "feature_cache")
    whole_datasets = (BANK, EVAL)
    default_space = {
        "loss.self_shift": "(0.0, 0.5)",
        "loss.knn_shift": "(0.0, 0.5)",
        "loss.rand_shift": "(0.2, 1.0)",
        "loss.self_weight": "(0.0, 1.0)",
        "loss.knn_weight": "(0.0, 1.0)",
        "loss.rand_weight": "(0.0, 1.0)",
    }

    def tune_config(self, cfg: StegoConfig) -> StegoConfig:
        # ASHA compares trials every epoch, so every epoch must carry the metric; the
        # k-means baseline is the same in every trial and is left to `raylab train`.
        return cfglib.apply_overrides(cfg, {"eval_every": 1, "kmeans_iters": 0})

    def load(self, cfg: StegoConfig) -> StegoData:
        if not cfg.backbone:
            raise ConfigError("config key 'backbone': expected a raylab DINO checkpoint "
                              "folder (--set backbone=RUNS/<exp>/run/model), got ''")
        names = segmentation.class_names(cfg.data)
        rows = segmentation.split_rows(cfg.data)
        for key in ("train_split", "eval_split"):
            split = getattr(cfg, key)
            if split not in rows:
                raise ConfigError(f"config key {key!r}: expected a split of {cfg.data} "
                                  f"({', '.join(rows)}), got {split!r}")
        meta = load_meta(cfg.backbone)
        if meta.get("method") != "dino":
            raise CheckpointError(f"{cfg.backbone}: not a raylab DINO checkpoint (method "
                                  f"{meta.get('method')!r}); STEGO's backbone is a DINO run's")
        data = StegoData(names, rows)
        folder = cache_folder(cfg)
        if (folder / "shards").exists():
            data.cache = FeatureCache.open(folder)
        return data

    def prepare(self, cfg: StegoConfig, data: StegoData, options: RunOptions) -> StegoData:
        """The feature job (once per backbone and input size; Ray must be running)."""
        if data.cache is None:
            print(f"STEGO: embedding {cfg.train_split} and {cfg.eval_split} with the frozen "
                  f"backbone (cached in {cache_folder(cfg)})", flush=True)
            gpus = 1.0 if options.gpus_per_worker > 0 else 0.0
            data.cache = build_cache(cfg, [cfg.train_split, cfg.eval_split], gpus)
        return data

    def plan(self, cfg: StegoConfig, data: StegoData, tune: bool) -> list[RunPlan]:
        """``train`` scores the eval split; a Tune trial scores the training images held out
        by a hash of their source image (an image's five crops stay together) and trains
        on the rest."""
        if tune:
            return [RunPlan(VAL, VAL, len(self._holdout(cfg)))]
        return [RunPlan(RUN, TEST, data.rows[cfg.eval_split])]

    def _holdout(self, cfg: StegoConfig) -> list[str]:
        paths = row_paths(segmentation.split_paths(cfg.data, cfg.train_split))
        sources = [source_of(p) for p in paths]
        return [p for p, keep in zip(paths, in_val(sources, cfg.val_fraction)) if keep]

    def eval_row_ids(self, cfg: StegoConfig, data: StegoData, plan: RunPlan) -> set[str]:
        if plan.split == VAL:
            return set(self._holdout(cfg))
        return set(row_paths(segmentation.split_paths(cfg.data, cfg.eval_split)))

    def inputs(self, cfg: StegoConfig, data: StegoData, plan: RunPlan
               ) -> tuple[dict[str, Any], dict[str, Any]]:
        cache = data.cache
        if cache is None:
            raise RuntimeError("STEGO: the feature cache is built by Method.prepare first")
        train_hold_out = False if plan.split == VAL else None
        datasets = {
            TRAIN: cache_dataset(cache, cfg.train_split, ["index", "feats", "label"], cfg,
                                 training=True, hold_out=train_hold_out),
            BANK: cache_dataset(cache, cfg.train_split, ["index", "feats"], cfg,
                                training=False),
            EVAL: (cache_dataset(cache, cfg.train_split, ["feats", "label"], cfg,
                                 training=False, hold_out=True) if plan.split == VAL else
                   cache_dataset(cache, cfg.eval_split, ["feats", "label"], cfg,
                                 training=False)),
        }
        train_rows = cache.rows[cfg.train_split]
        args = {"num_classes": len(data.class_names), "feature_shape": list(cache.shape),
                "img_size": cache.img_size, "knn": cache.knn(cfg.train_split),
                "train_rows": train_rows,
                "checkpoint_meta": {"method": "stego", "config": cfglib.to_dict(cfg),
                                    "class_names": data.class_names,
                                    "feature_shape": list(cache.shape),
                                    "img_size": cache.img_size}}
        return datasets, args

    def describe(self, cfg: StegoConfig, options: RunOptions, data: StegoData) -> None:
        size = backbone_input_size(cfg.backbone, cfg.img_size)
        print(f"STEGO on {len(data.class_names)} classes: frozen DINO backbone "
              f"{cfg.backbone} ({cfg.backbone_weights}) at {size} px, code dim "
              f"{cfg.code_dim}, {data.rows[cfg.train_split]} training images", flush=True)

    def summarise(self, cfg: StegoConfig, data: StegoData, results: list[PlanResult]
                  ) -> dict[str, Any]:
        result = results[0]
        m = result.metrics
        key = lambda name: metric_key(result.plan.split, name)  # noqa: E731
        scores = {f"{name}_{what}": float(m[key(f"{name}_{what}")])
                  for name in SCORES for what in ("miou", "accuracy")
                  if key(f"{name}_{what}") in m}
        assert data.cache is not None
        return {
            "method": "stego",
            "backbone": cfg.backbone,
            "backbone_weights": cfg.backbone_weights,
            "img_size": data.cache.img_size,
            "feature_shape": list(data.cache.shape),
            "classes": len(data.class_names),
            "epochs": int(m["epoch"]),
            **scores,
            "train_loss": float(m["train_loss"]),
            "train_split": cfg.train_split,
            "train_rows": data.rows[cfg.train_split],
            "eval_split": cfg.eval_split,
            "eval_rows": data.rows[cfg.eval_split],
            "feature_cache": str(data.cache.folder),
            "checkpoint": result.checkpoint,
            "seconds": round(result.seconds, 1),
        }

    def write_report(self, cfg: StegoConfig, summary: dict[str, Any], folder: Path) -> None:
        write_report(cfg, summary, folder, self.load(cfg))

    def print_summary(self, summary: dict[str, Any]) -> None:
        print(f"\nSTEGO after {summary['epochs']} epochs on {summary['eval_rows']} "
              f"{summary['eval_split']} images ({summary['classes']} classes):")
        for name, title in SCORES.items():
            if f"{name}_miou" in summary:
                print(f"  {title:<40} mIoU {summary[f'{name}_miou']:5.1f}  accuracy "
                      f"{summary[f'{name}_accuracy']:5.1f}")


def trained_model(checkpoint: str | Path) -> tuple[StegoModel, dict[str, Any]]:
    """A STEGO run's head and probes from its checkpoint (eval mode), with its meta."""
    meta = load_meta(checkpoint)
    if meta.get("method") != "stego":
        raise CheckpointError(f"{checkpoint}: not a STEGO checkpoint")
    cfg = meta["config"]
    model = StegoModel(int(meta["feature_shape"][0]), int(cfg["code_dim"]),
                       float(cfg["dropout"]), len(meta["class_names"]))
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    return model.eval(), meta


def _eval_rows(cache: FeatureCache, split: str) -> list[dict[str, Any]]:
    rows = []
    for path in cache.paths(split):
        table = pq.read_table(path, columns=["path", "feats", "label"])
        rows += table.to_pylist()
    return rows


def write_report(cfg: StegoConfig, summary: dict[str, Any], folder: Path, data: StegoData,
                 n_images: int = 4) -> None:
    """The per-class IoU table (cluster probe after matching, linear probe), overlays of
    image, ground truth and both predictions, the loss curve, and report.md."""
    from raylab.plots import plot_metric_history, plot_segmentations, read_metrics

    cache = data.cache
    lines = [f"# STEGO run: {summary['classes']} classes, backbone {cfg.backbone} "
             f"({cfg.backbone_weights})", ""]
    lines += ["| what | mIoU % | accuracy % |", "|---|---|---|"]
    for name, title in SCORES.items():
        if f"{name}_miou" in summary:
            lines.append(f"| {title} | {summary[f'{name}_miou']:.1f} | "
                         f"{summary[f'{name}_accuracy']:.1f} |")
    lines += ["", f"{summary['eval_rows']} {cfg.eval_split} images at {summary['img_size']} "
              f"px (features {summary['feature_shape']}), after {summary['epochs']} epochs on "
              f"{summary['train_rows']} {cfg.train_split} images. Loss weights (self, knn, "
              f"random) {list(cfg.loss.weights())}, shifts {list(cfg.loss.shifts())}.", ""]
    if summary.get("checkpoint") and cache is not None:
        model, _ = trained_model(summary["checkpoint"])
        rows = _eval_rows(cache, cfg.eval_split)
        decoded = decode_batch({"feats": np.array([r["feats"] for r in rows], dtype=object),
                                "label": np.array([r["label"] for r in rows], dtype=object)},
                               list(cache.shape), cache.img_size)
        feats = torch.from_numpy(decoded["feats"].astype(np.float32))
        labels = torch.from_numpy(decoded["label"].astype(np.int64))
        n_classes = len(data.class_names)
        batches = [(feats[i:i + 16], labels[i:i + 16]) for i in range(0, len(feats), 16)]
        metrics = score(batches, model, n_classes, cache.img_size)
        cluster = metrics["cluster"].result()
        linear = metrics["linear"].result()
        summary["cluster_iou"] = dict(per_class_table(cluster, data.class_names))
        summary["linear_iou"] = dict(per_class_table(linear, data.class_names))
        lines += ["## IoU per class", "", "| class | cluster probe % | linear probe % |",
                  "|---|---|---|"]
        for name in data.class_names:
            c, lin = summary["cluster_iou"][name], summary["linear_iou"][name]
            lines.append(f"| {name} | {_pct(c)} | {_pct(lin)} |")
        lines.append("")
        shown = _overlays(model, rows[:n_images], feats[:n_images], labels[:n_images],
                          cluster, cfg, cache.img_size)
        if shown:
            plot_segmentations(shown, data.class_names, folder / "segmentations.png")
            lines += ["Image, ground truth, cluster probe (clusters coloured by their "
                      "matched class) and linear probe:", "",
                      "![segmentations](segmentations.png)", ""]
    history = read_metrics(folder / RUN / "metrics.jsonl")
    plot_metric_history(history, {"cluster mIoU": metric_key(TEST, "cluster_miou"),
                                  "linear mIoU": metric_key(TEST, "linear_miou")},
                        "mIoU %", folder / "miou.png")
    plot_metric_history(history, {"loss": "train_loss"}, "train loss", folder / "loss.png")
    lines += ["![mIoU](miou.png)", "", "![loss](loss.png)", ""]
    cfglib.atomic_write_text(folder / "report.md", "\n".join(lines))


def _pct(value: float) -> str:
    return "-" if value != value else f"{value:.1f}"


def _overlays(model: StegoModel, rows: list[dict[str, Any]], feats: torch.Tensor,
              labels: torch.Tensor, cluster: dict[str, Any], cfg: StegoConfig,
              size: int) -> list[dict[str, np.ndarray]]:
    """Panels for :func:`raylab.plots.plot_segmentations`: the source image (cropped as
    the backbone saw it), its labels and both probes' predictions."""
    from PIL import Image

    from raylab.data.shards import iter_rows
    from raylab.methods.stego.features import square_crop
    from raylab.transforms.images import decode_image

    wanted = {r["path"] for r in rows}
    images = {}
    for row in iter_rows(cfg.data, columns=["image", "path"]):
        if row["path"] in wanted:
            images[row["path"]] = row["image"]
        if len(images) == len(wanted):
            break
    assignment = np.asarray(cluster.get("assignment", []), dtype=np.int64)
    preds = predict(model, feats, size)
    out = []
    for i, row in enumerate(rows):
        if row["path"] not in images:
            continue
        img = square_crop(decode_image(images[row["path"]], row["path"]), size,
                          Image.BILINEAR)
        ids = preds["cluster"][i].numpy()
        matched = assignment[ids] if len(assignment) else ids
        out.append({"image": np.asarray(img), "ground truth": labels[i].numpy(),
                    "cluster probe": np.where(matched < 0, 255, matched),
                    "linear probe": preds["linear"][i].numpy()})
    return out


__all__ = ["SCORES", "StegoData", "StegoMethod", "trained_model"]
