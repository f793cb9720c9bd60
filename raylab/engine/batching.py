"""How a global batch is shared between workers, and how each epoch is shuffled.

Every method states its batch size globally (all workers, after gradient accumulation),
so that 2 workers train the same problem as 1. :func:`per_worker_batch` is the one place
that splits it; the CLI calls it before Ray starts, so ``batch_size < workers`` is a
config error there, not a crash inside a worker (or, worse, batches of 0 rows).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from raylab.errors import ConfigError

T = TypeVar("T")


def per_worker_batch(global_batch: int, world_size: int, grad_accum: int = 1,
                     key: str = "optim.batch_size") -> int:
    """Rows per worker and micro-batch, so that world x accum x micro <= the global batch.

    The global batch should be a multiple of ``world_size * grad_accum``; when it is not,
    each worker takes the floor (the remainder is not trained on, as before).

    Raises:
        ConfigError: naming ``key``, when there are fewer rows than workers x accumulation
            steps (a worker would get batches of 0 rows).
    """
    if world_size < 1 or grad_accum < 1:
        raise ValueError(f"world_size and grad_accum must be >= 1, got {world_size}, "
                         f"{grad_accum}")
    shares = world_size * grad_accum
    if global_batch < shares:
        accum = f" x grad_accum {grad_accum}" if grad_accum > 1 else ""
        raise ConfigError(f"config key {key!r}: {global_batch} is smaller than "
                          f"{world_size} worker(s){accum} = {shares}; each worker needs at "
                          f"least one row per step: use {key}>={shares} or fewer workers")
    return global_batch // shares


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """The shuffle seed of one worker's epoch: new every epoch, different per rank, the
    same when a run resumes (it depends on nothing but its arguments)."""
    return seed * 100_003 + epoch * 101 + rank


def with_last(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """``(item, is_last)`` pairs: the loop looks one item ahead so that a step knows it is
    the epoch's last (gradient accumulation must then synchronise and step)."""
    it = iter(items)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield current, False
        current = following
    yield current, True


def batch_rows(batch: Any) -> int:
    """Rows in a batch: a mapping of column tensors or a tuple whose first item is one."""
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return int(first.shape[0])
