"""ConvNeXt with its training recipe, on image shards streamed through Ray Data.

Paper: Z. Liu et al., "A ConvNet for the 2020s", CVPR 2022 (facebookresearch/ConvNeXt).
The network is timm's ``convnext_*`` (never re-implemented here); what this module adds is
the paper's recipe as defaults and the wiring onto Ray:

shards (encoded images) -> Ray Data ``map_batches`` on CPU decodes and applies timm's
``create_transform`` (RandAugment, random erasing, bicubic) -> Train workers apply Mixup /
CutMix on the batch and train with AdamW, cosine per iteration with warm-up, optional AMP,
channels_last, gradient accumulation, ``torch.compile`` and EMA -> top-1/top-5 counts are
all-reduced across workers.

Any timm classifier name works for ``model`` (e.g. ``resnet18`` as the baseline the
benchmarks compare against); ConvNeXt-only arguments (layer scale) are passed only to
ConvNeXt models.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from raylab import config as cfglib
from raylab.errors import ConfigError
from raylab.methods.base import Method, save_run_record
from raylab.methods.image_data import (
    ImageData,
    encoded_images,
    load_image_data,
    transform_batch,
)
from raylab.registry import register_method
from raylab.runtime.options import RunOptions, local_path

log = logging.getLogger("raylab")

#: Drop-path rate per ConvNeXt size in the paper (T 0.1, S 0.4, B/L 0.5). The paper has no
#: rate for the smaller atto..nano variants; they are small enough not to need one.
DROP_PATH_BY_SIZE = {"tiny": 0.1, "small": 0.4, "base": 0.5, "large": 0.5, "xlarge": 0.5}


def default_drop_path(model: str) -> float:
    for size, rate in DROP_PATH_BY_SIZE.items():
        if model.startswith("convnext_") and size in model.split("_")[1]:
            return rate
    return 0.0


@dataclass
class AugConfig:
    """Train-time augmentation: timm's create_transform plus Mixup/CutMix (paper values)."""

    auto_augment: str = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    interpolation: str = "bicubic"
    #: RandomResizedCrop scale range.
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: float = 0.5
    color_jitter: float = 0.4
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    switch_prob: float = 0.5
    smoothing: float = 0.1

    def validate(self) -> None:
        for key in ("re_prob", "hflip", "mixup_prob", "switch_prob"):
            v = getattr(self, key)
            cfglib.require(0.0 <= v <= 1.0, f"aug.{key}", "a probability in [0, 1]", v)
        for key in ("mixup", "cutmix", "color_jitter"):
            v = getattr(self, key)
            cfglib.require(v >= 0.0, f"aug.{key}", ">= 0", v)
        cfglib.require(0.0 <= self.smoothing < 1.0, "aug.smoothing", "in [0, 1)", self.smoothing)
        cfglib.require(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1,
                       "aug.scale", "[lo, hi] with 0 < lo <= hi <= 1", self.scale)


@dataclass
class ImageOptimConfig:
    """AdamW with the linear scaling rule, cosine per iteration, warm-up (paper values)."""

    #: Learning rate at ``reference_batch``; the run uses lr * global_batch / reference_batch.
    lr: float = 4e-3
    reference_batch: int = 4096
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    #: Global batch (all workers, after gradient accumulation).
    batch_size: int = 128
    epochs: int = 300
    warmup_epochs: int = 20
    #: Layer-wise lr decay (e.g. 0.8 for fine-tuning); null trains every layer at one lr.
    layer_decay: float | None = None
    #: Clip the global gradient norm; null leaves gradients alone (the paper does not clip).
    clip_grad: float | None = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])

    def validate(self) -> None:
        cfglib.require(self.lr > 0, "optim.lr", "a positive number", self.lr)
        cfglib.require(self.min_lr >= 0, "optim.min_lr", ">= 0", self.min_lr)
        cfglib.require(self.reference_batch >= 1, "optim.reference_batch", ">= 1",
                       self.reference_batch)
        cfglib.require(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)
        cfglib.require(self.batch_size >= 1, "optim.batch_size", "an integer >= 1",
                       self.batch_size)
        cfglib.require(self.epochs >= 1, "optim.epochs", "an integer >= 1", self.epochs)
        cfglib.require(0 <= self.warmup_epochs < self.epochs, "optim.warmup_epochs",
                       f"an integer in [0, epochs={self.epochs})", self.warmup_epochs)
        cfglib.require(self.layer_decay is None or 0 < self.layer_decay <= 1,
                       "optim.layer_decay", "null or in (0, 1]", self.layer_decay)
        cfglib.require(self.clip_grad is None or self.clip_grad > 0, "optim.clip_grad",
                       "null or > 0", self.clip_grad)
        cfglib.require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                       "optim.betas", "two numbers in [0, 1)", self.betas)


