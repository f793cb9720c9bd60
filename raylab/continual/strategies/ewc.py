"""Elastic Weight Consolidation with a diagonal Fisher estimated after each bucket.

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017,
eq. 3: ``L(theta) = L_task(theta) + sum_k lambda/2 F_k (theta_k - theta*_k)^2``; checked
against avalanche's ``EWCPlugin`` (``avalanche/training/plugins/ewc.py``), which the CLEAR
authors ran. Two modes, as avalanche's:

- ``online`` (default): one penalty term; after bucket ``t`` the Fisher becomes
  ``F <- decay * F + F_t`` and the anchor ``theta*`` the weights after bucket ``t``
  (``decay=1``: the Fisher is accumulated over all buckets).
- ``separate``: one term per past bucket, ``sum_t lambda/2 sum_k F_t,k (theta_k -
  theta*_t,k)^2``; the CLEAR authors' setting (avalanche's default), memory grows with ``t``.

Fisher estimate (avalanche's): ``F_k = mean over the bucket's mini-batches of
(d L_batch / d theta_k)^2`` with ``L_batch`` the batch-mean cross-entropy against the true
labels, in eval mode (the empirical Fisher; with batches of one row it is the mean of the
per-sample squared gradients).

Default ``ewc_lambda = 2e-3``: avalanche adds ``ewc_lambda * sum F (theta - theta*)^2``
without the 1/2, and the CLEAR authors used ``ewc_lambda=0.001`` there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from raylab.continual.strategies.base import (
    AllReduce,
    Batch,
    BatchesFactory,
    Strategy,
    check_number,
    clone_tensors,
    cross_entropy,
    model_device,
    named_trainable,
    unpack_batch,
    unwrap,
)
from raylab.errors import ConfigError


def fisher_diagonal(model: nn.Module, batches: Iterable[Any],
                    all_reduce: AllReduce | None = None) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher: the mean over batches of the squared gradient of the
    batch-mean cross-entropy, per trainable parameter of the unwrapped model.

    Runs in eval mode (restored afterwards) without touching ``.grad``. With
    ``all_reduce`` (a sum over workers) the squared-gradient sums and the batch counts are
    summed over workers in one call, so every replica gets the same Fisher.

    Raises:
        ValueError: ``batches`` is empty (on every worker).
    """
    net = unwrap(model)
    params = named_trainable(net)
    device = model_device(net)
    sums = [torch.zeros_like(p, dtype=torch.float32) for _, p in params]
    count = 0
    was_training = net.training
    net.eval()
    try:
        for batch in batches:
            x, y = unpack_batch(batch, device)
            grads = torch.autograd.grad(cross_entropy(net(x), y), [p for _, p in params],
                                        allow_unused=True)
            for total, grad in zip(sums, grads):
                if grad is not None:
                    total += grad.float() ** 2
            count += 1
    finally:
        net.train(was_training)
    if all_reduce is not None:
        packed = torch.cat([s.flatten() for s in sums]
                           + [torch.tensor([float(count)], device=device)])
        packed = all_reduce(packed)
        count = int(round(float(packed[-1])))
        sums = [chunk.view_as(s) for chunk, s in
                zip(packed[:-1].split([s.numel() for s in sums]), sums)]
    if count == 0:
        raise ValueError("the Fisher estimate needs at least one batch")
    return {name: total / count for (name, _), total in zip(params, sums)}


class EWC(Strategy):
    """EWC penalty ``lambda/2 * sum F (theta - theta*)^2`` on top of the task loss.

    Args:
        ewc_lambda: Penalty strength ``lambda`` (>= 0).
        mode: ``"separate"`` (one Fisher and anchor per bucket: the CLEAR authors' EWC,
            avalanche's default) or ``"online"`` (one accumulated Fisher).
        decay: Online mode's Fisher decay ``gamma`` in [0, 1] (1: plain accumulation).
    """

    name = "ewc"
    table_name = "EWC"
    config_knobs = {"ewc_lambda": "ewc_lambda"}

    def __init__(self, ewc_lambda: float = 2e-3, mode: str = "separate",
                 decay: float = 1.0) -> None:
        super().__init__()
        if mode not in ("online", "separate"):
            raise ConfigError(f"EWC mode must be 'online' or 'separate', got {mode!r}")
        self.ewc_lambda = check_number("ewc_lambda", ewc_lambda)
        self.mode = mode
        self.decay = check_number("decay", decay, high=1.0)
        # Each term: {"fisher": {name: F}, "anchor": {name: theta*}} (CPU copies).
        self.terms: list[dict[str, dict[str, torch.Tensor]]] = []
        self._cache: tuple[torch.device, list[dict[str, dict[str, torch.Tensor]]]] | None = None

    def _terms_on(self, device: torch.device) -> list[dict[str, dict[str, torch.Tensor]]]:
        """The terms on ``device``, copied once per device rather than every step."""
        if self._cache is None or self._cache[0] != device:
            self._cache = (device, [{key: {n: t.to(device) for n, t in part.items()}
                                     for key, part in term.items()} for term in self.terms])
        return self._cache[1]

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``lambda/2 * sum_terms sum_k F_k (theta_k - theta*_k)^2`` (0 before any bucket);
        parameters absent from a term (added later) do not count."""
        params = named_trainable(model)
        device = model_device(model)
        total = torch.zeros((), device=device)
        for term in self._terms_on(device):
            fisher, anchor = term["fisher"], term["anchor"]
            for name, p in params:
                if name in fisher:
                    total = total + (fisher[name] * (p.float() - anchor[name]) ** 2).sum()
        return 0.5 * self.ewc_lambda * total

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             replay: Batch | None = None) -> torch.Tensor:
        task = cross_entropy(model(x), y)
        return task + self.penalty(model) if self.terms else task

    def after_bucket(self, model: nn.Module, batches: BatchesFactory) -> None:
        fisher = fisher_diagonal(model, batches(), self.all_reduce)
        anchor = {n: p.detach().float() for n, p in named_trainable(model)}
        term = {"fisher": clone_tensors(fisher), "anchor": clone_tensors(anchor)}
        if self.mode == "online" and self.terms:
            old = self.terms[0]["fisher"]
            term["fisher"] = {n: f + self.decay * old[n] if n in old else f
                              for n, f in term["fisher"].items()}
        self.terms = [term] if self.mode == "online" else [*self.terms, term]
        self._cache = None
        super().after_bucket(model, batches)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mode": self.mode,
                "terms": [{k: clone_tensors(v) for k, v in t.items()} for t in self.terms]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if state["mode"] != self.mode:
            raise ValueError(f"the state is of EWC mode {state['mode']!r}, this strategy "
                             f"{self.mode!r}")
        self.terms = [{k: clone_tensors(v) for k, v in t.items()} for t in state["terms"]]
        self._cache = None
