"""Configs of image-shard methods and of supervised image classification.

:class:`ImageDataConfig` holds what every method reading image shards shares (splits, the
hold-out for Tune, caching); :class:`ClassificationConfig` adds a timm classifier and the
training recipe. The defaults are ConvNeXt's ImageNet recipe (Liu et al. 2022), which a
method's config may change (``raylab.methods.convnext.config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from raylab import config as cfglib
from raylab.models.timm_names import check_timm_model
from raylab.optim.config import AdamWConfig


@dataclass
class ImageDataConfig(cfglib.EpochConfig):
    """Image shards (an ImageFolder shard folder or a CLEAR stream) split by name."""

    train_split: str = "train"
    eval_split: str = "test"
    #: Use only the first N training rows (0 = all); for smoke tests and budgets.
    max_train_rows: int = 0

    def validate(self) -> None:
        super().validate()
        cfglib.require(self.max_train_rows >= 0, "max_train_rows", "an integer >= 0",
                       self.max_train_rows)


@dataclass
class AugConfig:
    """Train-time augmentation: timm's create_transform plus Mixup/CutMix (paper values)."""

    auto_augment: str = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    interpolation: str = "bicubic"
    #: ``resized``: random-resized crop over ``scale`` (ImageNet practice); ``pad``: pad
    #: by ``padding`` pixels and crop the input size at a random offset (CIFAR practice,
    #: for images already at the input size).
    crop: Literal["resized", "pad"] = "resized"
    #: RandomResizedCrop scale range (crop ``resized``).
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    #: Zero padding on each side (crop ``pad``).
    padding: int = 4
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
        cfglib.require(self.crop in ("resized", "pad"), "aug.crop", "resized or pad",
                       self.crop)
        cfglib.require(self.padding >= 0, "aug.padding", "an integer >= 0", self.padding)

    def regularisers(self) -> list[str]:
        """The heavy regularisers of the recipe that are on (Mixup, CutMix, RandAugment,
        random erasing), as a reader would name them."""
        on = [("Mixup", self.mixup > 0 and self.mixup_prob > 0),
              ("CutMix", self.cutmix > 0 and self.mixup_prob > 0),
              ("RandAugment", bool(self.auto_augment)),
              ("random erasing", self.re_prob > 0)]
        return [name for name, active in on if active]

    def transform_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`raylab.transforms.images.build_transform` for
        training images."""
        return {
            "auto_augment": self.auto_augment or None,
            "re_prob": self.re_prob,
            "interpolation": self.interpolation,
            "scale": tuple(self.scale),
            "crop": self.crop,
            "padding": self.padding,
            "hflip": self.hflip,
            "color_jitter": self.color_jitter,
        }


@dataclass
class ImageOptimConfig(AdamWConfig):
    """AdamW with the linear scaling rule, cosine per iteration, warm-up (paper values:
    weight decay 0.05, no gradient clipping, no layer decay; 0.8 suits fine-tuning)."""

    lr: float = 4e-3
    reference_batch: int = 4096
    batch_size: int = 128
    epochs: int = 300
    min_lr: float = 1e-6
    warmup_epochs: int = 20

    def validate(self) -> None:
        super().validate()
        cfglib.require(self.min_lr >= 0, "optim.min_lr", ">= 0", self.min_lr)
        cfglib.require(0 <= self.warmup_epochs < self.epochs, "optim.warmup_epochs",
                       f"an integer in [0, epochs={self.epochs})", self.warmup_epochs)


#: Fewer epochs than this count as a short schedule for the paper's regularisers, which
#: were tuned for 300 ImageNet epochs: at 15 CIFAR epochs they held convnext_atto at 35 %
#: top-1 against 48 % without them (BENCHMARKS.md, "ConvNeXt on the real CIFAR-10 subset").
SHORT_SCHEDULE_EPOCHS = 100


@dataclass
class ClassificationConfig(ImageDataConfig):
    """A timm classifier trained on image shards with the ConvNeXt recipe's pieces."""

    #: Any timm classifier name.
    model: str = "convnext_tiny"
    #: Training resolution; 32 for CIFAR-sized images.
    input_size: int = 224
    #: Stochastic depth; null picks the model's default rate (see drop_path_rate).
    drop_path: float | None = None
    grad_accum: int = 1
    channels_last: bool = False
    compile: bool = False
    ema: bool = False
    ema_decay: float = 0.9999
    #: What Ray Data ships to workers: augmented uint8 pixels, normalised (and randomly
    #: erased) on the worker's device as timm's prefetcher does, or float32 with all of it
    #: done on CPU (4x the bytes).
    loader_dtype: Literal["uint8", "float32"] = "uint8"
    aug: AugConfig = field(default_factory=AugConfig)
    optim: ImageOptimConfig = field(default_factory=ImageOptimConfig)

    def validate(self) -> None:
        super().validate()
        cfglib.require(self.input_size >= 16, "input_size", "an integer >= 16", self.input_size)
        cfglib.require(self.drop_path is None or 0 <= self.drop_path < 1, "drop_path",
                       "null or in [0, 1)", self.drop_path)
        cfglib.require(self.grad_accum >= 1, "grad_accum", "an integer >= 1", self.grad_accum)
        cfglib.require(0 < self.ema_decay < 1, "ema_decay", "in (0, 1)", self.ema_decay)
        check_timm_model(self.model, "model")

    @property
    def drop_path_rate(self) -> float:
        return 0.0 if self.drop_path is None else self.drop_path

    def short_schedule_warning(self) -> str | None:
        """One line for the console when heavy regularisation meets a short schedule
        (None otherwise): under-fitting, not over-fitting, is then what limits accuracy."""
        heavy = self.aug.regularisers()
        if self.optim.epochs >= SHORT_SCHEDULE_EPOCHS or not heavy:
            return None
        return (f"warning: {', '.join(heavy)} are on for a {self.optim.epochs}-epoch run; "
                f"they are the paper's regularisers for 300 ImageNet epochs and hold a "
                f"short run far below what it can reach. For fewer than "
                f"{SHORT_SCHEDULE_EPOCHS} epochs start from "
                f"jobs/configs/convnext/cifar_cpu.yaml (they are off there), "
                f"or set aug.mixup=0 aug.cutmix=0 aug.auto_augment='' aug.re_prob=0")

    def model_kwargs(self) -> dict[str, Any]:
        """Further ``timm.create_model`` arguments of the model (none by default)."""
        return {}