@dataclass
class ConvNeXtConfig:
    """Defaults are the paper's ImageNet recipe; scale epochs/batch down for small data."""

    data: str = ""
    model: str = "convnext_tiny"
    #: Training resolution; 32 for CIFAR-sized images.
    input_size: int = 224
    #: Stochastic depth; null picks the paper's rate for the model size.
    drop_path: float | None = None
    layer_scale_init: float = 1e-6
    train_split: str = "train"
    eval_split: str = "test"
    #: Share of the training split held out (by a hash of the image path) for Tune's
    #: validation metric; the eval split never reaches Tune.
    val_fraction: float = 0.1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    grad_accum: int = 1
    ema: bool = False
    ema_decay: float = 0.9999
    seed: int = 0
    shuffle_buffer: int = 1024
    #: What Ray Data ships to workers: augmented uint8 pixels, normalised (and randomly
    #: erased) on the worker's device as timm's prefetcher does, or float32 with all of it
    #: done on CPU (4x the bytes).
    loader_dtype: Literal["uint8", "float32"] = "uint8"
    #: Hold the encoded shards in Ray's object store when they total at most this many
    #: MiB (0 never): each epoch then skips file listing and Parquet reads, which dominate
    #: small datasets. Augmentation still runs fresh every epoch.
    materialize_mb: int = 512
    #: Keep each worker's decoded evaluation images in memory when they fit in this many
    #: MiB (0 decodes them every epoch).
    cache_mb: int = 1024
    checkpoint_every: int = 5
    #: Use only the first N training rows (0 = all); for smoke tests and budgets.
    max_train_rows: int = 0
    aug: AugConfig = field(default_factory=AugConfig)
    optim: ImageOptimConfig = field(default_factory=ImageOptimConfig)

    def validate(self) -> None:
        cfglib.require(self.input_size >= 16, "input_size", "an integer >= 16", self.input_size)
        cfglib.require(self.drop_path is None or 0 <= self.drop_path < 1, "drop_path",
                       "null or in [0, 1)", self.drop_path)
        cfglib.require(self.layer_scale_init >= 0, "layer_scale_init", ">= 0",
                       self.layer_scale_init)
        cfglib.require(0 <= self.val_fraction < 1, "val_fraction", "in [0, 1)",
                       self.val_fraction)
        cfglib.require(self.grad_accum >= 1, "grad_accum", "an integer >= 1", self.grad_accum)
        cfglib.require(0 < self.ema_decay < 1, "ema_decay", "in (0, 1)", self.ema_decay)
        cfglib.require(self.shuffle_buffer >= 0, "shuffle_buffer", ">= 0", self.shuffle_buffer)
        cfglib.require(self.checkpoint_every >= 1, "checkpoint_every", ">= 1",
                       self.checkpoint_every)
        cfglib.require(self.materialize_mb >= 0, "materialize_mb", "an integer >= 0 (MiB)",
                       self.materialize_mb)
        cfglib.require(self.cache_mb >= 0, "cache_mb", "an integer >= 0 (MiB)", self.cache_mb)
        cfglib.require(self.max_train_rows >= 0, "max_train_rows", ">= 0", self.max_train_rows)
        _check_model_name(self.model)

    @property
    def drop_path_rate(self) -> float:
        return default_drop_path(self.model) if self.drop_path is None else self.drop_path


