"""What a learner needs per bucket of the stream: settings, batches, replay, evaluation.

Pure torch (no Ray). The rows come from an :class:`~raylab.continual.rows.ImageRows` or
:class:`~raylab.continual.rows.FeatureRows` (fetched by row id); ``client`` is anything with
the :class:`~raylab.continual.stream.StreamService` methods (the service itself, or the
stream actor behind a plain proxy). The CLEAR task (``raylab.methods.clear.task``) puts
these together on the engine's loop, one bucket per epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from raylab.continual.loop import count_correct
from raylab.transforms.batch_aug import pad_crop_flip

log = logging.getLogger("raylab")

ReduceSum = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BucketSettings:
    """How each bucket is trained.

    Attributes:
        epochs: Passes over the bucket's training rows.
        batch_size: Rows per step over all workers (each worker takes its share).
        lr, momentum, weight_decay: SGD, a new optimizer per bucket.
        precision: "fp32", "bf16" or "fp16".
        padding: Random-crop padding of image rows (-1: no crop and no flip); feature
            rows are never augmented.
        seed: Seeds the shuffling, augmentation and replay draws of every bucket.
        eval_batch_size: Rows per evaluation batch.
    """

    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    precision: str = "fp32"
    padding: int = 4
    seed: int = 0
    eval_batch_size: int = 512


class Prepare:
    """Rows as the model sees them: uint8 images are augmented (training) and normalised
    on the device; float rows (features) pass through."""

    def __init__(self, device: torch.device, padding: int) -> None:
        from raylab.transforms.images import DeviceNormalize

        self.device = device
        self.padding = padding
        self.normalize = DeviceNormalize()

    def __call__(self, x: torch.Tensor, training: bool, generator: torch.Generator | None
                 ) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if x.dtype != torch.uint8:
            return x.float()
        if training and self.padding >= 0:
            x = pad_crop_flip(x, self.padding, generator=generator)
        return self.normalize(x)


def _generator(*key: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


def train_batches(rows: Any, ids: Sequence[int], per_worker: int, prepare: Prepare,
                  seed: int, bucket: int, rank: int) -> Callable[[], Any]:
    """A factory of shuffled, augmented batches: call ``k`` draws epoch ``k``'s order."""
    calls = [0]

    def batches() -> Any:
        epoch = calls[0]
        calls[0] += 1
        gen = _generator(seed, bucket, epoch, rank)
        order = torch.randperm(len(ids), generator=gen).numpy()
        # ceil(n / batch) batches of nearly equal size (they differ by at most one row),
        # never a 1-row tail batch, which batch norm cannot train on.
        for chunk in np.array_split(order, -(-len(order) // per_worker)):
            x, y = rows.fetch([ids[k] for k in chunk.tolist()])
            yield prepare(x, True, gen), y

    return batches


def replay_sampler(rows: Any, ids: Sequence[int], prepare: Prepare, seed: int, bucket: int,
                   rank: int) -> Callable[[int], Any] | None:
    """``replay(n)``: ``n`` buffer rows drawn uniformly without replacement per step."""
    if not ids:
        return None
    gen = _generator(seed, bucket, 10_007, rank)
    pool = list(ids)

    def replay(n: int) -> Any:
        pick = torch.randperm(len(pool), generator=gen)[:n].tolist()
        x, y = rows.fetch([pool[k] for k in pick])
        return prepare(x, True, gen), y

    return replay


@torch.no_grad()
def evaluate_buckets(model: nn.Module, rows: Any, client: Any, buckets: Sequence[int],
                     prepare: Prepare, settings: BucketSettings, device: torch.device,
                     rank: int = 0, world_size: int = 1, reduce_sum: ReduceSum | None = None
                     ) -> tuple[dict[int, float], int]:
    """Accuracy on each bucket's test rows (every worker evaluates its part; summed), and
    how many rows were scored over all workers and buckets."""
    counts = torch.zeros(len(buckets), 2, dtype=torch.float64)
    for k, b in enumerate(buckets):
        ids = client.test_ids(b, rank, world_size)
        batches = (_eval_batch(rows, ids[i:i + settings.eval_batch_size], prepare)
                   for i in range(0, len(ids), settings.eval_batch_size))
        correct, n = count_correct(model, batches, device, settings.precision)
        counts[k] = torch.tensor([correct, n], dtype=torch.float64)
    if reduce_sum is not None and world_size > 1:
        counts = reduce_sum(counts)
    out = {}
    for k, b in enumerate(buckets):
        correct, n = counts[k].tolist()
        if n == 0:
            raise ValueError(f"bucket {b} has no test rows")
        out[int(b)] = correct / n
    return out, int(counts[:, 1].sum().item())


def _eval_batch(rows: Any, ids: Sequence[int], prepare: Prepare) -> tuple[torch.Tensor, ...]:
    x, y = rows.fetch(ids)
    return prepare(x, False, None), y


__all__ = ["BucketSettings", "Prepare", "evaluate_buckets", "replay_sampler", "train_batches"]
