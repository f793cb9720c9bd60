"""Replay a worker's data shard from memory after its first pass (pure torch).

Ray Data pays a fixed cost each time an epoch's streaming execution starts (read tasks,
transforms, the split coordinator). For a dataset whose per-worker shard is small and
whose rows do not change between epochs (JIGSAWS windows; evaluation images), that cost
dominates a fast model's epoch. :class:`BatchCache` streams the first epoch as usual,
keeps the rows it saw, and serves later epochs from memory, reshuffled per epoch with a
seeded permutation over the whole shard (a better shuffle than a local buffer). Shards
larger than ``max_bytes`` are never cached: they keep streaming every epoch.

Do not cache training data whose transform is random per epoch (image augmentation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

Batch = dict[str, torch.Tensor]


class BatchCache:
    """First pass from ``stream()``, later passes from memory.

    Args:
        max_bytes: Stop caching (and keep streaming) once the shard exceeds this size.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._columns: dict[str, torch.Tensor] | None = None
        self._too_big = False

    @property
    def cached(self) -> bool:
        return self._columns is not None

    @property
    def rows(self) -> int:
        if not self._columns:
            return 0
        return next(iter(self._columns.values())).shape[0]

    def epoch(self, stream: Callable[[], Iterable[Batch]], batch_size: int,
              shuffle_seed: int | None = None, drop_last: bool = False,
              agree: Callable[[bool], bool] | None = None) -> Iterator[Batch]:
        """Batches of one epoch: streamed (and recorded) the first time, then replayed.

        ``stream`` is only called when the cache cannot serve the epoch. A replayed epoch
        yields the same rows as the first in a new order (``shuffle_seed``) or in the
        recorded order (None), cut into ``batch_size`` batches. A first pass of no rows is
        cached too (an empty shard stays empty).

        ``agree`` makes the workers of a split dataset decide together: called once after
        the first pass with "this shard is too big to cache", it returns whether any
        worker's is (an all-reduce). A streaming split must be read by all its workers in
        each epoch, so one worker replaying while another streams would leave the streamer
        waiting for the others forever.
        """
        if self._columns is not None:
            yield from self._replay(batch_size, shuffle_seed, drop_last)
            return
        if self._too_big:
            yield from stream()
            return
        parts: list[Batch] = []
        size = 0
        for batch in stream():
            if not self._too_big:
                size += sum(t.numel() * t.element_size() for t in batch.values())
                if size > self.max_bytes:
                    self._too_big = True
                    parts = []
                else:
                    parts.append({k: v.detach().to("cpu", copy=True) for k, v in batch.items()})
            yield batch
        # Reached only when the consumer read the whole epoch (an early stop closes the
        # generator at the yield above), so a partial pass is never replayed.
        if agree is not None:
            self._too_big = agree(self._too_big)
        if not self._too_big:
            self._columns = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} \
                if parts else {}

    def _replay(self, batch_size: int, shuffle_seed: int | None, drop_last: bool
                ) -> Iterator[Batch]:
        assert self._columns is not None
        n = self.rows
        if n == 0:
            return
        if shuffle_seed is None:
            order = torch.arange(n)
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed))
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield {k: v[idx] for k, v in self._columns.items()}
