"""DINO: self-distillation with no labels, on image shards streamed through Ray Data.

Paper: M. Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
ICCV 2021 (facebookresearch/dino). The pieces are pure torch elsewhere
(:mod:`raylab.losses.dino`, :mod:`raylab.models.dino`, :mod:`raylab.transforms.multicrop`,
:mod:`raylab.metrics.knn`); this module is the wiring:

shards -> Ray Data ``map_batches`` decodes and cuts 2 global + N local crops (uint8) ->
Train workers normalise on the device, run student (all crops) and teacher (global crops),
take the DINO loss, all-reduce the center, clip per parameter, freeze the last layer in
the first epoch(s), step AdamW with cosine lr and weight-decay schedules, and move the
teacher by an EMA with a cosine momentum schedule -> rank 0 evaluates the teacher's
features with a weighted k-NN every ``eval_every`` epochs and a linear probe at the end.

Data: an ImageFolder shard folder (``train_split``/``eval_split`` such as train/test) or a
CLEAR stream folder, whose splits are its buckets' shard folders (``bucket_00``, ...). DINO
trains on ``train_split`` without its labels, so that may be CLEAR's unlabeled bucket 0;
the k-NN bank and the linear probe's training set come from ``knn_split`` (default: the
train split), which must be labelled, and both are scored on ``eval_split``. CLEAR's
"unsupervised representation" setting pre-trains on bucket 0::

    raylab train dino --data STREAM --set train_split=bucket_00 --set knn_split=bucket_01 \
        --set eval_split=bucket_02 ...

The teacher's backbone is reusable as a frozen feature extractor by other methods via
:func:`load_backbone` (e.g. ``raylab train clear --set features=CHECKPOINT``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from raylab import config as cfglib
from raylab.errors import CheckpointError, ConfigError
from raylab.methods.base import Method, save_run_record
from raylab.methods.image_data import (
    ImageData,
    encoded_images,
    knn_split_name,
    load_image_data,
    transform_batch,
)
from raylab.registry import register_method
from raylab.runtime.options import RunOptions, local_path

log = logging.getLogger("raylab")


@dataclass
class DINOOptimConfig:
    """The reference's defaults (ViT-S/16 recipe); lr is per 256 images."""

    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    #: Global batch over all workers.
    batch_size: int = 64
    epochs: int = 100
    #: Per-parameter gradient-norm clip (0 turns it off).
    clip_grad: float = 3.0
    #: Epochs during which the head's last layer gets no update.
    freeze_last_layer: int = 1

    def validate(self) -> None:
        cfglib.require(self.lr > 0, "optim.lr", "a positive number", self.lr)
        cfglib.require(self.min_lr >= 0, "optim.min_lr", ">= 0", self.min_lr)
        cfglib.require(self.batch_size >= 2, "optim.batch_size", "an integer >= 2",
                       self.batch_size)
        cfglib.require(self.epochs >= 1, "optim.epochs", "an integer >= 1", self.epochs)
        cfglib.require(0 <= self.warmup_epochs <= self.epochs, "optim.warmup_epochs",
                       f"in [0, epochs={self.epochs}]", self.warmup_epochs)
        cfglib.require(self.weight_decay >= 0 and self.weight_decay_end >= 0,
                       "optim.weight_decay", ">= 0", self.weight_decay)
        cfglib.require(self.clip_grad >= 0, "optim.clip_grad", ">= 0", self.clip_grad)
        cfglib.require(self.freeze_last_layer >= 0, "optim.freeze_last_layer", ">= 0",
                       self.freeze_last_layer)


