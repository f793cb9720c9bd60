"""GDumb: ignore the stream; retrain from scratch on a class-balanced memory at each bucket.

Prabhu, Torr & Dokania, "GDumb: A Simple Approach that Questions Our Progress in Continual
Learning", ECCV 2020; checked against avalanche's ``GDumbPlugin``. The strategy itself is
plain cross-entropy; what makes it GDumb is what the caller does, as its flags say:

- ``trains_on_buffer``: add bucket ``t`` to the :class:`~raylab.continual.buffers.
  ClassBalancedBuffer` **before** training, then train on the buffer's rows (not the
  bucket's);
- ``from_scratch``: :meth:`GDumb.before_bucket` loads the weights the model had when GDumb
  first saw it, and :func:`~raylab.continual.loop.train_bucket` clears the optimizer state
  (a learning-rate schedule is the caller's to restart).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from raylab.continual.strategies.base import Bucket, Strategy, clone_tensors, unwrap


class GDumb(Strategy):
    """Re-initialise the model before every bucket; train on the class-balanced buffer."""

    name = "gdumb"
    table_name = "GDumb"
    default_buffer = "class_balanced"
    from_scratch = True
    trains_on_buffer = True

    def __init__(self) -> None:
        super().__init__()
        self.initial_state: dict[str, torch.Tensor] | None = None

    def before_bucket(self, model: nn.Module, bucket: Bucket) -> None:
        net = unwrap(model)
        if self.initial_state is None:
            self.initial_state = clone_tensors(net.state_dict())
        else:
            net.load_state_dict(self.initial_state)

    def state_dict(self) -> dict[str, Any]:
        initial = None if self.initial_state is None else clone_tensors(self.initial_state)
        return {**super().state_dict(), "initial_state": initial}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        initial = state["initial_state"]
        self.initial_state = None if initial is None else clone_tensors(initial)
