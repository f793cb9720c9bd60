"""Reuse on a worker: the classification task with the reused network as its model."""

from __future__ import annotations

from torch import nn

from raylab.methods.reuse.models import build_reuse_model
from raylab.tasks.classification.task import ClassificationTask


class ReuseTask(ClassificationTask):
    """The classification task whose model is a saved backbone with a new head, adapters
    and frozen parts (frozen before DDP wraps it, so DDP all-reduces only what trains)."""

    def build_model(self) -> nn.Module:
        return build_reuse_model(self.cfg, self.num_classes)[0]
