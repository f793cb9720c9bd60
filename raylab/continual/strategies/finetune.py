"""Fine-tuning, with or without replay, and experience replay (ER).

Both train on the cross-entropy of the current batch concatenated with ``n`` replay rows,
``n = round(replay_ratio * batch_size)``, as one batch (the mean over all rows), like
avalanche's ``ReplayDataLoader`` with equal current and memory mini-batches. Without replay
rows (the first bucket, or ``replay_ratio = 0``) it is plain fine-tuning.

The CLEAR table's "Finetuning (reservoir)" and "Finetuning (biased reservoir)" rows are
:class:`Finetune` with ``replay_ratio=1`` and a :class:`~raylab.continual.buffers.
ReservoirBuffer` / :class:`~raylab.continual.buffers.BiasedReservoirBuffer` updated after
each bucket (the CLEAR authors' ``CustomReplay`` plugin); their "ER" row is :class:`ER`
(avalanche ``Replay``, whose memory is experience-balanced; Rolnick et al. 2019, Chaudhry
et al. 2019).
"""

from __future__ import annotations

import torch
from torch import nn

from raylab.continual.strategies.base import Batch, Strategy, check_number, cross_entropy


class Finetune(Strategy):
    """Plain fine-tuning; mixes in replay rows when ``replay_ratio > 0``.

    Args:
        replay_ratio: Replay rows per current row (0: plain fine-tuning).
    """

    name = "finetune"
    table_name = "Finetuning"
    config_knobs = {"replay_ratio": "replay_ratio"}
    default_buffer = "reservoir"  # only used with replay_ratio > 0 (see buffer_kind)

    def __init__(self, replay_ratio: float = 0.0) -> None:
        super().__init__()
        self.replay_ratio = check_number("replay_ratio", replay_ratio)

    @property
    def buffer_kind(self) -> str | None:
        return self.default_buffer if self.replay_ratio > 0 else None

    def replay_size(self, batch_size: int) -> int:
        return int(round(self.replay_ratio * batch_size))

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             replay: Batch | None = None) -> torch.Tensor:
        if replay is not None and replay[1].numel():
            x = torch.cat((x, replay[0].to(x.dtype)))
            y = torch.cat((y, replay[1]))
        return cross_entropy(model(x), y)


class ER(Finetune):
    """Experience replay: every batch is extended by as many buffer rows (ratio 1), from an
    experience-balanced memory (avalanche ``Replay``'s default); the "Finetuning
    (reservoir)" row differs only in its buffer (a uniform reservoir)."""

    name = "er"
    table_name = "ER"
    default_buffer = "experience_balanced"

    def __init__(self, replay_ratio: float = 1.0) -> None:
        super().__init__(replay_ratio)
