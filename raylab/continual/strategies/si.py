"""Synaptic Intelligence: a path-integral importance per parameter.

Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017;
checked against avalanche's ``SynapticIntelligencePlugin``, which the CLEAR authors ran.

During bucket ``t`` every optimizer step adds ``-g_k * delta_k`` to the running path
integral ``omega_k`` (``g``: the gradient the step used, i.e. ``.grad`` after backward and
after any projection; ``delta``: the change of the weight in that step). After the bucket,
with ``Delta_k = theta_k(end) - theta_k(start)``, the importance grows by
``omega_k / (Delta_k^2 + xi)`` (eq. 5) and the anchor ``theta*`` becomes the current weights.
The loss adds ``c * sum_k Omega_k (theta_k - theta*_k)^2`` (eq. 4).

Deviations: a bucket's contribution ``omega_k / (Delta_k^2 + xi)`` is clamped at 0 from
below (with Adam or a noisy gradient a step can move against the gradient; a negative
importance would reward drifting away); avalanche's clamp of the importance at 0.001 from
above is not applied. Defaults ``c = 5e-5`` and ``xi = 1e-7`` are the CLEAR authors' run
(avalanche ``si_lambda=1e-4``, whose penalty is ``si_lambda/2 * sum ...``; ``eps=1e-7``).

The step's ``delta`` is read one step late (the next ``after_backward``, or
``after_bucket``), so the strategy needs no hook after ``optimizer.step()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
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
    named_trainable,
)

Tensors = dict[str, torch.Tensor]


class SI(Strategy):
    """Synaptic Intelligence penalty ``c * sum Omega (theta - theta*)^2``.

    Args:
        c: Penalty strength (>= 0).
        xi: Damping ``xi`` of the importance denominator (> 0).
    """

    name = "si"
    table_name = "SI"
    config_knobs = {"si_c": "c"}

    def __init__(self, c: float = 5e-5, xi: float = 1e-7) -> None:
        super().__init__()
        self.c = check_number("c", c)
        self.xi = check_number("xi", xi, strict=True)
        self.importance: Tensors = {}  # Omega, accumulated over buckets
        self.anchor: Tensors = {}      # theta* after the last bucket
        self._start: Tensors = {}      # weights at the start of the current bucket
        self._omega: Tensors = {}      # running path integral of the current bucket
        self._pending: tuple[Tensors, Tensors] | None = None  # (weights, grads) of last step

    @staticmethod
    def _weights(model: nn.Module) -> Tensors:
        return {n: p.detach().float().clone() for n, p in named_trainable(model)}

    def _place(self, model: nn.Module) -> None:
        """Move the state to the model's device (after a load from a CPU checkpoint)."""
        device = model_device(model)
        first = next(iter(self.importance.values()), None)
        if first is None:
            first = next(iter(self._start.values()), None)
        if first is None or first.device == device:
            return
        for tensors in (self.importance, self.anchor, self._start, self._omega,
                        *(self._pending or ())):
            for name, t in tensors.items():
                tensors[name] = t.to(device)

    def before_bucket(self, model: nn.Module, bucket: Bucket) -> None:
        self._place(model)
        self._start = self._weights(model)
        self._omega = {n: torch.zeros_like(w) for n, w in self._start.items()}
        self._pending = None

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``c * sum_k Omega_k (theta_k - theta*_k)^2`` (0 before any bucket)."""
        self._place(model)
        total = torch.zeros((), device=model_device(model))
        for name, p in named_trainable(model):
            if name in self.importance:
                total = total + (self.importance[name] * (p.float() - self.anchor[name]) ** 2
                                 ).sum()
        return self.c * total

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             replay: Batch | None = None) -> torch.Tensor:
        task = cross_entropy(model(x), y)
        return task + self.penalty(model) if self.importance else task

    def _fold(self, model: nn.Module) -> None:
        """Add the last step's ``-g * delta`` now that its ``delta`` is known."""
        if self._pending is None:
            return
        before, grads = self._pending
        for name, p in named_trainable(model):
            if name in grads and name in self._omega:
                self._omega[name] -= grads[name] * (p.detach().float() - before[name])
        self._pending = None

    def after_backward(self, model: nn.Module) -> None:
        if not self._omega:  # hooks driven by hand, without before_bucket
            self.before_bucket(model, Bucket(self.buckets_seen))
        self._place(model)
        self._fold(model)
        grads = {n: torch.nan_to_num(p.grad.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
                 for n, p in named_trainable(model) if p.grad is not None}
        self._pending = (self._weights(model), grads)

    def after_bucket(self, model: nn.Module, batches: BatchesFactory) -> None:
        self._place(model)
        self._fold(model)
        now = self._weights(model)
        for name, omega in self._omega.items():
            delta = now[name] - self._start[name]
            gain = (omega / (delta ** 2 + self.xi)).clamp_min(0.0)
            old = self.importance.get(name)
            self.importance[name] = gain if old is None else old + gain
        self.anchor = now
        self._omega, self._start = {}, {}
        super().after_bucket(model, batches)

    def state_dict(self) -> dict[str, Any]:
        pending = None if self._pending is None else [clone_tensors(t) for t in self._pending]
        return {**super().state_dict(), "importance": clone_tensors(self.importance),
                "anchor": clone_tensors(self.anchor), "start": clone_tensors(self._start),
                "omega": clone_tensors(self._omega), "pending": pending}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.importance = clone_tensors(state["importance"])
        self.anchor = clone_tensors(state["anchor"])
        self._start = clone_tensors(state["start"])
        self._omega = clone_tensors(state["omega"])
        pending = state["pending"]
        self._pending = None if pending is None else (clone_tensors(pending[0]),
                                                      clone_tensors(pending[1]))