@dataclass
class DINOConfig:
    data: str = ""
    #: Any timm vit_* / deit_* / resnet* name; random init.
    arch: str = "vit_small_patch16_224"
    #: Global crop size; local crops scale with it (96 at 224, 16 at 32).
    img_size: int = 224
    #: Overrides the ViT's patch size (e.g. 4 for 32 px images).
    patch_size: int | None = None
    #: Overrides the ViT's depth (blocks), e.g. 6 for a CPU budget; null keeps the name's.
    depth: int | None = None
    drop_path: float = 0.1
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    n_local_crops: int = 6
    global_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    momentum_teacher: float = 0.996
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    student_temp: float = 0.1
    center_momentum: float = 0.9
    #: Split DINO trains on (labels unused): e.g. ``train``, or ``bucket_00`` of a CLEAR
    #: stream (its unlabeled pre-training bucket).
    train_split: str = "train"
    #: Labelled split the k-NN accuracy and the linear probe are measured on.
    eval_split: str = "test"
    #: Labelled split forming the k-NN bank and the linear probe's training set; "" uses
    #: ``train_split`` (which must then be labelled), e.g. ``bucket_01`` of a CLEAR stream.
    knn_split: str = ""
    #: Share of the k-NN split held out (by a hash of the image path) as Tune's queries.
    val_fraction: float = 0.1
    knn_k: int = 20
    knn_temperature: float = 0.07
    #: k-NN evaluation every N epochs (and always after the last).
    eval_every: int = 5
    #: Also score the student's features with the k-NN (``*_knn_top1_student``). The
    #: teacher is the reference's feature extractor; in short runs it lags the student
    #: by the EMA's horizon, and this shows by how much.
    knn_student: bool = False
    linear_probe_epochs: int = 100
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    shuffle_buffer: int = 512
    materialize_mb: int = 512
    cache_mb: int = 1024
    checkpoint_every: int = 5
    #: Use only the first N training rows (0 = all), for training and, when the k-NN
    #: split is the train split, as the k-NN bank.
    max_train_rows: int = 0
    optim: DINOOptimConfig = field(default_factory=DINOOptimConfig)

    def validate(self) -> None:
        cfglib.require(self.img_size >= 8, "img_size", "an integer >= 8", self.img_size)
        cfglib.require(self.depth is None or self.depth >= 1, "depth", "null or >= 1",
                       self.depth)
        cfglib.require(0 <= self.drop_path < 1, "drop_path", "in [0, 1)", self.drop_path)
        for key in ("out_dim", "hidden_dim", "bottleneck_dim"):
            cfglib.require(getattr(self, key) >= 1, key, "an integer >= 1", getattr(self, key))
        cfglib.require(self.n_local_crops >= 0, "n_local_crops", ">= 0", self.n_local_crops)
        for key in ("global_scale", "local_scale"):
            v = getattr(self, key)
            cfglib.require(len(v) == 2 and 0 < v[0] <= v[1] <= 1, key,
                           "[lo, hi] with 0 < lo <= hi <= 1", v)
        cfglib.require(0 <= self.momentum_teacher < 1, "momentum_teacher", "in [0, 1)",
                       self.momentum_teacher)
        for key in ("warmup_teacher_temp", "teacher_temp", "student_temp"):
            cfglib.require(getattr(self, key) > 0, key, "> 0", getattr(self, key))
        cfglib.require(0 <= self.center_momentum < 1, "center_momentum", "in [0, 1)",
                       self.center_momentum)
        cfglib.require(0 <= self.val_fraction < 1, "val_fraction", "in [0, 1)",
                       self.val_fraction)
        cfglib.require(self.knn_k >= 1, "knn_k", "an integer >= 1", self.knn_k)
        cfglib.require(self.knn_temperature > 0, "knn_temperature", "> 0", self.knn_temperature)
        cfglib.require(self.eval_every >= 1, "eval_every", ">= 1", self.eval_every)
        cfglib.require(self.checkpoint_every >= 1, "checkpoint_every", ">= 1",
                       self.checkpoint_every)
        for key in ("materialize_mb", "cache_mb", "max_train_rows", "shuffle_buffer",
                    "linear_probe_epochs", "warmup_teacher_temp_epochs"):
            cfglib.require(getattr(self, key) >= 0, key, "an integer >= 0", getattr(self, key))
        import timm

        if not timm.is_model(self.arch):
            raise ConfigError(f"config key 'arch': {self.arch!r} is not a timm model")


# ----------------------------------------------------------------------------- models


def backbone_kwargs(cfg: DINOConfig) -> dict[str, Any]:
    return {} if cfg.depth is None else {"depth": cfg.depth}