def _check_model_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f"; e.g. {', '.join(close)}" if close else ""
        raise ConfigError(f"config key 'model': {name!r} is not a timm model{hint}")


# ----------------------------------------------------------------------------- driver side


def _transform_kwargs(cfg: ConvNeXtConfig) -> dict[str, Any]:
    a = cfg.aug
    return {
        "auto_augment": a.auto_augment or None,
        "re_prob": a.re_prob,
        "interpolation": a.interpolation,
        "scale": tuple(a.scale),
        "hflip": a.hflip,
        "color_jitter": a.color_jitter,
    }


def image_dataset(paths: list[str], cfg: ConvNeXtConfig, training: bool,
                  hold_out: bool | None = None, limit: int = 0) -> Any:
    """Decode + augment on CPU in Ray Data; workers receive pixel tensors and labels.

    ``hold_out``: None keeps every row; True keeps only the validation share of the split,
    False drops it (see :attr:`ConvNeXtConfig.val_fraction`).
    """
    ds = encoded_images(paths, cfg, training, hold_out, limit)
    kwargs = _transform_kwargs(cfg) if training else {}
    if cfg.loader_dtype == "uint8":
        kwargs.pop("re_prob", None)  # random erasing happens on the worker's device
    return ds.map_batches(transform_batch, fn_kwargs=dict(
        is_training=training, input_size=cfg.input_size, out_dtype=cfg.loader_dtype,
        **kwargs), batch_format="numpy", batch_size=64)


def checkpoint_meta(cfg: ConvNeXtConfig, class_names: list[str]) -> dict[str, Any]:
    return {
        "method": "convnext",
        "config": cfglib.to_dict(cfg),
        "class_names": class_names,
        "input_size": cfg.input_size,
    }


def fit_run(cfg: ConvNeXtConfig, options: RunOptions, data: ImageData, storage: str, name: str,
            eval_name: str, validate: bool, callbacks: list[Any] | None = None) -> Any:
    """One TorchTrainer run; ``validate`` evaluates on the held-out share of train."""
    from raylab.methods.image_loop import train_loop
    from raylab.runtime.trainer import fit

    if validate:
        train_ds = image_dataset(data.train_paths, cfg, True, hold_out=False,
                                 limit=cfg.max_train_rows)
        eval_ds = image_dataset(data.train_paths, cfg, False, hold_out=True)
        train_rows = int(data.train_rows * (1 - cfg.val_fraction))
    else:
        train_ds = image_dataset(data.train_paths, cfg, True, limit=cfg.max_train_rows)
        eval_ds = image_dataset(data.eval_paths, cfg, False)
        train_rows = data.train_rows
    loop_config = {
        "config": cfglib.to_dict(cfg),
        "num_classes": len(data.class_names),
        "train_rows": train_rows,
        "eval_split": eval_name,
        "checkpoint_meta": checkpoint_meta(cfg, data.class_names),
    }
    return fit(train_loop, loop_config, {"train": train_ds, eval_name: eval_ds}, options,
               storage=storage, name=name, callbacks=callbacks)


def model_cost(cfg: ConvNeXtConfig, num_classes: int) -> tuple[int, int]:
    """Parameters and multiply-accumulates at the training resolution."""
    from raylab.methods.image_loop import build_model
    from raylab.models import count_macs, count_params

    model = build_model(cfg, num_classes)
    return count_params(model), count_macs(model, (3, cfg.input_size, cfg.input_size))


