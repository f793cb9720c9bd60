"""The one training loop every continual-learning strategy runs on (pure torch, no Ray).

A plain script calls :func:`train_bucket` once per bucket with its shard of the bucket's
batches, then :func:`evaluate` / :func:`count_correct` on every test bucket to fill a row of
the accuracy matrix; the CLEAR task drives the same :class:`BucketTrainer` from the engine's
epoch loop. The strategy's hooks are described in
:mod:`raylab.continual.strategies.base`; replay rows come in through ``replay``, a callable
the caller builds from the buffer's row ids.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from raylab.continual.strategies.base import Batch, Bucket, Strategy, unpack_batch
from raylab.engine.precision import autocast

ReplayFn = Callable[[int], Any]
"""``replay(n)`` returns ``n`` buffer rows as ``(x, y)`` (or ``{"image", "label"}``), or
None when the buffer is still empty."""

PRECISIONS = ("fp32", "bf16", "fp16")


def _factory(batches: Iterable[Any] | Callable[[], Iterable[Any]]) -> Callable[[], Iterable[Any]]:
    if callable(batches):
        return batches
    if iter(batches) is batches:
        raise ValueError("batches is a one-shot iterator; pass a list (or another re-iterable) "
                         "or a zero-argument callable returning a fresh iterable, since "
                         "several epochs and the strategy's after_bucket iterate it again")
    return lambda: batches


class BucketTrainer:
    """One bucket's training with a strategy, one step at a time.

    Construction does what precedes the first step: ``model.train()``,
    ``strategy.before_bucket(model, bucket)``, clearing the optimizer state when
    ``strategy.from_scratch``. :meth:`step` is one step (below); :meth:`finish` calls
    ``strategy.after_bucket(model, batches)``. :func:`train_bucket` runs all three over a
    bucket's epochs; the CLEAR task (``raylab.methods.clear.task``) calls them from the
    engine's loop.

    One step: ``zero_grad``, ``loss = strategy.loss(model, x, y, replay_rows)`` under
    autocast, ``backward`` (scaled for fp16), unscale, ``strategy.after_backward(model)``,
    ``optimizer.step()``. ``replay_rows`` is ``replay(strategy.replay_size(len(y)))`` when
    that size is positive and ``replay`` is given, else None.
    """

    def __init__(self, model: nn.Module, strategy: Strategy, optimizer: torch.optim.Optimizer,
                 device: torch.device | str, precision: str = "fp32", *,
                 bucket: Bucket | None = None, replay: ReplayFn | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.model, self.strategy, self.optimizer = model, strategy, optimizer
        self.device = torch.device(device)
        self.precision = precision
        self.bucket = Bucket(strategy.buckets_seen) if bucket is None else bucket
        self.replay = replay
        self.steps = self.samples = self.replayed = 0
        model.train()
        strategy.before_bucket(model, self.bucket)
        if strategy.from_scratch:
            optimizer.state.clear()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")

    def step(self, batch: Any) -> tuple[float, int, int]:
        """One step on ``batch``; returns (loss, rows, replayed rows)."""
        x, y = unpack_batch(batch, self.device)
        rows = _replay_rows(self.strategy, self.replay, len(y), self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            loss = self.strategy.loss(self.model, x, y, rows)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        self.strategy.after_backward(self.model)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        replayed = 0 if rows is None else len(rows[1])
        self.steps += 1
        self.samples += len(y)
        self.replayed += replayed
        return float(loss.detach()), len(y), replayed

    def finish(self, batches: Callable[[], Iterable[Any]]) -> None:
        """After the bucket's last step: ``strategy.after_bucket(model, batches)``
        (``batches()`` returns a fresh pass over the bucket, e.g. for EWC's Fisher)."""
        if self.steps == 0:
            raise ValueError(f"bucket {self.bucket.index} yielded no batches")
        self.strategy.after_bucket(self.model, batches)


def train_bucket(
    model: nn.Module,
    strategy: Strategy,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    epochs: int = 1,
    precision: str = "fp32",
    *,
    bucket: Bucket | None = None,
    replay: ReplayFn | None = None,
) -> dict[str, Any]:
    """Train ``model`` on one bucket with ``strategy``'s hooks (a :class:`BucketTrainer`
    over ``epochs`` passes of ``batches``).

    Args:
        model: The model (possibly DDP-wrapped), already on ``device``.
        strategy: A :class:`~raylab.continual.strategies.base.Strategy`.
        batches: ``(x, y)`` pairs or ``{"image", "label"}`` mappings: a re-iterable (list)
            or a zero-argument callable returning a fresh iterable (e.g. a Ray Data
            ``iter_torch_batches`` call).
        optimizer: The optimizer over the model's parameters.
        device: Where the batches go.
        epochs: Passes over ``batches`` (>= 1).
        precision: "fp32", "bf16" or "fp16" (fp16 uses a GradScaler).
        bucket: Index and class counts of the bucket (CWR* needs the counts); None for
            ``Bucket(strategy.buckets_seen)``.
        replay: ``replay(n) -> (x, y) | None``, rows fetched from the buffer by id.

    Returns:
        ``{"loss": mean loss of the last epoch, "epoch_losses": [...], "steps",
        "samples", "replay_samples"}`` (JSON-able).

    Raises:
        ValueError: ``epochs`` < 1, an unknown precision, a one-shot iterator, an epoch
            without batches, or a non-finite loss.
    """
    if int(epochs) != epochs or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    factory = _factory(batches)
    trainer = BucketTrainer(model, strategy, optimizer, device, precision, bucket=bucket,
                            replay=replay)
    epoch_losses: list[float] = []
    for _ in range(int(epochs)):
        losses = [trainer.step(batch)[0] for batch in factory()]
        if not losses:
            raise ValueError(f"bucket {trainer.bucket.index} yielded no batches")
        epoch_losses.append(sum(losses) / len(losses))
        if not math.isfinite(epoch_losses[-1]):
            raise ValueError(f"the loss of bucket {trainer.bucket.index} is "
                             f"{epoch_losses[-1]}")
    trainer.finish(factory)
    return {"loss": epoch_losses[-1], "epoch_losses": epoch_losses, "steps": trainer.steps,
            "samples": trainer.samples, "replay_samples": trainer.replayed}


def _replay_rows(strategy: Strategy, replay: ReplayFn | None, batch_size: int,
                 device: torch.device) -> Batch | None:
    n = strategy.replay_size(batch_size)
    if n <= 0 or replay is None:
        return None
    rows = replay(n)
    return None if rows is None else unpack_batch(rows, device)


@torch.no_grad()
def count_correct(model: nn.Module, batches: Iterable[Any], device: torch.device | str,
                  precision: str = "fp32") -> tuple[int, int]:
    """``(correct top-1 predictions, rows)`` over ``batches`` in eval mode; workers sum
    these over their shards before dividing."""
    device = torch.device(device)
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    rows = 0
    for batch in batches:
        x, y = unpack_batch(batch, device)
        with autocast(device, precision):
            logits = model(x)
        correct += (logits.argmax(dim=1) == y).sum()
        rows += len(y)
    return int(correct), rows


def evaluate(model: nn.Module, batches: Iterable[Any], device: torch.device | str,
             precision: str = "fp32") -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of ``model`` on ``batches``.

    Raises:
        ValueError: ``batches`` is empty.
    """
    correct, rows = count_correct(model, batches, device, precision)
    if rows == 0:
        raise ValueError("evaluate() got no rows")
    return correct / rows