def build_student_teacher(cfg: DINOConfig) -> tuple[nn.Module, nn.Module]:
    """Student (drop-path) and an architecture-identical teacher, both random init."""
    from raylab.models.dino import DINOHead, MultiCropWrapper, build_backbone

    def make(drop_path: float) -> nn.Module:
        backbone = build_backbone(cfg.arch, cfg.img_size, cfg.patch_size,
                                  drop_path_rate=drop_path, **backbone_kwargs(cfg))
        head = DINOHead(backbone.num_features, cfg.out_dim, hidden_dim=cfg.hidden_dim,
                        bottleneck_dim=cfg.bottleneck_dim, norm_last_layer=cfg.norm_last_layer)
        return MultiCropWrapper(backbone, head)

    return make(cfg.drop_path), make(0.0)


def load_backbone(checkpoint: str | Path, which: str = "teacher") -> nn.Module:
    """A trained DINO backbone as a frozen feature extractor (eval mode, no gradients).

    The returned timm model has ``forward_features`` (token/feature maps) and its
    ``forward`` returns pooled features (``num_classes=0``).

    Args:
        checkpoint: A DINO checkpoint folder (``state.pt`` + ``meta.json``).
        which: ``"teacher"`` (what the paper evaluates) or ``"student"``.
    """
    from raylab.models.dino import build_backbone
    from raylab.runtime.checkpoint import load_checkpoint, load_meta

    meta = load_meta(checkpoint)
    if meta.get("method") != "dino":
        raise CheckpointError(f"{checkpoint}: not a DINO checkpoint (method "
                              f"{meta.get('method')!r})")
    cfg = cfglib.from_dict(DINOConfig, meta["config"])
    state = load_checkpoint(checkpoint)
    weights = state.get("ema" if which == "teacher" else "model")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{checkpoint}: holds no {which} weights")
    prefix = "backbone."
    backbone = build_backbone(cfg.arch, cfg.img_size, cfg.patch_size, **backbone_kwargs(cfg))
    try:
        backbone.load_state_dict({k[len(prefix):]: v for k, v in weights.items()
                                  if k.startswith(prefix)})
    except RuntimeError as exc:  # shapes or names that do not fit the saved config
        lines = str(exc).strip().splitlines()
        why = lines[1].strip() if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{checkpoint}: the {which} weights do not fit a {cfg.arch} "
                              f"backbone ({why})") from None
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


# ----------------------------------------------------------------------------- driver side


def _crop_kwargs(cfg: DINOConfig) -> dict[str, Any]:
    return {"img_size": cfg.img_size, "n_local": cfg.n_local_crops,
            "global_scale": tuple(cfg.global_scale), "local_scale": tuple(cfg.local_scale)}


def crop_dataset(paths: list[str], cfg: DINOConfig, hold_out: bool | None, limit: int) -> Any:
    ds = encoded_images(paths, cfg, True, hold_out, limit)
    return ds.map_batches(transform_batch, fn_kwargs=dict(
        kind="multicrop", out_dtype="uint8", **_crop_kwargs(cfg)),
        batch_format="numpy", batch_size=32)


def eval_dataset(paths: list[str], cfg: DINOConfig, hold_out: bool | None,
                 limit: int = 0) -> Any:
    """Centre-cropped images for feature extraction (k-NN bank or queries)."""
    ds = encoded_images(paths, cfg, False, hold_out, limit)
    return ds.map_batches(transform_batch, fn_kwargs=dict(
        kind="classify", is_training=False, input_size=cfg.img_size, out_dtype="uint8"),
        batch_format="numpy", batch_size=128)


