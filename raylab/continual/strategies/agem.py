"""Averaged Gradient Episodic Memory (A-GEM).

Chaudhry et al., "Efficient Lifelong Learning with A-GEM", ICLR 2019, eq. 11; checked
against avalanche's ``AGEMPlugin`` (``avalanche/training/plugins/agem.py``). Each step the
reference gradient ``g_ref`` is the gradient of the mean cross-entropy on ``sample_size``
rows drawn from the episodic memory (the replay buffer; the caller supplies the rows through
``replay``). If the batch gradient ``g`` points against it (``g . g_ref < 0``) it is
projected: ``g <- g - (g . g_ref / g_ref . g_ref) g_ref``, which makes ``g . g_ref = 0``;
otherwise ``g`` is used as is.

``g`` and ``g_ref`` are the whole model's gradients flattened into one vector, as in the
paper (older avalanche releases project each parameter tensor separately). ``g_ref`` is
computed on the unwrapped model with ``torch.autograd.grad`` (``.grad`` is untouched; the
reference forward does update BatchNorm running statistics, as in avalanche); with several
workers it is averaged over them through ``all_reduce`` so that every replica projects
alike. Default ``sample_size=256``; the CLEAR authors used the whole buffer.
"""

from __future__ import annotations

import torch
from torch import nn

from raylab.continual.strategies.base import (
    Batch,
    Strategy,
    cross_entropy,
    named_trainable,
    unwrap,
)
from raylab.errors import ConfigError


def project_gradient(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """A-GEM's projection of a flat gradient: ``g - (g.g_ref / g_ref.g_ref) g_ref`` when
    ``g.g_ref < 0``, else ``g`` unchanged (also when ``g_ref`` is zero)."""
    dot = torch.dot(g, g_ref)
    ref_sq = torch.dot(g_ref, g_ref)
    if dot >= 0 or ref_sq == 0:
        return g
    return g - (dot / ref_sq) * g_ref


def _flat(tensors: list[torch.Tensor | None], like: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p, dtype=torch.float32) if t is None else t.float())
                      .reshape(-1) for t, p in zip(tensors, like)])


class AGEM(Strategy):
    """Project each step's gradient so that the loss on memory rows does not increase.

    Args:
        sample_size: Memory rows per step for the reference gradient (>= 1).
    """

    name = "agem"
    table_name = "AGEM"
    config_knobs = {"agem_sample_size": "sample_size"}
    default_buffer = "reservoir"

    def __init__(self, sample_size: int = 256) -> None:
        super().__init__()
        if int(sample_size) != sample_size or sample_size < 1:
            raise ConfigError(f"AGEM sample_size must be an integer >= 1, got {sample_size!r}")
        self.sample_size = int(sample_size)
        self._g_ref: torch.Tensor | None = None
        self.projected_steps = 0

    def replay_size(self, batch_size: int) -> int:
        return self.sample_size

    def reference_gradient(self, model: nn.Module, replay: Batch) -> torch.Tensor:
        """The flat gradient of the mean cross-entropy on ``replay`` (averaged over workers
        when ``all_reduce`` is set)."""
        net = unwrap(model)
        params = [p for _, p in named_trainable(net)]
        x, y = replay
        grads = torch.autograd.grad(cross_entropy(net(x), y), params, allow_unused=True)
        flat = _flat(list(grads), params)
        if self.all_reduce is not None:
            packed = self.all_reduce(torch.cat((flat, flat.new_ones(1))))
            flat = packed[:-1] / packed[-1]
        return flat

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             replay: Batch | None = None) -> torch.Tensor:
        has_memory = replay is not None and replay[1].numel() > 0
        self._g_ref = self.reference_gradient(model, replay) if has_memory else None
        return cross_entropy(model(x), y)

    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        if self._g_ref is None:
            return
        params = [p for _, p in named_trainable(model)]
        g = _flat([p.grad for p in params], params)
        new = project_gradient(g, self._g_ref)
        self._g_ref = None
        if new is g:
            return
        self.projected_steps += 1
        for p, chunk in zip(params, new.split([p.numel() for p in params])):
            p.grad = chunk.view_as(p).to(p.dtype)
