"""Optimizers, parameter groups, learning-rate scaling and weight EMA (pure torch + timm).

``param_groups``: weight-decay / layer-decay groups, :func:`build_optimizer`,
:func:`scale_lr`. ``ema``: :class:`ModelEma` around timm's ``ModelEmaV3``.
"""

from raylab.optim.ema import ModelEma
from raylab.optim.param_groups import build_optimizer, param_groups, scale_lr, unwrap_model

__all__ = ["ModelEma", "build_optimizer", "param_groups", "scale_lr", "unwrap_model"]
