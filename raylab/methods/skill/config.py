"""The skill method's config: the paper's recipe (W=60, L=30, self-proclaimed labels, LOSO)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from raylab import config as cfglib
from raylab.data import jigsaws

CLASS_NAMES = ("novice", "intermediate", "expert")


@dataclass
class SkillModelConfig:
    """SkillNet widths; the paper does not give them, so Tune may choose."""

    channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    kernel_size: int = 5
    pool: int = 2
    fc_dim: int = 128
    dropout_conv: float = 0.2
    dropout_fc: float = 0.5

    def validate(self) -> None:
        cfglib.require(len(self.channels) == 3 and min(self.channels) > 0, "model.channels",
                       "three positive widths", self.channels)
        cfglib.require(self.kernel_size >= 1, "model.kernel_size", "an integer >= 1",
                       self.kernel_size)
        cfglib.require(self.pool >= 1, "model.pool", "an integer >= 1", self.pool)
        cfglib.require(self.fc_dim >= 1, "model.fc_dim", "an integer >= 1", self.fc_dim)
        for key in ("dropout_conv", "dropout_fc"):
            p = getattr(self, key)
            cfglib.require(0.0 <= p < 1.0, f"model.{key}", "a probability in [0, 1)", p)


@dataclass
class SkillOptimConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    #: Global batch over all workers.
    batch_size: int = 64
    epochs: int = 30
    schedule: Literal["cosine", "constant"] = "cosine"

    def validate(self) -> None:
        cfglib.require(self.lr > 0, "optim.lr", "a positive number", self.lr)
        cfglib.require(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)
        cfglib.require(self.batch_size >= 1, "optim.batch_size", "an integer >= 1",
                       self.batch_size)
        cfglib.require(self.epochs >= 1, "optim.epochs", "an integer >= 1", self.epochs)


@dataclass
class SkillConfig(cfglib.EpochConfig):
    """Defaults follow the paper: W=60, L=30, self-proclaimed labels, LOSO."""

    task: str = "Suturing"
    labels: Literal["self", "grs"] = "self"
    #: GRS total < t0 -> novice, < t1 -> intermediate, else expert (GRS ranges 6..30).
    grs_thresholds: list[float] = field(default_factory=lambda: [16.0, 24.0])
    window: int = 60
    step: int = 30
    cv: Literal["loso", "louo", "holdout"] = "loso"
    #: Z-normalisation statistics per channel: ``train`` (the fold's training trials;
    #: one set for every recording, no look at test data) or ``recording`` (each trial
    #: with its own, the paper's "vector x"; `raylab assess` then uses the frames up to
    #: each window). BENCHMARKS.md, "Surgical skill", measures both.
    normalize: Literal["train", "recording"] = "train"
    #: Run only these folds (names such as supertrial1, userB); empty runs every fold.
    folds: list[str] = field(default_factory=list)
    holdout_fraction: float = 0.25
    #: Share of a fold's training trials held out for validation in `raylab tune`.
    val_fraction: float = 0.2
    shuffle_buffer: int = 4096
    model: SkillModelConfig = field(default_factory=SkillModelConfig)
    optim: SkillOptimConfig = field(default_factory=SkillOptimConfig)

    def validate(self) -> None:
        super().validate()
        cfglib.require(self.task in jigsaws.TASKS, "task", "one of " + ", ".join(jigsaws.TASKS),
                       self.task)
        cfglib.require(self.window >= 1, "window", "an integer >= 1", self.window)
        cfglib.require(self.step >= 1, "step", "an integer >= 1", self.step)
        cfglib.require(len(self.grs_thresholds) == 2
                       and self.grs_thresholds[0] <= self.grs_thresholds[1],
                       "grs_thresholds", "two increasing numbers", self.grs_thresholds)
        cfglib.require(0.0 < self.holdout_fraction < 1.0, "holdout_fraction", "in (0, 1)",
                       self.holdout_fraction)
