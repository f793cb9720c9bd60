"""A worker's batches, epoch by epoch, from its shard of a dataset.

A *shard* is anything with Ray Data's ``DataIterator.iter_torch_batches`` signature: the
iterator Ray Train hands each worker, or :class:`InMemoryShard` (tests, plain runs). The
engine never imports Ray; the runtime passes its iterators in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import torch

from raylab.engine.batch_cache import BatchCache
from raylab.engine.batching import shuffle_seed

Batch = dict[str, torch.Tensor]


#: Turns a batch of numpy columns into what the task steps on. Rows of different sizes
#: (a detection image's boxes and masks) cannot become one tensor per column; a task
#: with such rows passes its own (e.g. keeping them as per-row arrays).
Collate = Callable[[dict[str, Any]], Any]


class Shard(Protocol):
    def iter_torch_batches(self, *, batch_size: int, drop_last: bool = False,
                           local_shuffle_buffer_size: int | None = None,
                           local_shuffle_seed: int | None = None,
                           collate_fn: Collate | None = None) -> Any: ...


def _collate_kwargs(collate_fn: Collate | None) -> dict[str, Any]:
    """Pass ``collate_fn`` only when set: a shard written before it existed still works."""
    return {} if collate_fn is None else {"collate_fn": collate_fn}


#: ``agree(flag) -> bool``: whether any worker's flag is set (an all-reduce); see
#: :meth:`raylab.engine.batch_cache.BatchCache.epoch`. None: this worker decides alone.
Agree = Callable[[bool], bool] | None


class EpochBatches:
    """Training batches of a shard, shuffled anew every epoch with :func:`shuffle_seed`.

    Args:
        shard: This worker's shard.
        batch_size: Rows per batch on this worker.
        seed, rank: Make the shuffle seed (with the epoch).
        shuffle_buffer: Rows in the local shuffle buffer (0: stream order).
        drop_last: Drop a short last batch (every worker then has the same number of
            steps, which data-parallel training needs).
        cache_bytes: Replay the first epoch's rows from memory, reshuffled, when they fit
            (0: stream every epoch). Only for rows that do not change between epochs.
        agree: How the workers sharing the dataset agree on caching it (see
            :meth:`raylab.engine.context.WorkerContext.any_worker`).
        collate_fn: Builds each batch from numpy columns (see :data:`Collate`); None:
            one tensor per column. Batches it builds are never cached.
    """

    def __init__(self, shard: Shard, batch_size: int, *, seed: int, rank: int,
                 shuffle_buffer: int = 0, drop_last: bool = False,
                 cache_bytes: int = 0, agree: Agree = None,
                 collate_fn: Collate | None = None) -> None:
        self.shard = shard
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.shuffle_buffer = shuffle_buffer
        self.drop_last = drop_last
        self.agree = agree
        self.collate_fn = collate_fn
        self.cache = BatchCache(cache_bytes) if cache_bytes and collate_fn is None else None

    def epoch(self, epoch: int) -> Iterator[Batch]:
        seed = shuffle_seed(self.seed, epoch, self.rank)

        def stream() -> Any:
            return self.shard.iter_torch_batches(
                batch_size=self.batch_size, drop_last=self.drop_last,
                local_shuffle_buffer_size=self.shuffle_buffer or None,
                local_shuffle_seed=seed, **_collate_kwargs(self.collate_fn))

        if self.cache is None:
            return iter(stream())
        return self.cache.epoch(stream, self.batch_size, shuffle_seed=seed,
                                drop_last=self.drop_last, agree=self.agree)


class EvalBatches:
    """Evaluation batches of a shard in a fixed order, kept in memory after the first pass
    when they fit in ``cache_bytes`` (evaluation rows are the same every epoch).

    ``agree``: as for :class:`EpochBatches`; required when the dataset is split between
    workers (an evaluation split may give one worker many more rows than another, or
    none), None for a dataset one worker reads whole.
    """

    def __init__(self, shard: Shard, batch_size: int = 256, cache_bytes: int = 0,
                 agree: Agree = None, collate_fn: Collate | None = None) -> None:
        self.shard = shard
        self.batch_size = batch_size
        self.agree = agree
        self.collate_fn = collate_fn
        self.cache = BatchCache(cache_bytes) if cache_bytes and collate_fn is None else None

    def __call__(self) -> Iterator[Batch]:
        def stream() -> Any:
            return self.shard.iter_torch_batches(batch_size=self.batch_size,
                                                 **_collate_kwargs(self.collate_fn))

        if self.cache is None:
            return iter(stream())
        return self.cache.epoch(stream, self.batch_size, agree=self.agree)


class InMemoryShard:
    """A shard held as column tensors; what a test or a plain script hands the engine.

    ``split="train"``: ``rank``/``world_size`` take every ``world_size``-th row of each
    global batch, so that ``world_size`` workers together see exactly the batches one
    worker would see with ``world_size`` times the batch size, in the same order (the
    property the data-parallel tests compare). The global order is shuffled per epoch from
    ``local_shuffle_seed`` minus the rank term, i.e. the same on every rank.

    ``split="eval"``: the rows are dealt out round-robin, in order: each row to exactly one
    worker, however many rows and workers there are.
    """

    def __init__(self, columns: Mapping[str, torch.Tensor], rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, split: str = "train") -> None:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns of different lengths: {sorted(lengths)}")
        self.columns = dict(columns)
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.split = split
        self.rows = lengths.pop()

    def iter_torch_batches(self, *, batch_size: int, drop_last: bool = False,
                           local_shuffle_buffer_size: int | None = None,
                           local_shuffle_seed: int | None = None,
                           collate_fn: Collate | None = None, **_: Any) -> Iterator[Any]:
        batches = self._batches(batch_size, drop_last, local_shuffle_buffer_size,
                                local_shuffle_seed)
        if collate_fn is None:
            return batches
        # As Ray Data: the collate function receives numpy columns.
        return (collate_fn({k: _numpy(v) for k, v in b.items()}) for b in batches)

    def _batches(self, batch_size: int, drop_last: bool, local_shuffle_buffer_size: int | None,
                 local_shuffle_seed: int | None) -> Iterator[Batch]:
        if self.shuffle and local_shuffle_buffer_size and local_shuffle_seed is not None:
            epoch_seed = local_shuffle_seed - self.rank  # the same permutation on every rank
            g = torch.Generator().manual_seed(epoch_seed)
            order = torch.randperm(self.rows, generator=g)
        else:
            order = torch.arange(self.rows)
        if self.split == "eval":  # every row exactly once, dealt out round-robin
            mine = order[self.rank::self.world_size]
            for start in range(0, len(mine), batch_size):
                idx = mine[start:start + batch_size]
                yield {k: _take(v, idx) for k, v in self.columns.items()}
            return
        global_batch = batch_size * self.world_size
        stop = self.rows - self.rows % global_batch if drop_last else self.rows
        for start in range(0, stop, global_batch):
            idx = order[start:start + global_batch][self.rank::self.world_size]
            yield {k: _take(v, idx) for k, v in self.columns.items()}


def _take(column: Any, idx: torch.Tensor) -> Any:
    """Rows ``idx`` of a tensor or of a numpy array (e.g. an object array of per-row
    arrays, which no tensor holds)."""
    return column[idx] if isinstance(column, torch.Tensor) else column[idx.numpy()]


def _numpy(column: Any) -> Any:
    return column.numpy() if isinstance(column, torch.Tensor) else column
