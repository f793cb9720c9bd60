"""The per-worker train loop of supervised image classification (ConvNeXt recipe).

Runs inside Ray Train workers (or in-process with ``--workers 0``). The step itself is
:class:`raylab.methods.image_step.ClassificationStep`, which has no Ray in it.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn


def build_model(cfg: Any, num_classes: int) -> nn.Module:
    """The timm model named by ``cfg.model``, random init (nothing is downloaded)."""
    import timm

    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": cfg.drop_path_rate}
    if cfg.model.startswith("convnext"):
        kwargs["ls_init_value"] = cfg.layer_scale_init
    return timm.create_model(cfg.model, pretrained=False, **kwargs)


def micro_batch_size(global_batch: int, world_size: int, grad_accum: int) -> int:
    """Per-worker micro-batch so that world x accum x micro == the configured global batch."""
    per = global_batch // (world_size * grad_accum)
    if per < 1:
        from raylab.errors import ConfigError

        raise ConfigError(f"optim.batch_size={global_batch} is smaller than workers x "
                          f"grad_accum = {world_size * grad_accum}")
    return per


def train_loop(loop_config: dict[str, Any]) -> None:
    import ray.train

    from raylab.config import from_dict
    from raylab.losses.classification import train_criterion
    from raylab.methods.convnext import ConvNeXtConfig, effective_lr
    from raylab.methods.image_step import ClassificationStep
    from raylab.optim import ModelEma, build_optimizer
    from raylab.runtime import worker as W
    from raylab.runtime.batch_cache import BatchCache
    from raylab.runtime.schedules import cosine_schedule
    from raylab.transforms.images import DeviceNormalize, build_mixup

    cfg = from_dict(ConvNeXtConfig, loop_config["config"])
    num_classes: int = loop_config["num_classes"]
    eval_split: str = loop_config["eval_split"]
    info = W.worker_info()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, num_classes)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = W.prepare_model(model)
    inner = getattr(model, "module", model)
    o = cfg.optim
    optimizer = build_optimizer(inner, "adamw", lr=effective_lr(cfg),
                                weight_decay=o.weight_decay, betas=tuple(o.betas),
                                layer_decay=o.layer_decay)
    ema = ModelEma(inner, decay=cfg.ema_decay) if cfg.ema else None
    micro = micro_batch_size(o.batch_size, info.world_size, cfg.grad_accum)
    steps_per_epoch = max(1, loop_config["train_rows"] // o.batch_size)
    schedule = cosine_schedule(effective_lr(cfg), o.min_lr, o.epochs, steps_per_epoch,
                               warmup_epochs=o.warmup_epochs)
    a = cfg.aug
    mixup = build_mixup(a.mixup, a.cutmix, a.mixup_prob, a.switch_prob, a.smoothing,
                        num_classes)
    step_fn = ClassificationStep(
        torch.compile(model) if cfg.compile else model, optimizer,
        criterion=train_criterion(mixup is not None, a.smoothing), device=info.device,
        lr_schedule=schedule, mixup=mixup, precision=cfg.precision,
        channels_last=cfg.channels_last, grad_accum=cfg.grad_accum, clip_grad=o.clip_grad,
        ema=ema, prepare=DeviceNormalize(a.re_prob, info.device))
    start_epoch, step_fn.step, state = W.restore_latest(
        model=model, optimizer=optimizer, scaler=step_fn.scaler,
        ema=ema.module if ema is not None else None)
    if W.finished_already(state, start_epoch, o.epochs):
        return
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard(eval_split)
    # Evaluation images are decoded the same way every epoch: keep them when they fit.
    # Training batches are never cached; their augmentation must change each epoch.
    eval_cache = BatchCache(cfg.cache_mb << 20)
    meta = loop_config["checkpoint_meta"]
    for epoch in range(start_epoch, o.epochs):
        model.train()
        t0 = time.perf_counter()
        totals = torch.zeros(2, dtype=torch.float64)  # loss sum, samples
        first_step = None
        batches = train_shard.iter_torch_batches(
            batch_size=micro, drop_last=True,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed * 100_003 + epoch * 101 + info.rank)
        for batch in batches:
            loss, _ = step_fn(batch["image"], batch["label"])
            if first_step is None:
                first_step = time.time()
            n = batch["label"].shape[0]
            totals += torch.tensor([loss.item() * n, n], dtype=torch.float64)
        if step_fn.pending():
            step_fn.optimizer_step()
        seconds = time.perf_counter() - t0
        totals = W.all_reduce_sum(totals)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": totals[0].item() / max(totals[1].item(), 1.0),
            "train_samples": int(totals[1].item()),
            "img_per_s": totals[1].item() / max(seconds, 1e-9),
            "lr": step_fn.lr_at(max(step_fn.step - 1, 0)),
        }
        if epoch == start_epoch and first_step is not None:
            metrics["first_step_unix_time"] = first_step
        metrics.update(_evaluate(inner, eval_cache, eval_shard, eval_split, cfg, info.device,
                                 W, "top1"))
        if ema is not None:
            ema_metrics = _evaluate(ema.module, eval_cache, eval_shard, eval_split, cfg,
                                    info.device, W, "ema_top1")
            metrics[f"{eval_split}_ema_top1"] = ema_metrics[f"{eval_split}_ema_top1"]
        last = epoch + 1 == o.epochs
        checkpoint = None
        if last or (epoch + 1) % cfg.checkpoint_every == 0:
            checkpoint = {"model": model, "optimizer": optimizer, "scaler": step_fn.scaler,
                          "ema": ema.module if ema is not None else None,
                          "epoch": epoch, "step": step_fn.step, "meta": meta}
        W.report(metrics, checkpoint)


def _evaluate(model: nn.Module, cache: Any, shard: Any, split: str, cfg: Any,
              device: torch.device, W: Any, top1_name: str) -> dict[str, float]:
    from raylab.methods.image_step import evaluate_counts
    from raylab.transforms.images import DeviceNormalize

    batches = cache.epoch(lambda: shard.iter_torch_batches(batch_size=256), 256)
    totals = evaluate_counts(model, batches, device, cfg.precision, cfg.channels_last,
                             prepare=DeviceNormalize())  # uint8 in, float out
    totals = W.all_reduce_sum(totals)
    count = max(totals[3].item(), 1.0)
    out = {f"{split}_{top1_name}": totals[1].item() / count}
    if top1_name == "top1":
        out[f"{split}_top5"] = totals[2].item() / count
        out[f"{split}_loss"] = totals[0].item() / count
    return out