def fit_run(cfg: DINOConfig, options: RunOptions, data: ImageData, storage: str, name: str,
            validate: bool, callbacks: list[Any] | None = None) -> Any:
    """One TorchTrainer run.

    The k-NN bank (and the linear probe's training set) is the k-NN split; the queries are
    the eval split, or with ``validate`` a hold-out of the k-NN split. When the k-NN split
    is the train split, the hold-out is also kept out of training and ``max_train_rows``
    limits the bank as well.
    """
    from raylab.methods.dino_loop import train_loop
    from raylab.runtime.trainer import fit

    shared = knn_split_name(cfg) == cfg.train_split
    bank_limit = cfg.max_train_rows if shared else 0
    train_rows = data.train_rows
    if validate:
        train_hold_out = False if shared else None
        if shared:
            train_rows = int(data.train_rows * (1 - cfg.val_fraction))
        datasets = {
            "train": crop_dataset(data.train_paths, cfg, train_hold_out, cfg.max_train_rows),
            "knn_bank": eval_dataset(data.knn_paths, cfg, False, bank_limit),
            "knn_query": eval_dataset(data.knn_paths, cfg, True),
        }
    else:
        datasets = {
            "train": crop_dataset(data.train_paths, cfg, None, cfg.max_train_rows),
            "knn_bank": eval_dataset(data.knn_paths, cfg, None, bank_limit),
            "knn_query": eval_dataset(data.eval_paths, cfg, None),
        }
    loop_config = {
        "config": cfglib.to_dict(cfg),
        "num_classes": len(data.class_names),
        "train_rows": train_rows,
        "query_name": "val" if validate else "test",
        "checkpoint_meta": {"method": "dino", "config": cfglib.to_dict(cfg),
                            "class_names": data.class_names},
    }
    # The k-NN bank and queries go whole to every worker; only rank 0 reads them.
    return fit(train_loop, loop_config, datasets, options, storage=storage, name=name,
               callbacks=callbacks, datasets_to_split=["train"])


@register_method("dino")
class DINOMethod(Method):
    name = "dino"
    paper = "Caron et al. 2021, DINO self-distillation (timm ViT/ResNet), k-NN + linear eval"
    Config = DINOConfig
    metric = "val_knn_top1"
    mode = "max"
    default_space = {
        "teacher_temp": "(0.04, 0.07)",
        "momentum_teacher": "[0.99, 0.996, 0.999]",
        "n_local_crops": "[2, 6, 10]",
        "optim.lr": "log(2e-4, 2e-3)",
    }

    def check(self, cfg: DINOConfig) -> None:
        load_image_data(cfg)

    def train(self, cfg: DINOConfig, options: RunOptions, storage: str, experiment: str
              ) -> dict[str, Any]:
        from raylab.models import count_params

        data = load_image_data(cfg)
        from raylab.models.dino import build_backbone

        params = count_params(build_backbone(cfg.arch, cfg.img_size, cfg.patch_size,
                                             **backbone_kwargs(cfg)))
        print(f"DINO {cfg.arch} at {cfg.img_size} px ({params:,} backbone params), "
              f"2 global + {cfg.n_local_crops} local crops, lr {effective_lr(cfg):.3g} for "
              f"global batch {cfg.optim.batch_size}", flush=True)
        t0 = time.perf_counter()
        exp_storage = f"{storage.rstrip('/')}/{experiment}"
        result = fit_run(cfg, options, data, exp_storage, "run", validate=False)
        summary = summarise(cfg, data, result, params, time.perf_counter() - t0)
        write_report(cfg, summary, local_path(storage, experiment), data)
        return summary

    def print_summary(self, summary: dict[str, Any]) -> None:
        print(f"\nDINO {summary['arch']} after {summary['epochs']} epochs: k-NN top-1 "
              f"{summary['knn_top1']:.4f} (k={summary['knn_k']}), linear probe top-1 "
              f"{summary['linear_top1']:.4f} on {summary['eval_rows']} "
              f"{summary['eval_split']} images; {summary['img_per_s']:.1f} img/s "
              f"({summary['seconds']:.0f} s)")
        if summary.get("attention"):
            print(f"attention maps: {summary['attention']}")

    def tune_trial(self, cfg: DINOConfig, options: RunOptions, storage: str, run_name: str,
                   callbacks: list[Any]) -> None:
        # ASHA compares trials every epoch, so every epoch must carry the metric.
        cfg = cfglib.apply_overrides(cfg, {"eval_every": 1})
        fit_run(cfg, options, load_image_data(cfg), storage, run_name, validate=True,
                callbacks=callbacks)


def effective_lr(cfg: DINOConfig) -> float:
    """The reference's linear scaling: lr x global batch / 256."""
    return cfg.optim.lr * cfg.optim.batch_size / 256


