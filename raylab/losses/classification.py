"""Classification criteria and top-k counts for image classifiers (ConvNeXt recipe).

The criterion follows timm ``train.py`` / ConvNeXt ``main.py``: with Mixup/CutMix the label
smoothing is already folded into the soft targets, so the loss is
``timm.loss.SoftTargetCrossEntropy``; without it, ``LabelSmoothingCrossEntropy`` or plain
cross-entropy on integer labels.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from raylab.errors import ConfigError


def train_criterion(mixup_active: bool, smoothing: float) -> nn.Module:
    """The training loss for the targets the loop will produce.

    Args:
        mixup_active: True when targets are Mixup/CutMix soft targets ``[N, K]``.
        smoothing: Label smoothing in [0, 1); with Mixup it is applied by the Mixup object.

    Returns:
        ``SoftTargetCrossEntropy`` when ``mixup_active``, else
        ``LabelSmoothingCrossEntropy(smoothing)`` when ``smoothing > 0``, else
        ``nn.CrossEntropyLoss``. The last two take integer labels ``[N]``.

    Raises:
        ConfigError: ``smoothing`` outside [0, 1).
    """
    if not 0.0 <= smoothing < 1.0:
        raise ConfigError(f"label smoothing must be in [0, 1), got {smoothing!r}")
    if mixup_active:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


@torch.no_grad()
def topk_correct(logits: torch.Tensor, target: torch.Tensor,
                 ks: Iterable[int] = (1, 5)) -> dict[int, int]:
    """Count samples whose true class is among the ``k`` highest logits.

    Args:
        logits: ``[N, K]`` scores.
        target: Integer labels ``[N]``, or soft targets ``[N, K]`` (their argmax is used).
        ks: The ``k`` values; each is capped at ``K`` (top-5 of 3 classes counts every
            sample), but the result is keyed by the ``k`` asked for.

    Returns:
        ``{k: number of correct samples}`` as Python ints (sum them across workers and
        divide by the sample count for accuracy).

    Raises:
        ValueError: Shapes do not match, or a ``k`` is below 1.
    """
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be [N, K] with K >= 1, got shape {tuple(logits.shape)}")
    if target.ndim == 2:
        target = target.argmax(dim=1)
    if target.ndim != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target must be [N] or [N, K] for logits {tuple(logits.shape)}, "
                         f"got shape {tuple(target.shape)}")
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"top-k values must be >= 1, got {ks}")
    if not ks:
        return {}
    num_classes = logits.shape[1]
    kmax = min(max(ks), num_classes)
    top = logits.topk(kmax, dim=1).indices  # [N, kmax], best first
    hits = top.eq(target.view(-1, 1).to(top.device))  # at most one True per row
    cum = hits.cumsum(dim=1).sum(dim=0)  # cum[j] = samples correct within top j + 1
    return {k: int(cum[min(k, num_classes) - 1]) for k in ks}
