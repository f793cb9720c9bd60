"""Supervised image classification on a worker: the engine's hooks for a timm classifier.

The step is :class:`~raylab.tasks.classification.step.ClassificationStep` (Mixup/CutMix,
AMP, channels_last, gradient accumulation, clipping, per-iteration cosine lr, EMA); the
evaluation counts top-1/top-5 and the loss of this worker's share of the evaluation split
and all-reduces them. Methods built on it (ConvNeXt, MiniViT's distillation) subclass
:class:`ClassificationTask` and change :meth:`~ClassificationTask.build_model` or
:meth:`~ClassificationTask.loss` (the distillation hook: a teacher's output next to the
student's).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raylab.engine.batching import per_worker_batch
from raylab.engine.context import WorkerContext
from raylab.engine.keys import ROWS, metric_key
from raylab.engine.loop import Task, TrainState
from raylab.engine.schedules import cosine_schedule
from raylab.engine.shards import EpochBatches, EvalBatches
from raylab.losses.classification import train_criterion
from raylab.optim import ModelEma, build_optimizer
from raylab.tasks.classification.config import ClassificationConfig
from raylab.tasks.classification.step import ClassificationStep, evaluate_counts
from raylab.transforms.images import DeviceNormalize, build_mixup

EVAL_BATCH = 256


def build_model(cfg: ClassificationConfig, num_classes: int) -> nn.Module:
    """The timm model named by ``cfg.model``, random init (nothing is downloaded)."""
    import timm

    return timm.create_model(cfg.model, pretrained=False, num_classes=num_classes,
                             drop_path_rate=cfg.drop_path_rate, **cfg.model_kwargs())


class ClassificationTask(Task):
    """A timm classifier on image shards with the ConvNeXt recipe's step.

    ``run`` (plain data from the driver): ``split``, ``num_classes``, ``train_rows``
    (rows of the training split, which sizes the lr schedule) and ``checkpoint_meta``.
    """

    sum_keys = ("loss",)
    throughput_key = "img_per_s"

    def __init__(self, cfg: ClassificationConfig, run: dict[str, Any],
                 ctx: WorkerContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.split: str = run["split"]
        self.num_classes: int = run["num_classes"]
        o = cfg.optim
        self.epochs = o.epochs
        self.checkpoint_every = cfg.checkpoint_every
        self.meta = run["checkpoint_meta"]
        model = self.build_model()
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = ctx.prepare_model(model)
        self.inner = getattr(self.model, "module", self.model)
        self.optimizer = build_optimizer(self.inner, "adamw", lr=o.effective_lr,
                                         weight_decay=o.weight_decay, betas=tuple(o.betas),
                                         layer_decay=o.layer_decay)
        self.ema = ModelEma(self.inner, decay=cfg.ema_decay) if cfg.ema else None
        micro = per_worker_batch(o.batch_size, ctx.world_size, cfg.grad_accum)
        steps_per_epoch = max(1, run["train_rows"] // o.batch_size)
        self.batches_per_epoch = steps_per_epoch * cfg.grad_accum
        a = cfg.aug
        mixup = build_mixup(a.mixup, a.cutmix, a.mixup_prob, a.switch_prob, a.smoothing,
                            self.num_classes)
        self.criterion = train_criterion(mixup is not None, a.smoothing)
        self.step_fn = ClassificationStep(
            torch.compile(self.model) if cfg.compile else self.model, self.optimizer,
            criterion=self.criterion, device=ctx.device,
            lr_schedule=cosine_schedule(o.effective_lr, o.min_lr, o.epochs, steps_per_epoch,
                                        warmup_epochs=o.warmup_epochs),
            mixup=mixup, precision=cfg.precision, channels_last=cfg.channels_last,
            grad_accum=cfg.grad_accum, clip_grad=o.clip_grad, ema=self.ema,
            prepare=DeviceNormalize(a.re_prob, ctx.device), loss_fn=self.loss)
        # Training batches are never cached: their augmentation must change each epoch.
        self.train = EpochBatches(ctx.shard("train"), micro, seed=cfg.seed, rank=ctx.rank,
                                  shuffle_buffer=cfg.shuffle_buffer, drop_last=True)
        # Evaluation images are decoded the same way every epoch: keep them when they fit.
        self.eval = EvalBatches(ctx.shard(self.split), EVAL_BATCH, cfg.cache_mb << 20,
                                ctx.any_worker)

    # ------------------------------------------------------------------ hooks to change

    def build_model(self) -> nn.Module:
        return build_model(self.cfg, self.num_classes)

    def loss(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss of a (mixed) batch and the model's logits; a distillation
        task adds its teacher's term here."""
        logits = model(x)
        return self.criterion(logits.float(), target), logits

    # ------------------------------------------------------------------ engine hooks

    def state_objects(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer,
                "scaler": self.step_fn.scaler,
                "ema": self.ema.module if self.ema is not None else None}

    def on_restore(self, saved: dict[str, Any] | None, state: TrainState
                   ) -> dict[str, Any] | None:
        self.step_fn.step = state.step
        return saved

    def start_epoch(self, epoch: int) -> None:
        self.model.train()

    def batches(self, epoch: int) -> Any:
        return self.train.epoch(epoch)

    def train_step(self, batch: Any, state: TrainState, last: bool) -> dict[str, float]:
        loss, _ = self.step_fn(batch["image"], batch["label"], last=last)
        state.step = self.step_fn.step
        n = batch["label"].shape[0]
        return {"samples": n, "loss": loss.item() * n}

    def end_epoch(self, epoch: int, state: TrainState) -> dict[str, Any]:
        return {"lr": self.step_fn.lr_at(max(self.step_fn.step - 1, 0))}

    def evaluate(self, epoch: int, last: bool) -> dict[str, Any]:
        out = self._evaluate(self.inner)
        metrics = {metric_key(self.split, k): v for k, v in out.items()}
        if self.ema is not None:
            metrics[metric_key(self.split, "ema_top1")] = self._evaluate(self.ema.module)["top1"]
        return metrics

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        totals = evaluate_counts(model, self.eval(), self.ctx.device, self.cfg.precision,
                                 self.cfg.channels_last, prepare=DeviceNormalize())
        totals = self.ctx.all_reduce_sum(totals)
        count = totals[3].item()
        return {"top1": totals[1].item() / max(count, 1.0),
                "top5": totals[2].item() / max(count, 1.0),
                "loss": totals[0].item() / max(count, 1.0), ROWS: int(count)}
