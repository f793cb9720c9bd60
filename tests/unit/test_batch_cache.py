"""BatchCache: stream once, replay the same rows from memory, never replay a partial pass."""

from __future__ import annotations

import torch

from raylab.engine.batch_cache import BatchCache


def _source(n: int, batch: int, calls: list[int]):
    def stream():
        calls.append(1)
        for start in range(0, n, batch):
            idx = torch.arange(start, min(start + batch, n))
            yield {"x": idx.float()[:, None].repeat(1, 3), "y": idx}
    return stream


def test_first_pass_streams_then_replays_same_rows_shuffled() -> None:
    calls: list[int] = []
    cache = BatchCache()
    first = list(cache.epoch(_source(10, 4, calls), 4, shuffle_seed=1))
    assert [b["y"].tolist() for b in first] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert cache.cached and cache.rows == 10
    second = list(cache.epoch(_source(10, 4, calls), 4, shuffle_seed=1))
    third = list(cache.epoch(_source(10, 4, calls), 4, shuffle_seed=2))
    assert len(calls) == 1  # the source ran once
    for epoch in (second, third):
        ys = torch.cat([b["y"] for b in epoch])
        assert sorted(ys.tolist()) == list(range(10))
        xs = torch.cat([b["x"] for b in epoch])
        assert torch.equal(xs[:, 0].long(), ys)  # columns stay aligned
    assert [len(b["y"]) for b in second] == [4, 4, 2]
    assert torch.cat([b["y"] for b in second]).tolist() != \
        torch.cat([b["y"] for b in third]).tolist()


def test_replay_in_recorded_order_and_drop_last() -> None:
    cache = BatchCache()
    list(cache.epoch(_source(10, 3, []), 3))
    assert torch.cat([b["y"] for b in cache.epoch(None, 5)]).tolist() == list(range(10))
    assert [len(b["y"]) for b in cache.epoch(None, 4, drop_last=True)] == [4, 4]


def test_a_partial_pass_is_not_cached() -> None:
    calls: list[int] = []
    cache = BatchCache()
    for _ in zip(range(1), cache.epoch(_source(10, 4, calls), 4)):
        pass  # consumer stops after one batch
    assert not cache.cached
    list(cache.epoch(_source(10, 4, calls), 4))
    assert len(calls) == 2 and cache.cached


def test_shards_over_the_limit_keep_streaming() -> None:
    calls: list[int] = []
    cache = BatchCache(max_bytes=100)  # 10 rows x (3 floats + 1 long) = 200 bytes
    for _ in range(3):
        assert sum(len(b["y"]) for b in cache.epoch(_source(10, 4, calls), 4)) == 10
    assert len(calls) == 3 and not cache.cached


def test_an_empty_first_pass_is_cached_too() -> None:
    """An uneven evaluation split may give a worker no rows; it must replay (nothing) like
    the others, not stream again: a streaming split waits for every worker each epoch."""
    calls = []

    def stream() -> list:
        calls.append(1)
        return []

    cache = BatchCache(1 << 20)
    assert list(cache.epoch(stream, 4)) == [] and cache.cached
    assert list(cache.epoch(stream, 4)) == []
    assert calls == [1]


def test_workers_agree_on_caching() -> None:
    """One worker's shard is too big: ``agree`` (an all-reduce) makes every worker keep
    streaming, so no worker replays while another waits for it at the split."""
    small = [{"x": torch.zeros(2, 2)}]
    says = []

    def anyone_too_big(flag: bool) -> bool:
        says.append(flag)
        return True  # another worker's shard did not fit

    cache = BatchCache(1 << 20)
    assert len(list(cache.epoch(lambda: small, 2, agree=anyone_too_big))) == 1
    assert says == [False] and not cache.cached
    streamed = []
    list(cache.epoch(lambda: streamed.append(1) or small, 2, agree=anyone_too_big))
    assert streamed == [1]  # streams again, and is not asked again
    assert says == [False]
