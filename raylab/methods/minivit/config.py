"""MiniViT's config: a multiplexed timm ViT/DeiT/Swin student, its teacher and the losses.

Defaults are the paper's (Zhang et al. 2022): DeiT's recipe (AdamW lr 5e-4 at batch 512,
weight decay 0.05, 300 epochs, 5 warm-up, drop-path 0.1), sharing every 2 layers with
weight transformation, and L = L_pred + beta L_attn + gamma L_hddn with beta 1, gamma 0.1,
T 1. Scale epochs and batch down for small data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from raylab import config as cfglib
from raylab.errors import ConfigError
from raylab.models.minivit import INITS, MultiplexError, parse_strategy
from raylab.tasks.classification.config import ClassificationConfig, ImageOptimConfig


@dataclass
class DistillConfig:
    """Weights of the distillation terms; only used with a ``teacher``."""

    #: Weight of the soft-label cross-entropy to the teacher's logits (eq. 9).
    pred: float = 1.0
    #: Weight of the q/k/v attention-relation loss (eq. 10), beta in the paper.
    beta: float = 1.0
    #: Weight of the hidden-state relation loss (eq. 11), gamma in the paper.
    gamma: float = 0.1
    temperature: float = 1.0
    #: Weight of the ground-truth (Mixup/CutMix) cross-entropy; 0 in the paper's eq. 12
    #: (its Table 3 also tries 0.5 with pred 0.5).
    gt: float = 0.0
    #: Heads the q/k/v widths are split into for the attention relations.
    relation_heads: int = 1

    def validate(self) -> None:
        for key in ("pred", "beta", "gamma", "gt"):
            v = getattr(self, key)
            cfglib.require(v >= 0, f"distill.{key}", ">= 0", v)
        cfglib.require(self.pred + self.gt > 0, "distill.pred", "pred + gt > 0 (something "
                       "must fit the labels or the teacher's predictions)", self.pred)
        cfglib.require(self.temperature > 0, "distill.temperature", "> 0", self.temperature)
        cfglib.require(self.relation_heads >= 1, "distill.relation_heads", "an integer >= 1",
                       self.relation_heads)


@dataclass
class MiniViTOptimConfig(ImageOptimConfig):
    """DeiT's recipe: lr 5e-4 at batch 512 (the same scaling as 4e-3 at 4096), 5 warm-up."""

    lr: float = 5e-4
    reference_batch: int = 512
    warmup_epochs: int = 5


@dataclass
class MiniViTConfig(ClassificationConfig):
    """A multiplexed student (``model``, any timm ViT/DeiT/Swin) distilled from ``teacher``."""

    model: str = "deit_tiny_patch16_224"
    drop_path: float | None = 0.1
    #: Student geometry: patch size and depth (null: the timm model's); the image size
    #: is ``input_size``.
    patch_size: int | None = None
    depth: int | None = None
    #: Layers sharing weights: none, every-K (e.g. every-2), all, or a JSON grouping such
    #: as [[0,1,2],[3,4,5]].
    sharing: str = "every-2"
    #: Per-layer weight transformations (head mixing; Swin: depthwise conv before the MLP).
    transform: bool = True
    #: A group's shared weights start from its first layer's or the mean of its layers'.
    sharing_init: str = "first"
    #: An uncompressed raylab checkpoint of the student's architecture to start from.
    init_from: str = ""
    #: The teacher: a raylab classifier checkpoint folder (convnext or minivit run on the
    #: same classes), or a timm name with ``teacher_weights``; empty: no distillation.
    teacher: str = ""
    #: Weights file (timm checkpoint, same classes) of a teacher given by timm name.
    teacher_weights: str = ""
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: MiniViTOptimConfig = field(default_factory=MiniViTOptimConfig)

    def validate(self) -> None:
        super().validate()
        self.distill.validate()
        cfglib.require(self.patch_size is None or self.patch_size >= 1, "patch_size",
                       "null or an integer >= 1", self.patch_size)
        cfglib.require(self.depth is None or self.depth >= 1, "depth", "null or an integer >= 1",
                       self.depth)
        cfglib.require(self.sharing_init in INITS, "sharing_init", f"one of {list(INITS)}",
                       self.sharing_init)
        try:
            # The model's own depth is checked when it is built; here the grammar.
            parse_strategy(self.sharing, self.depth or _explicit_depth(self.sharing) or 12)
        except MultiplexError as e:
            raise ConfigError(f"config key 'sharing': {e}") from None
        cfglib.require(not self.teacher_weights or bool(self.teacher), "teacher_weights",
                       "only with a teacher given by timm name", self.teacher_weights)

    @property
    def drop_path_rate(self) -> float:
        return 0.0 if self.drop_path is None else self.drop_path

    def model_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"img_size": self.input_size}
        if self.patch_size is not None:
            kwargs["patch_size"] = self.patch_size
        if self.depth is not None:
            kwargs["depth"] = self.depth
        return kwargs


def _explicit_depth(text: str) -> int:
    """The layer count an explicit JSON grouping covers (checked in full on the model)."""
    try:
        groups = json.loads(text)
        return sum(len(g) for g in groups)
    except (json.JSONDecodeError, TypeError):
        return 0  # parse_strategy names the problem