def summarise(cfg: DINOConfig, data: ImageData, result: Any, params: int, seconds: float
              ) -> dict[str, Any]:
    m = result.metrics
    return {
        "method": "dino",
        "arch": cfg.arch,
        "img_size": cfg.img_size,
        "epochs": int(m["epoch"]),
        "knn_top1": float(m["test_knn_top1"]),
        "knn_top1_student": (float(m["test_knn_top1_student"])
                             if "test_knn_top1_student" in m else None),
        "knn_k": cfg.knn_k,
        "linear_top1": float(m.get("test_linear_top1", float("nan"))),
        "train_loss": float(m["train_loss"]),
        "img_per_s": float(m["img_per_s"]),
        "backbone_params": params,
        "train_split": cfg.train_split,
        "knn_split": knn_split_name(cfg),
        "knn_rows": data.knn_rows,
        "eval_split": cfg.eval_split,
        "eval_rows": data.eval_rows,
        "checkpoint": result.checkpoint.path if result.checkpoint is not None else None,
        "seconds": round(seconds, 1),
    }


def attention_figures(checkpoint: str | Path, data: str, split: str, out: Path,
                      n_images: int = 4) -> list[Path]:
    """CLS attention of each head of the teacher's last block, overlaid on a few images.

    ``data`` is an ImageFolder shard folder or a CLEAR stream (``split``: a bucket folder).
    """
    import numpy as np

    from raylab.data.clear import is_stream
    from raylab.data.shards import iter_rows
    from raylab.models.dino import cls_attention_maps
    from raylab.plots import plot_attention_maps
    from raylab.runtime.checkpoint import load_meta
    from raylab.transforms.images import build_transform, decode_image

    backbone = load_backbone(checkpoint)
    if not hasattr(backbone, "blocks"):
        return []  # a ResNet has no attention to show
    meta_cfg = cfglib.from_dict(DINOConfig, load_meta(checkpoint)["config"])
    transform = build_transform(False, meta_cfg.img_size)
    rows = []
    if is_stream(data):  # a bucket's shard folder holds that bucket only
        source, columns = Path(data) / split, ["image", "path"]
    else:
        source, columns = Path(data), ["image", "path", "split"]
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
        shown = np.asarray(img.resize((meta_cfg.img_size, meta_cfg.img_size)))
        written.append(plot_attention_maps(shown, maps, out / f"attention_{i}.png",
                                           title=Path(row["path"]).name))
    return written


def write_report(cfg: DINOConfig, summary: dict[str, Any], folder: Path | None,
                 data: ImageData) -> None:
    if folder is None:
        return
    from raylab.plots import plot_metric_history, read_metrics

    folder.mkdir(parents=True, exist_ok=True)
    if summary["checkpoint"]:
        figures = attention_figures(summary["checkpoint"], cfg.data, cfg.eval_split, folder)
        summary["attention"] = [str(p) for p in figures]
    save_run_record(cfg, summary, folder)
    rows = read_metrics(folder / "run" / "metrics.jsonl")
    curves = {"k-NN top-1 (teacher)": "test_knn_top1"}
    if cfg.knn_student:
        curves["k-NN top-1 (student)"] = "test_knn_top1_student"
    plot_metric_history(rows, curves, "k-NN top-1", folder / "knn_top1.png")
    plot_metric_history(rows, {"DINO loss": "train_loss"}, "train loss", folder / "loss.png")
    lines = [
        f"# DINO run: {cfg.arch} at {cfg.img_size} px",
        "",
        f"k-NN top-1 {summary['knn_top1']:.4f} (k={cfg.knn_k}, T={cfg.knn_temperature}); "
        f"linear probe top-1 {summary['linear_top1']:.4f}; on {data.eval_rows} "
        f"{cfg.eval_split} images with the {data.knn_rows} {knn_split_name(cfg)} images as "
        f"the bank and probe training set, after {summary['epochs']} epochs of DINO on "
        f"{data.train_rows} {cfg.train_split} images.",
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
        f"- lr {effective_lr(cfg):.3g} (= {cfg.optim.lr:g} x {cfg.optim.batch_size}/256), "
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
