"""Exponential moving average of model weights (ConvNeXt's optional EMA, 0.9999).

A thin wrapper of ``timm.utils.ModelEmaV3`` that looks through DDP / ``torch.compile``
wrappers, keeps the averaged copy frozen in eval mode, and saves/loads a plain state dict
of that copy (the same keys as the bare model, so EMA weights load into a model for
evaluation). ``raylab.engine.checkpoint.save_checkpoint(ema=...)`` accepts it: both read
``.module``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn

from raylab.errors import ConfigError
from raylab.optim.param_groups import unwrap_model


class ModelEma:
    """EMA of a model's parameters and floating-point buffers:
    ``ema = decay * ema + (1 - decay) * model`` after every :meth:`update`
    (integer buffers such as BatchNorm's ``num_batches_tracked`` are copied).

    Args:
        model: The model to average (a DDP / compile wrapper is looked through); the copy
            is taken now, so build the EMA after loading weights and before wrapping.
        decay: The EMA decay in [0, 1).
        warmup: Ramp the decay up with timm's schedule ``min(decay, 1 - step ** (-2/3))``
            for ``step >= 2``; steps 0 and 1 copy the model outright (decay 0). Without
            warm-up the decay is constant from the first update.
        device: Keep the copy on this device (e.g. ``"cpu"`` to save GPU memory), or None
            for the model's device.

    Raises:
        ConfigError: ``decay`` outside [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, *, warmup: bool = False,
                 device: torch.device | str | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1), got {decay!r}")
        self.warmup = warmup
        self._ema = ModelEmaV3(unwrap_model(model), decay=decay, use_warmup=warmup,
                               device=None if device is None else torch.device(device))
        self._ema.module.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged copy (eval mode, no gradients): evaluate with ``ema.module(x)``."""
        return self._ema.module

    @property
    def decay(self) -> float:
        """The target decay."""
        return float(self._ema.decay)

    def decay_at(self, step: int) -> float:
        """The decay :meth:`update` uses at ``step`` (constant without warm-up)."""
        return float(self._ema.get_decay(step if self.warmup else None))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, decay: float | None = None) -> None:
        """Fold the current weights of ``model`` into the average.

        Args:
            model: The trained model (DDP / compile wrappers are looked through).
            step: Optimizer steps taken so far (drives the warm-up).
            decay: Use this decay instead (e.g. DINO's cosine teacher momentum).
        """
        inner = unwrap_model(model)
        if decay is None:
            decay = self.decay_at(step)
        elif not 0.0 <= decay <= 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1], got {decay!r}")
        if self._ema.exclude_buffers:
            self._ema.apply_update_no_buffers_(inner, decay)
        else:
            self._ema.apply_update_(inner, decay)

    def state_dict(self) -> dict[str, Any]:
        """The averaged copy's state dict (the bare model's keys)."""
        return self._ema.module.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load what :meth:`state_dict` returned (e.g. from a checkpoint)."""
        self._ema.module.load_state_dict(state)
