"""Optimizer parameter groups (weight decay, layer-wise lr decay), optimizers and lr scaling.

Built on timm's ``param_groups_weight_decay`` / ``param_groups_layer_decay``: no weight
decay on 1-D parameters (norm weights, biases, layer-scale gammas), position embeddings
and class/register tokens; layer-wise lr decay (BEiT; ConvNeXt and ViTDet fine-tuning)
follows each timm model's ``group_matcher``, so it works for any timm backbone.
"""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral
from typing import Any

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from raylab.engine.checkpoint import unwrap_model
from raylab.errors import ConfigError

# fnmatch patterns (full parameter names) that never get weight decay, at any depth.
DEFAULT_NO_WEIGHT_DECAY = (
    "*pos_embed", "*cls_token", "*dist_token", "*reg_token", "*relative_position_bias_table",
)

_OPTIMIZERS = ("adamw", "sgd")


def _declared_no_weight_decay(model: nn.Module) -> set[str]:
    """Names returned by ``no_weight_decay()`` of the model and of every submodule,
    prefixed with the submodule's path (timm defines it on ViT, DeiT, Swin, ...)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names.update(f"{prefix}.{n}" if prefix else str(n) for n in fn())
    return names


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    no_weight_decay: Iterable[str] = (),
    exempt_tokens: bool = True,
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into optimizer groups.

    No weight decay on: 1-D parameters (norm weights, biases), names matched by
    :data:`DEFAULT_NO_WEIGHT_DECAY`, names returned by ``no_weight_decay()`` of the model or
    any submodule, and the fnmatch patterns in ``no_weight_decay`` (full names such as
    ``"backbone.pos_embed"`` or ``"*.gamma"``). Frozen parameters are left out.
    ``exempt_tokens=False`` drops the first two (position embeddings, class tokens and the
    like are then decayed), as the DINO reference does: it exempts only biases and 1-D
    parameters.

    With ``layer_decay``, timm's ``param_groups_layer_decay`` assigns each parameter a layer
    id ``i`` from the model's ``group_matcher(coarse=False)`` (stem 0, one id per block,
    head last; models without one fall back to timm's automatic grouping) and
    ``lr_scale = layer_decay ** (L - 1 - i)`` with ``L`` the number of layer ids, so the
    head's scale is 1.0 and the stem's the smallest.

    Args:
        model: The model (DDP / compile wrappers are looked through).
        weight_decay: Weight decay of the decayed groups (>= 0).
        layer_decay: Per-layer lr decay in (0, 1], or None for none.
        no_weight_decay: Extra fnmatch patterns of parameter names without weight decay.
        exempt_tokens: Exempt :data:`DEFAULT_NO_WEIGHT_DECAY` and ``no_weight_decay()``
            names (timm's convention).

    Returns:
        Non-empty groups, each ``{"params", "weight_decay", "lr_scale"}``; every trainable
        parameter is in exactly one group. Apply ``lr_scale`` with
        :func:`raylab.engine.schedules.set_lr`.

    Raises:
        ConfigError: ``weight_decay`` < 0 or ``layer_decay`` outside (0, 1].
    """
    if not weight_decay >= 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ConfigError(f"layer_decay must be in (0, 1], got {layer_decay!r}")
    model = unwrap_model(model)
    skip = sorted((set(DEFAULT_NO_WEIGHT_DECAY) | _declared_no_weight_decay(model)
                   if exempt_tokens else set()) | set(no_weight_decay))
    if layer_decay is None:
        groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    else:
        groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip,
                                          layer_decay=layer_decay)
    return [
        {"params": list(g["params"]), "weight_decay": float(g["weight_decay"]),
         "lr_scale": float(g.get("lr_scale", 1.0))}
        for g in groups if g["params"]
    ]


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    momentum: float = 0.9,
    layer_decay: float | None = None,
    no_weight_decay: Iterable[str] = (),
) -> torch.optim.Optimizer:
    """AdamW or SGD (with momentum) over :func:`param_groups`.

    Each group starts at ``lr * lr_scale`` and keeps its ``lr_scale`` key, so that a
    per-iteration schedule can set ``lr`` with :func:`raylab.engine.schedules.set_lr`.

    Args:
        model: The model.
        name: ``"adamw"`` or ``"sgd"`` (case-insensitive).
        lr: Base learning rate (> 0), e.g. from :func:`scale_lr`.
        weight_decay: Decoupled (AdamW) or L2 (SGD) weight decay of the decayed groups.
        betas: AdamW betas.
        momentum: SGD momentum.
        layer_decay: Layer-wise lr decay, see :func:`param_groups`.
        no_weight_decay: Extra parameter-name patterns without weight decay.

    Raises:
        ConfigError: Unknown ``name``, ``lr`` <= 0, a bad decay, or nothing to train.
    """
    key = name.lower()
    if key not in _OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; expected one of {list(_OPTIMIZERS)}")
    if not lr > 0:
        raise ConfigError(f"learning rate must be > 0, got {lr!r}")
    groups = param_groups(model, weight_decay, layer_decay, no_weight_decay)
    if not groups:
        raise ConfigError("the model has no trainable parameters to optimise")
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    if key == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def scale_lr(base_lr: float, global_batch: int, reference_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): ``base_lr * global_batch / reference_batch``.

    E.g. ConvNeXt's 4e-3 at batch 4096 gives 1e-3 at 1024; DINO's 5e-4 is per 256.

    Raises:
        ConfigError: A batch size below 1 or ``base_lr`` <= 0.
    """
    if not base_lr > 0:
        raise ConfigError(f"base learning rate must be > 0, got {base_lr!r}")
    for label, value in (("global_batch", global_batch), ("reference_batch", reference_batch)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ConfigError(f"{label} must be an integer >= 1, got {value!r}")
    return float(base_lr) * int(global_batch) / int(reference_batch)
