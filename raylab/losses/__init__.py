"""Pure-torch losses and loss helpers (no Ray import).

``classification``: the training criterion for the ConvNeXt recipe (timm's soft-target and
label-smoothing cross-entropies) and top-k correct counts. ``dino``: DINO's multi-crop
self-distillation loss, teacher centering and teacher-temperature schedule.
``distill``: MiniViT's prediction, attention-relation and hidden-relation distillation losses.
"""

from raylab.losses.classification import topk_correct, train_criterion
from raylab.losses.dino import dino_loss, teacher_temperature_schedule, update_center
from raylab.losses.distill import (
    attention_relation_loss,
    hidden_relation_loss,
    prediction_loss,
)

__all__ = ["attention_relation_loss", "dino_loss", "hidden_relation_loss", "prediction_loss",
           "teacher_temperature_schedule", "topk_correct", "train_criterion", "update_center"]
