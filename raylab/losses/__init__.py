"""Pure-torch losses and loss helpers (no Ray import).

``classification``: the training criterion for the ConvNeXt recipe (timm's soft-target and
label-smoothing cross-entropies) and top-k correct counts.
"""

from raylab.losses.classification import topk_correct, train_criterion

__all__ = ["topk_correct", "train_criterion"]
