"""One learner walking the stream: ask the stream for a bucket, train, evaluate, finish.

Pure torch (no Ray). ``client`` is anything with the :class:`~raylab.continual.stream.
StreamService` methods ``next_bucket``, ``test_ids`` and ``finish_bucket``: the service
itself (tests, benchmarks) or :class:`~raylab.continual.stream.ActorClient` around the
stream actor (Ray Train workers). The rows come from an
:class:`~raylab.continual.rows.ImageRows` or :class:`~raylab.continual.rows.FeatureRows`.

Order per bucket ``t`` (what makes a restart safe):

1. ``client.next_bucket(rank, world_size)``: this worker's shard of the training rows and
   the replay buffer's ids;
2. :func:`~raylab.continual.loop.train_bucket` with the strategy's hooks, a fresh optimizer
   (as avalanche builds one per experience);
3. evaluation on every labelled bucket's test rows; the per-bucket counts are summed over
   workers with one all-reduce, so every worker holds the same accuracies;
4. ``on_bucket(result)``: the caller reports and checkpoints (model, strategy state and the
   accuracies of ``t``), then all workers wait for each other (a collective);
5. ``client.finish_bucket(t, accuracies)`` from every worker: the first call records row
   ``R[t]`` and advances the cursor, the others are no-ops (the stream accepts an identical
   repeat).

A run restored from the checkpoint of step 4 passes ``resume`` = that bucket and its
accuracies: step 5 is repeated first (a no-op if it happened before the crash), so no
bucket is trained twice or skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from raylab.continual.loop import count_correct, train_bucket
from raylab.continual.strategies.base import Bucket, Strategy
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


def _train_batches(rows: Any, ids: Sequence[int], per_worker: int, prepare: Prepare,
                   seed: int, bucket: int, rank: int) -> Callable[[], list[tuple]]:
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


def _replay(rows: Any, ids: Sequence[int], prepare: Prepare, seed: int, bucket: int,
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
                     ) -> dict[int, float]:
    """Accuracy on each bucket's test rows (every worker evaluates its part; summed)."""
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
    return out


def _eval_batch(rows: Any, ids: Sequence[int], prepare: Prepare) -> tuple[torch.Tensor, ...]:
    x, y = rows.fetch(ids)
    return prepare(x, False, None), y


def run_stream(
    client: Any,
    rows: Any,
    model: nn.Module,
    strategy: Strategy,
    settings: BucketSettings,
    device: torch.device | str,
    *,
    rank: int = 0,
    world_size: int = 1,
    reduce_sum: ReduceSum | None = None,
    resume: Mapping[str, Any] | None = None,
    on_bucket: Callable[[dict[str, Any]], None] | None = None,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` through every remaining bucket of the stream (module docstring).

    Args:
        client: The stream (service or actor client).
        rows: Fetches rows by id (images or features).
        model: On ``device``; DDP-wrapped when ``world_size > 1``.
        strategy: The continual-learning strategy (its state is restored by the caller).
        settings: Epochs, batch, optimizer, augmentation.
        device: Where training runs.
        rank, world_size: This worker's place among the data-parallel workers.
        reduce_sum: Sums a tensor over workers (needed when ``world_size > 1``).
        resume: ``{"bucket", "accuracies"}`` saved by ``on_bucket`` before a restart.
        on_bucket: Called after each bucket with ``{"bucket", "index", "accuracies",
            "train": train_bucket's stats, "seconds"}``, before the stream is told.
        make_optimizer: A new optimizer for each bucket; default SGD from ``settings``.

    Returns:
        The ``on_bucket`` results of the buckets trained in this call.

    Raises:
        StreamError: ``resume`` names a bucket the stream cannot accept as finished (e.g.
            its state belongs to another run).
    """
    device = torch.device(device)
    if world_size > 1 and reduce_sum is None:
        raise ValueError("several workers need reduce_sum to agree on accuracies")
    strategy.all_reduce = reduce_sum if world_size > 1 else None
    make_optimizer = make_optimizer or (lambda m: torch.optim.SGD(
        [p for p in m.parameters() if p.requires_grad], lr=settings.lr,
        momentum=settings.momentum, weight_decay=settings.weight_decay))
    per_worker = max(1, settings.batch_size // world_size)
    prepare = Prepare(device, settings.padding)
    if resume is not None:
        _replay_finish(client, resume)
    results = []
    while True:
        info = client.next_bucket(rank, world_size)
        if info is None:
            return results
        t0 = time.perf_counter()
        t = int(info["bucket"])
        counts = {int(k): int(v) for k, v in info["class_counts"].items()}
        stats = train_bucket(
            model, strategy,
            _train_batches(rows, info["train_ids"], per_worker, prepare, settings.seed, t, rank),
            make_optimizer(model), device, settings.epochs, settings.precision,
            bucket=Bucket(int(info["index"]), counts),
            replay=_replay(rows, info["replay_ids"], prepare, settings.seed, t, rank))
        accuracies = evaluate_buckets(model, rows, client, info["eval_buckets"], prepare,
                                      settings, device, rank, world_size, reduce_sum)
        result = {"bucket": t, "index": int(info["index"]), "accuracies": accuracies,
                  "train": stats, "num_train": int(info["num_train"]),
                  "seconds": time.perf_counter() - t0}
        if on_bucket is not None:
            on_bucket(result)
        if world_size > 1:
            # A collective as a barrier: no worker tells the stream before every worker's
            # on_bucket returned, i.e. before rank 0's checkpoint is fully written (Ray
            # Train's report does not wait for the other ranks).
            reduce_sum(torch.zeros(1))
        client.finish_bucket(t, accuracies)
        results.append(result)


def _replay_finish(client: Any, resume: Mapping[str, Any]) -> None:
    """Tell the stream again that the checkpointed bucket is finished; check the cursor."""
    t = int(resume["bucket"])
    accuracies = {int(j): float(a) for j, a in resume["accuracies"].items()}
    out = client.finish_bucket(t, accuracies)
    log.info("resumed after bucket %d (%s)", t,
             "the stream had recorded it" if out.get("replayed") else "recorded it now")


__all__ = ["BucketSettings", "Prepare", "evaluate_buckets", "run_stream"]
