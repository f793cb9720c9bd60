"""One optimisation step of supervised image classification, in plain torch.

The classification task (:mod:`raylab.tasks.classification.task`) calls this once per
micro-batch; benchmarks call it directly on a GPU without Ray. It owns what the ConvNeXt
recipe adds to a bare step: Mixup/CutMix on the batch, AMP (bf16, or fp16 with a grad
scaler), channels_last, gradient accumulation (DDP gradients are synchronised only on the
micro-batch that completes a step), optional gradient clipping, the per-iteration lr
schedule and the EMA update.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from raylab.engine.precision import autocast
from raylab.engine.schedules import set_lr
from raylab.losses.classification import topk_correct
from raylab.transforms.images import apply_mixup

#: ``loss_fn(model, x, target) -> (loss, logits)``: how a step turns a (mixed) batch into a
#: loss; the default is ``criterion(model(x), target)``. A distillation task passes its own
#: (a teacher's logits next to the student's).
LossFn = Any


class ClassificationStep:
    """Callable per micro-batch: ``step(x, y, last=False) -> (loss, stepped)``.

    A micro-batch completes an optimizer step when it is the ``grad_accum``-th since the
    last step, or when ``last`` says it is the epoch's last: a short group at the end of
    an epoch is then synchronised across workers like any other (DDP all-reduces in its
    backward) and stepped with the mean gradient of its micro-batches.

    Args:
        model: The (possibly DDP-wrapped or compiled) model.
        optimizer: Its optimizer; groups may carry ``lr_scale``.
        criterion: Loss taking (logits, targets); soft targets when ``mixup`` is set.
        device: Where the batch goes.
        lr_schedule: Learning rate per optimizer step (clamped at its last value).
        mixup: A ``timm.data.Mixup`` or None.
        precision: "fp32", "bf16" or "fp16" (fp16 uses a GradScaler).
        channels_last: Feed NHWC-strided inputs (the model should be converted too).
        grad_accum: Micro-batches per optimizer step.
        clip_grad: Max global gradient norm, or None.
        ema: An object with ``update(model, step)`` (e.g. :class:`raylab.optim.ModelEma`).
        step: Optimizer steps already taken (when resuming).
        prepare: Applied to the batch on the device before Mixup, e.g.
            :class:`raylab.transforms.images.DeviceNormalize` for uint8 loaders.
        loss_fn: ``loss_fn(model, x, target) -> (loss, logits)``; default
            ``criterion(model(x), target)``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 criterion: nn.Module, device: torch.device, lr_schedule: np.ndarray,
                 mixup: Any = None, precision: str = "fp32", channels_last: bool = False,
                 grad_accum: int = 1, clip_grad: float | None = None, ema: Any = None,
                 step: int = 0, prepare: Any = None, loss_fn: LossFn = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.criterion = criterion
        self.device = device
        self.lr_schedule = np.asarray(lr_schedule, dtype=np.float64)
        self.mixup = mixup
        self.precision = precision
        self.channels_last = channels_last
        self.grad_accum = grad_accum
        self.clip_grad = clip_grad
        self.ema = ema
        self.step = step
        self.prepare = prepare
        self.loss_fn = loss_fn or self._criterion_loss
        self.micro = 0
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def lr_at(self, step: int) -> float:
        return float(self.lr_schedule[min(step, len(self.lr_schedule) - 1)])

    def _criterion_loss(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return self.criterion(logits.float(), target), logits

    def __call__(self, x: torch.Tensor, y: torch.Tensor, last: bool = False
                 ) -> tuple[torch.Tensor, bool]:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.prepare is not None:
            x = self.prepare(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        target: torch.Tensor = y
        if self.mixup is not None:
            x, target = apply_mixup(self.mixup, x, y)
        self.micro += 1
        steps = last or self.micro == self.grad_accum
        sync = nullcontext() if steps or not hasattr(self.model, "no_sync") else \
            self.model.no_sync()
        with sync:
            with autocast(self.device, self.precision):
                loss, _ = self.loss_fn(self.model, x, target)
            self.scaler.scale(loss.float() / self.grad_accum).backward()
        if steps:
            self.optimizer_step()
        return loss.detach(), steps

    def optimizer_step(self) -> None:
        """Apply the accumulated gradients: the mean over the micro-batches since the last
        step (a short group at an epoch's end is scaled up to a mean, not left smaller)."""
        if 0 < self.micro < self.grad_accum:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.grad_accum / self.micro)
        set_lr(self.optimizer, self.lr_at(self.step))
        if self.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.micro = 0
        if self.ema is not None:
            self.ema.update(self.model, self.step)

    def pending(self) -> bool:
        """Micro-batches whose gradients have not been applied yet."""
        return self.micro % self.grad_accum != 0


@torch.no_grad()
def evaluate_counts(model: nn.Module, batches: Any, device: torch.device, precision: str,
                    channels_last: bool = False, prepare: Any = None) -> torch.Tensor:
    """``[loss_sum, top1_correct, top5_correct, count]`` (float64, this worker only)."""
    import torch.nn.functional as F

    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)
    for batch in batches:
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        if prepare is not None:
            x = prepare(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(x).float()
        correct = topk_correct(logits, y, ks=(1, 5))
        totals += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(),
                                correct[1], correct[5], y.numel()], dtype=torch.float64)
    return totals
