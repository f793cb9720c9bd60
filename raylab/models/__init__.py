"""Pure-torch models and model accounting (parameter and multiply-accumulate counts).

The model classes are imported when first used (``raylab.models.SkillNet`` needs no timm,
whose import with torchvision's takes seconds): :mod:`.skillnet`, :mod:`.dino` (DINO's
head, multi-crop wrapper and timm backbones), :mod:`.backbones` (trained backbones as
frozen feature extractors).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

#: Public name -> the submodule defining it.
_LAZY = {
    "SkillNet": "skillnet",
    "DINOHead": "dino", "MultiCropWrapper": "dino", "build_backbone": "dino",
    "cancel_last_layer_grad": "dino", "clip_gradients": "dino",
    "cls_attention_maps": "dino", "last_self_attention": "dino",
    "load_backbone": "backbones",
    "ViTDet": "vitdet", "load_vitdet_weights": "vitdet",
    "DetectorConfig": "detection", "build_detector": "detection",
}

__all__ = ["count_macs", "count_params", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"raylab.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'raylab.models' has no attribute {name!r}")


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (shared parameters counted once).

    Args:
        model: Any module.
        trainable_only: Count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on a single zero input.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions;
    bias additions, activations and pooling are not counted) as FLOPs // 2. The model runs in
    eval mode under ``no_grad`` on its own device and dtype; its training mode is restored.

    Args:
        model: Any module taking one tensor.
        input_size: Shape of one input **without** the batch dimension, e.g. ``(60, 76)``
            for a SkillNet window; a batch dimension of 1 is added.
    """
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros((1, *input_size), device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2