@register_method("convnext")
class ConvNeXtMethod(Method):
    name = "convnext"
    paper = "Liu et al. 2022, ConvNeXt (timm convnext_*) with the paper's training recipe"
    Config = ConvNeXtConfig
    metric = "val_top1"
    mode = "max"
    default_space = {
        "optim.lr": "log(1e-3, 8e-3)",
        "optim.weight_decay": "log(0.01, 0.1)",
        "drop_path": "(0.0, 0.3)",
        "aug.mixup": "(0.0, 0.8)",
        "aug.cutmix": "(0.0, 1.0)",
    }

    def check(self, cfg: ConvNeXtConfig) -> None:
        load_image_data(cfg)

    def train(self, cfg: ConvNeXtConfig, options: RunOptions, storage: str, experiment: str
              ) -> dict[str, Any]:
        data = load_image_data(cfg)
        params, macs = model_cost(cfg, len(data.class_names))
        log_recipe(cfg, options, params, macs)
        t0 = time.perf_counter()
        exp_storage = f"{storage.rstrip('/')}/{experiment}"
        result = fit_run(cfg, options, data, exp_storage, "run", "test", validate=False)
        summary = summarise(cfg, data, result, params, macs, time.perf_counter() - t0)
        write_report(cfg, summary, local_path(storage, experiment))
        return summary

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

    def tune_trial(self, cfg: ConvNeXtConfig, options: RunOptions, storage: str,
                   run_name: str, callbacks: list[Any]) -> None:
        data = load_image_data(cfg)
        fit_run(cfg, options, data, storage, run_name, "val", validate=True,
                callbacks=callbacks)


def effective_lr(cfg: ConvNeXtConfig) -> float:
    from raylab.optim import scale_lr

    return scale_lr(cfg.optim.lr, cfg.optim.batch_size, cfg.optim.reference_batch)


def log_recipe(cfg: ConvNeXtConfig, options: RunOptions, params: int, macs: int) -> None:
    o = cfg.optim
    print(f"{cfg.model}: {params:,} params, {macs / 1e9:.3f} GMACs at {cfg.input_size} px; "
          f"drop-path {cfg.drop_path_rate}", flush=True)
    print(f"recipe: AdamW lr {o.lr:g} @ batch {o.reference_batch} -> {effective_lr(cfg):.3g} "
          f"@ global batch {o.batch_size} ({max(options.workers, 1)} worker(s) x grad_accum "
          f"{cfg.grad_accum}), wd {o.weight_decay:g}, cosine over {o.epochs} epochs with "
          f"{o.warmup_epochs} warm-up, mixup {cfg.aug.mixup:g} / cutmix {cfg.aug.cutmix:g} / "
          f"smoothing {cfg.aug.smoothing:g}, {cfg.precision}", flush=True)


def summarise(cfg: ConvNeXtConfig, data: ImageData, result: Any, params: int, macs: int,
              seconds: float) -> dict[str, Any]:
    m = result.metrics
    return {
        "method": "convnext",
        "model": cfg.model,
        "input_size": cfg.input_size,
        "eval_split": cfg.eval_split,
        "eval_rows": data.eval_rows,
        "train_rows": data.train_rows,
        "epochs": int(m["epoch"]),
        "top1": float(m["test_top1"]),
        "top5": float(m["test_top5"]),
        "ema_top1": float(m["test_ema_top1"]) if "test_ema_top1" in m else None,
        "loss": float(m["test_loss"]),
        "train_img_per_s": float(m["img_per_s"]),
        "params": params,
        "gmacs": macs / 1e9,
        "effective_lr": effective_lr(cfg),
        "checkpoint": result.checkpoint.path if result.checkpoint is not None else None,
        "seconds": round(seconds, 1),
    }


def write_report(cfg: ConvNeXtConfig, summary: dict[str, Any], folder: Path | None) -> None:
    """summary.json, config.yaml, learning curves and report.md in the experiment folder."""
    if folder is None:
        return
    from raylab.plots import plot_metric_history, read_metrics

    save_run_record(cfg, summary, folder)
    rows = read_metrics(folder / "run" / "metrics.jsonl")
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
        f"{cfg.optim.reference_batch} to {cfg.optim.batch_size}), wd {cfg.optim.weight_decay:g}",
        f"- wall time {summary['seconds']:.0f} s",
        "",
    ]
    if curves:
        lines += ["![top-1 per epoch](top1.png)", ""]
    cfglib.atomic_write_text(folder / "report.md", "\n".join(lines))
