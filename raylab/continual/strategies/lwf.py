"""Learning without Forgetting: distillation to the model as it was after the last bucket.

Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017; checked against
avalanche's ``LwFPlugin`` (``avalanche/training/plugins/lwf.py``), which the CLEAR authors
ran. The loss of a batch ``x`` with labels ``y`` is

    CE(z, y) + alpha_t * KL(softmax(z_old / T) || softmax(z / T))

with ``z`` the current logits, ``z_old`` the logits of the frozen copy taken after the
previous bucket, ``T`` the temperature and the KL divergence averaged over the batch
(``sum_c q_c (log q_c - log p_c)``, then the batch mean: avalanche's ``kl_div(...,
reduction="batchmean")``, without a ``T^2`` factor). On the first bucket there is no old
model and the loss is the cross-entropy alone. Every output unit is distilled: CLEAR is
domain-incremental (all classes in every bucket), so avalanche's restriction to the units of
previously seen classes changes nothing there.

``alpha`` may be one number or one per bucket (the last value is reused past the end).
Defaults are the CLEAR authors' run: ``alpha = linspace(0, 2, 11)`` by bucket, ``T = 1``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raylab.continual.strategies.base import (
    Batch,
    BatchesFactory,
    Bucket,
    Strategy,
    check_number,
    clone_tensors,
    cross_entropy,
    model_device,
    unwrap,
)
from raylab.errors import ConfigError

CLEAR_ALPHA = tuple(round(0.2 * i, 10) for i in range(11))  # np.linspace(0, 2, 11)


def distillation_loss(logits: torch.Tensor, old_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Batch-mean ``KL(softmax(old / T) || softmax(logits / T))`` in float32."""
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    log_q = F.log_softmax(old_logits.float().detach() / temperature, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)


class LwF(Strategy):
    """Cross-entropy plus ``alpha_t`` times the distillation to the previous model.

    Args:
        alpha: Distillation weight, or one weight per bucket index (>= 0 each).
        temperature: Softmax temperature ``T`` (> 0).
    """

    name = "lwf"
    table_name = "LwF"
    config_knobs = {"lwf_alpha": "alpha", "lwf_temperature": "temperature"}

    def __init__(self, alpha: float | Sequence[float] = CLEAR_ALPHA,
                 temperature: float = 1.0) -> None:
        super().__init__()
        values = [alpha] if isinstance(alpha, (int, float)) else list(alpha)
        if not values:
            raise ConfigError("LwF alpha needs at least one value")
        self.alpha = [check_number("alpha", a) for a in values]
        self.temperature = check_number("temperature", temperature, strict=True)
        self._bucket: int | None = None
        self._old: nn.Module | None = None
        self._old_state: dict[str, torch.Tensor] | None = None

    def alpha_at(self, bucket: int) -> float:
        """The distillation weight used while training on bucket ``bucket``."""
        return self.alpha[min(bucket, len(self.alpha) - 1)]

    def old_model(self, model: nn.Module) -> nn.Module | None:
        """The frozen copy from the last bucket (rebuilt from a loaded state on first use)."""
        if self._old is None and self._old_state is not None:
            self._old = self._freeze(unwrap(model))
            self._old.load_state_dict(self._old_state)
        if self._old is not None and model_device(self._old) != model_device(model):
            self._old.to(model_device(model))
        return self._old

    @staticmethod
    def _freeze(model: nn.Module) -> nn.Module:
        old = copy.deepcopy(model).eval()
        old.requires_grad_(False)
        return old

    def before_bucket(self, model: nn.Module, bucket: Bucket) -> None:
        self._bucket = bucket.index

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             replay: Batch | None = None) -> torch.Tensor:
        logits = model(x)
        task = cross_entropy(logits, y)
        old = self.old_model(model)
        if old is None:
            return task
        with torch.no_grad():
            old_logits = old(x)
        alpha = self.alpha_at(self.buckets_seen if self._bucket is None else self._bucket)
        return task + alpha * distillation_loss(logits, old_logits, self.temperature)

    def after_bucket(self, model: nn.Module, batches: BatchesFactory) -> None:
        self._old = self._freeze(unwrap(model))
        self._old_state = None
        self._bucket = None
        super().after_bucket(model, batches)

    def state_dict(self) -> dict[str, Any]:
        old = self._old.state_dict() if self._old is not None else self._old_state
        return {**super().state_dict(), "old_model": None if old is None else clone_tensors(old)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        old = state["old_model"]
        self._old = None
        self._old_state = None if old is None else clone_tensors(old)
