"""The strategy interface shared by every continual-learning method (pure torch, no Ray).

A strategy is a small object with a few hooks that :func:`raylab.continual.loop.train_bucket`
calls, after avalanche's base loop plus plugins (``avalanche/core.py``), with far fewer hooks:

1. ``before_bucket(model, bucket)``: once, after ``model.train()``, before the first step.
2. per step: ``loss = strategy.loss(model, x, y, replay)`` (under autocast), then
   ``loss.backward()``, then ``after_backward(model)`` (gradients unscaled, before
   ``optimizer.step()``).
3. ``after_bucket(model, batches)``: once at the end; ``batches()`` returns a fresh iterable
   over the bucket (EWC's Fisher pass).

Replay rows come from outside: the loop asks ``replay_size(batch_size)`` and, when it is
positive, calls the caller's ``replay(n)`` for that many rows from the buffer and hands them
to :meth:`Strategy.loss`. Buffers hold row ids, so the caller (a worker that fetched the rows
by id) supplies the tensors. Three flags tell the caller what else to do:
``buffer_kind`` (which buffer to keep, if any), ``trains_on_buffer`` (train on the buffer's
rows, not the bucket's: GDumb) and ``from_scratch`` (the strategy re-initialises the model in
``before_bucket``; the loop clears the optimizer state). The caller adds bucket ``t`` to the
buffer after training on it, or before when ``trains_on_buffer``.

``state_dict()`` holds only tensors, numbers, strings, lists and dicts, so it is stored in
a checkpoint and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from raylab.engine.checkpoint import unwrap_model as unwrap  # re-exported to strategies
from raylab.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]
BatchesFactory = Callable[[], Iterable[Any]]
AllReduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Bucket:
    """What a strategy is told about the bucket it is about to train on.

    Attributes:
        index: Position in the stream (0-based).
        class_counts: Training rows per class in this bucket (CWR* needs them; the actor
            knows the labels), or None.
    """

    index: int
    class_counts: Mapping[int, int] | None = field(default=None)

    @classmethod
    def from_labels(cls, index: int, labels: Any) -> Bucket:
        """A bucket whose class counts are tallied from its labels (list, array, tensor)."""
        values = torch.as_tensor(labels).reshape(-1).long()
        classes, counts = torch.unique(values, return_counts=True)
        return cls(index, {int(c): int(n) for c, n in zip(classes, counts)})


def unpack_batch(batch: Any, device: torch.device | str) -> Batch:
    """``(x, y)`` on ``device`` from a ``(x, y)`` pair or a ``{"image", "label"}`` mapping
    (Ray Data's batch form); numpy arrays are converted, labels become int64."""
    if isinstance(batch, Mapping):
        if "image" not in batch or "label" not in batch:
            raise ValueError(f"a batch mapping needs 'image' and 'label' keys, got "
                             f"{sorted(batch)}")
        x, y = batch["image"], batch["label"]
    else:
        x, y = batch
    x = torch.as_tensor(x).to(device, non_blocking=True)
    y = torch.as_tensor(y).reshape(-1).to(device, dtype=torch.long, non_blocking=True)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"a batch has {x.shape[0]} inputs but {y.shape[0]} labels")
    return x, y


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free model)."""
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device


def named_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the unwrapped model's parameters that require grad."""
    return [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, computed in float32 (also under autocast)."""
    return F.cross_entropy(logits.float(), y)


def check_number(name: str, value: Any, low: float = 0.0, *, strict: bool = False,
                 high: float | None = None) -> float:
    """``value`` as a float in ``[low, high]`` (``(low, high]`` if strict) or ConfigError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    ok = number > low if strict else number >= low
    if high is not None:
        ok = ok and number <= high
    if not ok:
        bound = f"{'(' if strict else '['}{low}, {high if high is not None else 'inf'}"
        raise ConfigError(f"{name} must be in {bound}{']' if high is not None else ')'}, "
                          f"got {value!r}")
    return number


def clone_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies (for state dicts)."""
    return {k: v.detach().cpu().clone() for k, v in tensors.items()}


class Strategy:
    """Plain fine-tuning on the current batch; the base of every strategy.

    Subclasses override the hooks they need and extend :meth:`state_dict` /
    :meth:`load_state_dict` through ``super()``. ``all_reduce`` (None, or a callable that
    sums a tensor over workers, e.g. a worker context's ``all_reduce_sum``) is set by the
    worker when several replicas train together; strategies that compute statistics outside
    the DDP-synchronised backward (EWC's Fisher, AGEM's reference gradient) use it so that
    every replica stays identical.
    """

    name: ClassVar[str] = "base"
    #: The strategy's row name in the CLEAR paper's Table 1.
    table_name: ClassVar[str] = "Fine-tuning"
    #: Config keys of the CLEAR method -> this strategy's keyword arguments (``si_c`` ->
    #: ``c``); only the chosen strategy's keys are passed on.
    config_knobs: ClassVar[dict[str, str]] = {}
    default_buffer: ClassVar[str | None] = None
    from_scratch: ClassVar[bool] = False
    trains_on_buffer: ClassVar[bool] = False

    def __init__(self) -> None:
        self.buckets_seen = 0
        self.all_reduce: AllReduce | None = None

    @property
    def buffer_kind(self) -> str | None:
        """The replay buffer this strategy needs (a ``BUFFERS`` key), or None for none."""
        return self.default_buffer

    def replay_size(self, batch_size: int) -> int:
        """Replay rows wanted alongside a batch of ``batch_size`` (0: none)."""
        return 0

    def before_bucket(self, model: nn.Module, bucket: Bucket) -> None:
        """Called once before training on ``bucket``."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             replay: Batch | None = None) -> torch.Tensor:
        """The training loss of one batch (task loss plus the strategy's terms)."""
        return cross_entropy(model(x), y)

    def after_backward(self, model: nn.Module) -> None:
        """Called after ``loss.backward()``, before ``optimizer.step()``."""

    def after_bucket(self, model: nn.Module, batches: BatchesFactory) -> None:
        """Called once after training on a bucket; ``batches()`` iterates the bucket again."""
        self.buckets_seen += 1

    def state_dict(self) -> dict[str, Any]:
        """What the strategy has learned so far (not its hyper-parameters)."""
        return {"strategy": self.name, "buckets_seen": self.buckets_seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            ValueError: The state belongs to another strategy.
        """
        if state.get("strategy") != self.name:
            raise ValueError(f"cannot load a {state.get('strategy')!r} strategy state into "
                             f"{self.name!r}")
        self.buckets_seen = int(state["buckets_seen"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(buckets_seen={self.buckets_seen})"
