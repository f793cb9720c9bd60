"""Frozen-backbone reuse (Vasconcelos et al., CVPR 2022): freeze all but the chosen parts.

:func:`freeze_backbone` turns off ``requires_grad`` for the parameters that the caller's
``trainable`` predicate rejects (``trainable`` says "head or adapter?", e.g.
``lambda n: n.startswith("head.") or is_adapter_parameter(n)`` with
:func:`raylab.models.adapters.is_adapter_parameter`). Modes:

- ``"none"``: nothing changes;
- ``"backbone"``: the backbone's weights are frozen, but its normalisation layers
  (BatchNorm, GroupNorm, LayerNorm, timm's LayerNorm2d / RmsNorm, ...) keep trainable
  affine parameters, and BatchNorm keeps updating its running statistics in train mode;
- ``"backbone+norms"``: the norms' affine parameters are frozen too, and every BatchNorm
  outside the trainable parts becomes a frozen BatchNorm (timm's ``FrozenBatchNorm2d``,
  torchvision's class; :class:`FrozenBatchNorm` for 1-D/3-D), whose statistics and affine
  terms are buffers, so ``model.train()`` cannot change them. They are no longer
  parameters: the model's parameter count drops by their affine terms.

Freeze *before* wrapping the model in DDP and before building the optimizer. DDP registers
its gradient all-reduce only for parameters with ``requires_grad=True`` when it is built, so
frozen parameters are left out of the all-reduce (less communication, no
``find_unused_parameters`` needed for them); parameters frozen after wrapping would still be
expected to receive gradients. The optimizer must get trainable parameters only:
:func:`raylab.optim.param_groups.build_optimizer` already does, because its
:func:`~raylab.optim.param_groups.param_groups` uses timm's ``param_groups_weight_decay`` /
``param_groups_layer_decay``, which skip parameters with ``requires_grad=False``.

Pure torch + timm, no Ray import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from torch import nn

from raylab.errors import ConfigError

FREEZE_MODES = ("none", "backbone", "backbone+norms")

#: Modules defining normalisation layers: a module is a norm layer when a class in its MRO
#: comes from one of them (BatchNorm*, SyncBatchNorm, InstanceNorm*, GroupNorm, LayerNorm,
#: RMSNorm; timm's LayerNorm2d, GroupNorm1, RmsNorm, SimpleNorm, BatchNormAct2d, ...).
_NORM_MODULES = frozenset({
    "torch.nn.modules.batchnorm", "torch.nn.modules.instancenorm",
    "torch.nn.modules.normalization", "timm.layers.norm", "timm.layers.norm_act",
})


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (see :data:`_NORM_MODULES`)."""
    return any(cls.__module__ in _NORM_MODULES for cls in type(module).__mro__)


class FrozenBatchNorm(nn.Module):
    """BatchNorm of any input rank ``[N, C, ...]`` with fixed statistics and affine terms
    (all buffers): what eval-mode BatchNorm computes, in train mode too. Used for
    BatchNorm1d/3d; BatchNorm2d becomes timm's ``FrozenBatchNorm2d``.

    Args:
        bn: The BatchNorm to freeze (its tensors are copied).
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        c = bn.num_features
        self.num_features, self.eps = c, bn.eps
        mean, var = bn.running_mean.detach().clone(), bn.running_var.detach().clone()
        ones = torch.ones_like(mean)
        self.register_buffer("weight", bn.weight.detach().clone() if bn.affine else ones)
        self.register_buffer("bias", bn.bias.detach().clone() if bn.affine else 0 * ones)
        self.register_buffer("running_mean", mean)
        self.register_buffer("running_var", var)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # A BatchNorm checkpoint's step counter has no use here (as torchvision's class).
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise with the stored statistics, whatever the training mode."""
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


@dataclass(frozen=True)
class FreezeSummary:
    """Parameter counts (elements; a shared parameter counted once)."""

    total: int
    trainable: int
    frozen: int


def freeze_summary(model: nn.Module) -> FreezeSummary:
    """Total, trainable and frozen parameter counts of ``model``."""
    total = trainable = 0
    for p in model.parameters():  # parameters() yields a shared tensor once
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return FreezeSummary(total, trainable, total - trainable)


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of parameter elements with ``requires_grad`` (shared ones counted once)."""
    return freeze_summary(model).trainable


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _freeze_batch_norms(module: nn.Module, prefix: str,
                        trainable: Callable[[str], bool]) -> nn.Module:
    """``module`` with each BatchNorm outside the trainable parts frozen (a BatchNorm is
    trainable when ``trainable`` accepts the name of its ``weight``)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if trainable(_join(prefix, "weight")) or module.running_mean is None:
            # Without running statistics (track_running_stats=False) a BatchNorm always
            # normalises with the batch's: nothing to freeze beyond its affine terms.
            return module
        if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            return freeze_batch_norm_2d(module)  # also timm's BatchNormAct2d
        return FrozenBatchNorm(module)
    for name, child in module.named_children():
        new = _freeze_batch_norms(child, _join(prefix, name), trainable)
        if new is not child:
            setattr(module, name, new)
    return module


def freeze_backbone(model: nn.Module, mode: str,
                    trainable: Callable[[str], bool]) -> nn.Module:
    """Freeze the parameters of ``model`` that ``trainable`` rejects, as ``mode`` says.

    Only ever turns ``requires_grad`` off: a parameter frozen before stays frozen. A
    parameter shared under several names stays trainable when one of them is trainable
    (or, in mode ``"backbone"``, when one owner is a norm layer).

    Args:
        model: Any module (unwrapped: freeze before DDP).
        mode: One of :data:`FREEZE_MODES` (see the module docstring).
        trainable: Full parameter name -> whether it is trained (head, adapters).

    Returns:
        The model, frozen in place; a new module only when ``model`` itself is a
        BatchNorm frozen in mode ``"backbone+norms"``.

    Raises:
        ConfigError: An unknown ``mode``.
    """
    if mode not in FREEZE_MODES:
        raise ConfigError(f"unknown freeze mode {mode!r}; expected one of {list(FREEZE_MODES)}")
    if mode == "none":
        return model
    keep_norms = mode == "backbone"
    params: dict[int, nn.Parameter] = {}
    keep: dict[int, bool] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        norm = keep_norms and is_norm_layer(module)
        for name, p in module.named_parameters(recurse=False):
            params[id(p)] = p
            keep[id(p)] = keep.get(id(p), False) or norm or bool(trainable(_join(prefix, name)))
    for key, p in params.items():
        if not keep[key]:
            p.requires_grad_(False)
    if mode == "backbone+norms":
        model = _freeze_batch_norms(model, "", trainable)
    return model
