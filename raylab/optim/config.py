"""The AdamW recipe keys that image classification and detection share.

A task's optimiser config subclasses :class:`AdamWConfig`, sets its paper's defaults by
redeclaring the fields, and adds its schedule's own keys (warm-up epochs or iterations,
step milestones, ...) with their checks after ``super().validate()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raylab import config as cfglib
from raylab.optim.param_groups import scale_lr


@dataclass
class AdamWConfig:
    """AdamW at a learning rate scaled linearly to the global batch (the ``optim`` keys)."""

    #: Learning rate at ``reference_batch``; the run uses lr * batch_size / reference_batch.
    lr: float = 1e-3
    reference_batch: int = 256
    weight_decay: float = 0.05
    #: Global batch (all workers, after gradient accumulation).
    batch_size: int = 256
    epochs: int = 100
    #: Layer-wise lr decay (each layer's lr is this times the next one's); null: one lr.
    layer_decay: float | None = None
    #: Clip the global gradient norm; null leaves gradients alone.
    clip_grad: float | None = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])

    def validate(self) -> None:
        """Raises ConfigError naming the first bad ``optim.*`` key."""
        cfglib.require(self.lr > 0, "optim.lr", "a positive number", self.lr)
        cfglib.require(self.reference_batch >= 1, "optim.reference_batch", ">= 1",
                       self.reference_batch)
        cfglib.require(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)
        cfglib.require(self.batch_size >= 1, "optim.batch_size", "an integer >= 1",
                       self.batch_size)
        cfglib.require(self.epochs >= 1, "optim.epochs", "an integer >= 1", self.epochs)
        cfglib.require(self.layer_decay is None or 0 < self.layer_decay <= 1,
                       "optim.layer_decay", "null or in (0, 1]", self.layer_decay)
        cfglib.require(self.clip_grad is None or self.clip_grad > 0, "optim.clip_grad",
                       "null or > 0", self.clip_grad)
        cfglib.require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                       "optim.betas", "two numbers in [0, 1)", self.betas)

    @property
    def effective_lr(self) -> float:
        """The lr of the run: ``lr`` scaled linearly from ``reference_batch`` to the global
        batch (:func:`raylab.optim.scale_lr`)."""
        return scale_lr(self.lr, self.batch_size, self.reference_batch)
