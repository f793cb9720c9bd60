"""Config of Mask R-CNN detection on COCO shards: the data, jittering, recipe and detector.

The detector's keys (:class:`~raylab.models.detection.DetectorConfig`: ``backbone``,
``model``, ``global_blocks``, ``window_size``, ``propagation``, ``pyramid``, ...) sit at the
top level, so ``--set backbone=cnn model=resnet50`` reads as the issue's users write it.
Defaults are ViTDet's recipe (Li et al. 2022): ViT-B at 1024 px with LSJ (0.1-2.0), AdamW lr
1e-4 at batch 64, weight decay 0.1, layer-wise lr decay 0.7, drop-path 0.1, 250 warm-up
iterations and a step decay at 88.9 % and 96.3 % of 100 epochs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from raylab import config as cfglib
from raylab.errors import ConfigError
from raylab.metrics.detection import FREQUENCY_BINS, FREQUENCY_COUNTS, frequency_bins
from raylab.models.detection import DetectorConfig
from raylab.optim.config import AdamWConfig
from raylab.transforms.detection import LSJ, SSJ
from raylab.transforms.detection_batch import CopyPasteParams

JITTERS = {"lsj": LSJ, "ssj": SSJ}


@dataclass
class CopyPasteConfig(CopyPasteParams):
    """Simple Copy-Paste (Ghiasi et al. 2021) between training images, in the Ray Data tasks.

    Each image, with probability ``prob``, receives a random subset (its size uniform in
    0..n) of the objects of a partner image drawn per epoch among the labeled training
    images (:func:`raylab.tasks.detection.data.train_dataset` says which); both were
    jittered and flipped on their own.
    The knobs are :class:`~raylab.transforms.detection_batch.CopyPasteParams`' (``blend``
    and ``sigma``: Gaussian-smoothed paste edges, the masks stay binary; ``box_thr`` and
    ``area_thr``: a target object goes when its box moved by more than ``box_thr`` px on
    some side and at most ``area_thr`` px of its mask are left); off by default.
    The thresholds are pixels of the jittered ``image_size``; their defaults (10, 300) are
    the paper's for 1024 px: scale them for smaller images (the 64 px copy-paste bench
    uses 1 and 2; BENCHMARKS.md shows what unscaled ones cost there).
    """

    #: Each training image's chance to receive pasted objects; 0 turns copy-paste off.
    prob: float = 0.0

    def validate(self) -> None:
        cfglib.require(0.0 <= self.prob <= 1.0, "aug.copy_paste.prob",
                       "a probability in [0, 1]", self.prob)
        cfglib.require(self.sigma >= 0, "aug.copy_paste.sigma", ">= 0", self.sigma)
        cfglib.require(self.box_thr >= 0, "aug.copy_paste.box_thr", ">= 0", self.box_thr)
        cfglib.require(self.area_thr >= 0, "aug.copy_paste.area_thr", "an integer >= 0",
                       self.area_thr)

    def params(self) -> CopyPasteParams | None:
        """What the batch function takes (the knobs alone); None when off."""
        if self.prob <= 0:
            return None
        return CopyPasteParams(**{f.name: getattr(self, f.name)
                                  for f in dataclasses.fields(CopyPasteParams)})


@dataclass
class DetectionAugConfig:
    """Scale jittering of image, boxes and masks together, and Simple Copy-Paste (in Ray
    Data tasks)."""

    #: ``lsj`` (scales 0.1-2.0), ``ssj`` (0.8-1.25) or ``none`` (resize + pad only).
    jitter: Literal["lsj", "ssj", "none"] = "lsj"
    #: Overrides the preset's scale range, e.g. [0.5, 1.5] (Tune searches it).
    scale_range: list[float] | None = None
    flip: float = 0.5
    copy_paste: CopyPasteConfig = field(default_factory=CopyPasteConfig)

    def validate(self) -> None:
        cfglib.require(0.0 <= self.flip <= 1.0, "aug.flip", "a probability in [0, 1]",
                       self.flip)
        self.copy_paste.validate()
        if self.scale_range is not None:
            cfglib.require(len(self.scale_range) == 2
                           and 0 < self.scale_range[0] <= self.scale_range[1] <= 4,
                           "aug.scale_range", "[lo, hi] with 0 < lo <= hi <= 4",
                           self.scale_range)

    def scale(self) -> tuple[float, float]:
        if self.scale_range is not None:
            return (float(self.scale_range[0]), float(self.scale_range[1]))
        return JITTERS.get(self.jitter, (1.0, 1.0))


@dataclass
class DetectionOptimConfig(AdamWConfig):
    """AdamW, layer-wise lr decay, warm-up, step (or cosine) decay per iteration."""

    lr: float = 1e-4
    reference_batch: int = 64
    weight_decay: float = 0.1
    #: ViTDet's 0.7 (each block's lr is 0.7x the next's); null: one lr for all.
    layer_decay: float | None = 0.7
    batch_size: int = 64
    epochs: int = 100
    #: The paper does not clip gradients.
    clip_grad: float | None = None
    warmup_iters: int = 250
    schedule: Literal["step", "cosine"] = "step"
    #: Step decays by 10x at these fractions of the run.
    milestones: list[float] = field(default_factory=lambda: [0.889, 0.963])

    def validate(self) -> None:
        super().validate()
        cfglib.require(self.warmup_iters >= 0, "optim.warmup_iters", ">= 0",
                       self.warmup_iters)
        cfglib.require(list(self.milestones) == sorted(self.milestones)
                       and all(0 < m <= 1 for m in self.milestones), "optim.milestones",
                       "increasing fractions in (0, 1]", self.milestones)


@dataclass
class DetectionConfig(DetectorConfig, cfglib.EpochConfig):
    """Mask R-CNN on COCO shards (``<data>/<train_split>``, ``<data>/<eval_split>``)."""

    train_split: str = "train"
    eval_split: str = "val"
    #: Self-training: a coco shard folder of pseudo-labeled images (``raylab predict
    #: detection ... --pseudo-labels``) whose rows join the training split; never scored.
    pseudo: str = ""
    #: Object categories + 1; 0 takes them from the data (what a user wants).
    num_classes: int = 0
    #: Use only the first N training images (0 = all); for smoke tests and budgets.
    max_train_rows: int = 0
    #: Evaluate (COCO AP on the whole evaluation split) every N epochs and after the last.
    eval_every: int = 5
    #: Images per evaluation batch on each worker.
    eval_batch: int = 8
    #: Detections below this score are not scored (detectron2's test threshold).
    score_threshold: float = 0.05
    #: Evaluation images drawn with their detections in the run's report.
    report_images: int = 4
    checkpoint_every: int = 5
    #: AP by class frequency (as LVIS: rare / common / frequent) in the report.
    ap_by_frequency: bool = True
    #: Its bins: name -> inclusive [lo, hi] range (hi null: no bound) of a category's count
    #: in the training split; empty: LVIS's rare [1, 10], common [11, 100], frequent [101, -].
    ap_bins: dict[str, list[int | None]] = field(default_factory=dict)
    #: What the bins count: ``instances`` (non-crowd annotations) or ``images`` (LVIS).
    ap_bins_count: str = "instances"
    aug: DetectionAugConfig = field(default_factory=DetectionAugConfig)
    optim: DetectionOptimConfig = field(default_factory=DetectionOptimConfig)

    def validate(self) -> None:
        cfglib.EpochConfig.validate(self)
        self.detector_config(num_classes=max(self.num_classes, 2)).validate()
        cfglib.require(self.num_classes == 0 or self.num_classes >= 2, "num_classes",
                       "0 (from the data) or an integer >= 2", self.num_classes)
        for key in ("eval_every", "eval_batch"):
            cfglib.require(getattr(self, key) >= 1, key, "an integer >= 1",
                           getattr(self, key))
        cfglib.require(self.max_train_rows >= 0, "max_train_rows", "an integer >= 0",
                       self.max_train_rows)
        cfglib.require(self.report_images >= 0, "report_images", "an integer >= 0",
                       self.report_images)
        cfglib.require(0.0 <= self.score_threshold < 1.0, "score_threshold", "in [0, 1)",
                       self.score_threshold)
        cfglib.require(self.ap_bins_count in FREQUENCY_COUNTS, "ap_bins_count",
                       f"one of {list(FREQUENCY_COUNTS)}", self.ap_bins_count)
        try:
            frequency_bins({}, self.frequency_ranges())
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"config key 'ap_bins': {exc}") from None

    def frequency_ranges(self) -> dict[str, tuple[int, int | None]]:
        """``ap_bins`` as :func:`raylab.metrics.detection.frequency_bins` takes them."""
        if not self.ap_bins:
            return dict(FREQUENCY_BINS)
        if not isinstance(self.ap_bins, dict):
            raise ConfigError(f"config key 'ap_bins': expected a mapping of bin name "
                                     f"to [lo, hi], got {self.ap_bins!r}")
        out = {}
        for name, value in self.ap_bins.items():
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ConfigError(f"config key 'ap_bins.{name}': expected [lo, hi], "
                                         f"got {value!r}")
            out[str(name)] = (value[0], value[1])
        return out

    def detector_config(self, num_classes: int | None = None) -> DetectorConfig:
        """The detector's part of this config; ``num_classes`` from the data when 0."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(DetectorConfig)}
        if num_classes is not None and not self.num_classes:
            values["num_classes"] = num_classes
        return DetectorConfig(**values)
