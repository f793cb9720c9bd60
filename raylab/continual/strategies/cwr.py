"""CWR*: consolidated output weights, temporary weights per bucket, weighted by class counts.

Lomonaco & Maltoni, "CORe50" (CoRL 2017) and Lomonaco et al., "Fine-Grained Continual
Learning" (arXiv 1907.03799, Algorithm 2); checked against avalanche's ``CWRStarPlugin``
(``avalanche/training/plugins/cwr_star.py``), which the CLEAR authors ran with its defaults.

The output layer (a ``nn.Linear``, ``W`` of shape ``[classes, features]``) holds the
**temporary** weights ``tw`` while a bucket trains and the **consolidated** weights ``cw``
otherwise. With ``cur_j`` the bucket's rows of class ``j`` and ``past_j`` the rows of class
``j`` in earlier buckets:

- before a bucket: ``W = 0``, then ``W[j] = cw[j]`` for each class ``j`` of the bucket that
  has consolidated weights; after the first bucket every other layer is frozen
  (``requires_grad=False``, eval mode), unless ``freeze_backbone=False``;
- after it, with ``avg = mean(W[j] for j in the bucket)`` (one scalar over those rows), for
  each class ``j`` of the bucket: ``w_past = sqrt(past_j / cur_j)``,
  ``cw[j] = (cw[j] * w_past + (W[j] - avg)) / (w_past + 1)`` (``cw[j] = W[j] - avg`` for a
  new class), ``past_j += cur_j``; then ``W[j] = cw[j]`` for every consolidated class.

Deviation: avalanche adds ``cur_j`` to ``past_j`` only for classes consolidated before, so
the first bucket of a class never counts; raylab counts it, as Algorithm 2 does. The layer's
bias, like avalanche's, is trained as is (no consolidation).

The caller must pass the bucket's class counts: ``Bucket(index, class_counts)`` (e.g.
:meth:`~raylab.continual.strategies.base.Bucket.from_labels`). With several DDP workers,
build DDP with ``find_unused_parameters=True`` or after freezing, since the backbone stops
receiving gradients after the first bucket.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from raylab.continual.strategies.base import (
    BatchesFactory,
    Bucket,
    Strategy,
    clone_tensors,
    unwrap,
)
from raylab.errors import ConfigError


def find_output_layer(model: nn.Module, name: str | None = None) -> tuple[str, nn.Linear]:
    """``(name, layer)`` of the output ``nn.Linear``: the named submodule, else timm's
    ``get_classifier()`` when it is a Linear, else the last Linear of the model."""
    net = unwrap(model)
    if name is not None:
        layer = net.get_submodule(name)
    elif callable(getattr(net, "get_classifier", None)) and isinstance(
            net.get_classifier(), nn.Linear):
        layer = net.get_classifier()
    else:
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("CWR* needs an nn.Linear output layer; the model has none")
        layer = linears[-1]
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"CWR* layer {name!r} is a {type(layer).__name__}, not nn.Linear")
    found = next(n for n, m in net.named_modules() if m is layer)
    return found, layer


class CWRStar(Strategy):
    """CWR* on the model's output layer.

    Args:
        layer: Dotted name of the output ``nn.Linear`` (None: found automatically).
        freeze_backbone: Freeze every other layer after the first bucket (avalanche's
            ``freeze_remaining_model``).
    """

    name = "cwr"
    table_name = "CWR*"

    def __init__(self, layer: str | None = None, freeze_backbone: bool = True) -> None:
        super().__init__()
        if layer is not None and not isinstance(layer, str):
            raise ConfigError(f"CWR* layer must be a module name or None, got {layer!r}")
        self.layer = layer
        self.freeze_backbone = bool(freeze_backbone)
        self.consolidated: dict[int, torch.Tensor] = {}
        self.past_counts: dict[int, int] = {}
        self.current_counts: dict[int, int] = {}

    def _freeze_others(self, model: nn.Module, head_name: str) -> None:
        if head_name == "":
            return  # the model is its output layer (a linear probe on frozen features)
        net = unwrap(model)
        for name, module in net.named_modules():
            if name == head_name or head_name.startswith(name + ".") or name == "":
                continue  # the head and the modules that contain it stay as they are
            if not name.startswith(head_name + "."):
                module.eval()
        for name, p in net.named_parameters():
            p.requires_grad_(name.startswith(head_name + "."))

    def before_bucket(self, model: nn.Module, bucket: Bucket) -> None:
        if bucket.class_counts is None:
            raise ValueError("CWR* needs the bucket's class counts: pass "
                             "Bucket(index, class_counts) (e.g. Bucket.from_labels)")
        self.current_counts = {int(c): int(n) for c, n in bucket.class_counts.items() if n > 0}
        head_name, head = find_output_layer(model, self.layer)
        if self.freeze_backbone and self.buckets_seen > 0:
            self._freeze_others(model, head_name)
        with torch.no_grad():
            head.weight.zero_()
            for c in self.current_counts:
                if c in self.consolidated:
                    head.weight[c].copy_(self.consolidated[c])

    @torch.no_grad()
    def consolidate(self, model: nn.Module) -> None:
        """Fold the temporary weights of the current classes into the consolidated ones and
        load every consolidated row into the layer."""
        _, head = find_output_layer(model, self.layer)
        classes = sorted(self.current_counts)
        if not classes:
            return
        weight = head.weight.detach().float()
        avg = weight[classes].mean()
        for c in classes:
            shifted = (weight[c] - avg).cpu()
            past, cur = self.past_counts.get(c, 0), self.current_counts[c]
            if c in self.consolidated:
                w_past = math.sqrt(past / cur)
                shifted = (self.consolidated[c] * w_past + shifted) / (w_past + 1.0)
            self.consolidated[c] = shifted
            self.past_counts[c] = past + cur
        for c, row in self.consolidated.items():
            head.weight[c].copy_(row)

    def after_bucket(self, model: nn.Module, batches: BatchesFactory) -> None:
        self.consolidate(model)
        self.current_counts = {}
        super().after_bucket(model, batches)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(),
                "consolidated": clone_tensors({str(c): w for c, w in self.consolidated.items()}),
                "past_counts": {str(c): n for c, n in self.past_counts.items()},
                "current_counts": {str(c): n for c, n in self.current_counts.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.consolidated = {int(c): w.detach().cpu().float().clone()
                             for c, w in state["consolidated"].items()}
        self.past_counts = {int(c): int(n) for c, n in state["past_counts"].items()}
        self.current_counts = {int(c): int(n) for c, n in state["current_counts"].items()}
