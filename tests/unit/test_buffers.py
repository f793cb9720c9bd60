"""Replay buffers of row ids: reservoir, biased reservoir and GDumb's class-balanced one."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from raylab.continual.buffers import (
    BUFFERS,
    BiasedReservoirBuffer,
    ClassBalancedBuffer,
    ReservoirBuffer,
    buffer_from_state,
    build_buffer,
)
from raylab.errors import ConfigError


def json_round_trip(state: dict) -> dict:
    return json.loads(json.dumps(state))


# --- reservoir -------------------------------------------------------------------------


def test_reservoir_fills_then_keeps_capacity() -> None:
    buf = ReservoirBuffer(5, seed=0)
    buf.add([10, 11, 12], [0, 1, 0])
    assert buf.ids().tolist() == [10, 11, 12] and buf.labels().tolist() == [0, 1, 0]
    buf.add(np.arange(13, 40), np.arange(13, 40) % 3)
    assert len(buf) == 5 and buf.seen == 30
    assert set(buf.ids().tolist()) <= set(range(10, 40))
    assert all(label == row % 3 for row, label in zip(buf.ids().tolist(),
                                                     buf.labels().tolist()) if row >= 13)


@pytest.mark.parametrize("chunks", [[50], [7, 13, 30], [1] * 12 + [38]])
def test_reservoir_inclusion_probability_is_capacity_over_n(chunks: list[int]) -> None:
    capacity, n, seeds = 10, 50, 2000
    hits = np.zeros(n)
    for seed in range(seeds):
        buf = ReservoirBuffer(capacity, seed=seed)
        start = 0
        for size in chunks:
            rows = np.arange(start, start + size)
            buf.add(rows, np.zeros(size, dtype=np.int64))
            start += size
        hits[buf.ids()] += 1
    freq = hits / seeds
    # Each frequency is Binomial(2000, 0.2) / 2000: sd 0.0089; 0.045 is 5 sd.
    assert np.abs(freq - capacity / n).max() < 0.045
    assert freq.mean() == pytest.approx(capacity / n)  # exactly capacity rows every time
    assert freq[:capacity].mean() == pytest.approx(0.2, abs=0.02)  # the first rows too


def test_reservoir_is_deterministic_for_a_seed() -> None:
    def run(seed: int) -> list[int]:
        buf = ReservoirBuffer(8, seed=seed)
        for start in range(0, 100, 10):
            buf.add(np.arange(start, start + 10), np.arange(10))
        return buf.ids().tolist()

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_reservoir_state_round_trip_continues_identically() -> None:
    buf = ReservoirBuffer(6, seed=1)
    buf.add(np.arange(20), np.arange(20) % 4)
    twin = buffer_from_state(json_round_trip(buf.state_dict()))
    assert isinstance(twin, ReservoirBuffer) and twin.seen == 20
    assert twin.ids().tolist() == buf.ids().tolist()
    for b in (buf, twin):
        b.add(np.arange(20, 60), np.arange(20, 60) % 4)
    assert twin.ids().tolist() == buf.ids().tolist()
    assert twin.labels().tolist() == buf.labels().tolist()
    assert twin.sample(3)[0].tolist() == buf.sample(3)[0].tolist()


def test_sample_draws_stored_rows_without_replacement() -> None:
    buf = ReservoirBuffer(10, seed=0)
    buf.add(np.arange(100, 110), np.arange(10))
    ids, labels = buf.sample(4, rng=np.random.default_rng(0))
    assert len(set(ids.tolist())) == 4 and set(ids.tolist()) <= set(range(100, 110))
    assert (labels == ids - 100).all()
    assert len(buf.sample(50)[0]) == 10
    assert len(ReservoirBuffer(3).sample(5)[0]) == 0


def test_buffer_inputs_are_checked() -> None:
    with pytest.raises(ConfigError, match="capacity"):
        ReservoirBuffer(0)
    buf = ReservoirBuffer(4)
    with pytest.raises(ValueError, match="differ in length"):
        buf.add([1, 2, 3], [0, 1])
    with pytest.raises(ValueError, match="integers"):
        buf.add([1.5, 2.0], [0, 1])
    with pytest.raises(ValueError, match="1-D"):
        buf.add([[1, 2]], [[0, 1]])
    with pytest.raises(ValueError, match="cannot load"):
        ReservoirBuffer(5).load_state_dict(buf.state_dict())
    with pytest.raises(ValueError, match="cannot load"):
        ClassBalancedBuffer(4).load_state_dict(buf.state_dict())


# --- biased reservoir ------------------------------------------------------------------


def test_biased_fixed_alpha_gives_the_latest_bucket_its_share() -> None:
    buf = BiasedReservoirBuffer(100, alpha=0.3, seed=0)
    buf.add(np.arange(150), np.zeros(150, dtype=np.int64))
    assert len(buf) == 100 and (buf.buckets() == 0).all()  # bucket 1 fills the buffer
    for t in range(1, 6):
        rows = np.arange(1000 * t, 1000 * t + 150)
        buf.add(rows, np.full(150, t))
        counts = Counter(buf.buckets().tolist())
        assert len(buf) == 100
        assert counts[t] == 30  # round(alpha * capacity)
        assert set(buf.ids()[buf.buckets() == t].tolist()) <= set(rows.tolist())
        assert (buf.labels()[buf.buckets() == t] == t).all()


def test_biased_fixed_alpha_decays_old_buckets_geometrically() -> None:
    shares = []
    for seed in range(200):
        buf = BiasedReservoirBuffer(100, alpha=0.5, seed=seed)
        for t in range(4):
            buf.add(np.arange(100) + 1000 * t, np.zeros(100, dtype=np.int64))
        counts = Counter(buf.buckets().tolist())
        shares.append([counts[b] / 100 for b in range(4)])
    mean = np.mean(shares, axis=0)
    # bucket 3: alpha; bucket 2: alpha (1 - alpha); buckets 1 and 0 (which filled the
    # buffer together after bucket 1) alpha (1 - alpha)^2 each
    np.testing.assert_allclose(mean, [0.125, 0.125, 0.25, 0.5], atol=0.01)
    assert np.array(shares)[:, 3].std() == 0  # the latest share is exact


def test_biased_dynamic_alpha_is_one_over_t() -> None:
    buf = BiasedReservoirBuffer(100, dynamic=True, seed=0)
    assert [buf.share(t) for t in (1, 2, 3, 4)] == [1.0, 0.5, 1 / 3, 0.25]
    for t in range(4):
        buf.add(np.arange(100) + 1000 * t, np.full(100, t))
        assert Counter(buf.buckets().tolist())[t] == round(100 / (t + 1))
    # 1/t keeps every bucket near an equal share: expected 25 rows each after 4 buckets.
    totals = np.zeros(4)
    for seed in range(200):
        b = BiasedReservoirBuffer(100, dynamic=True, seed=seed)
        for t in range(4):
            b.add(np.arange(100) + 1000 * t, np.zeros(100, dtype=np.int64))
        totals += np.bincount(b.buckets(), minlength=4)
    np.testing.assert_allclose(totals / 200, [25, 25, 25, 25], atol=1.0)


def test_biased_small_buckets_fill_free_slots_first() -> None:
    buf = BiasedReservoirBuffer(10, alpha=0.2, seed=0)
    buf.add([1, 2, 3], [0, 0, 0])
    buf.add([4, 5, 6, 7, 8], [1, 1, 1, 1, 1])  # 7 free slots > quota 2: all kept
    assert sorted(buf.ids().tolist()) == [1, 2, 3, 4, 5, 6, 7, 8]
    buf.add(list(range(100, 110)), [2] * 10)  # 2 free slots == quota 2
    assert len(buf) == 10 and Counter(buf.buckets().tolist())[2] == 2


def test_biased_config_and_state() -> None:
    with pytest.raises(ConfigError, match=r"alpha in \(0, 1\]"):
        BiasedReservoirBuffer(10)
    with pytest.raises(ConfigError, match=r"alpha in \(0, 1\]"):
        BiasedReservoirBuffer(10, alpha=1.5)
    with pytest.raises(ConfigError, match="leave alpha unset"):
        BiasedReservoirBuffer(10, alpha=0.5, dynamic=True)
    buf = BiasedReservoirBuffer(20, alpha=0.25, seed=5)
    for t in range(3):
        buf.add(np.arange(30) + 100 * t, np.arange(30) % 3)
    twin = buffer_from_state(json_round_trip(buf.state_dict()))
    assert isinstance(twin, BiasedReservoirBuffer) and twin.alpha == 0.25
    for b in (buf, twin):
        b.add(np.arange(30) + 900, np.arange(30) % 3)
    assert twin.ids().tolist() == buf.ids().tolist()
    assert twin.buckets().tolist() == buf.buckets().tolist()
    with pytest.raises(ValueError, match="alpha"):
        BiasedReservoirBuffer(20, alpha=0.5).load_state_dict(buf.state_dict())


# --- class balanced (GDumb) ------------------------------------------------------------


def test_class_balanced_stays_balanced_on_an_imbalanced_stream() -> None:
    buf = ClassBalancedBuffer(30, seed=0)
    labels = np.array([0] * 100 + [1] * 50 + [2] * 10)
    buf.add(np.arange(labels.size), labels)
    assert len(buf) == 30 and buf.class_counts() == {0: 10, 1: 10, 2: 10}
    assert (labels[buf.ids()] == buf.labels()).all()
    buf.add(np.arange(1000, 1040), np.full(40, 3))  # a new class takes 30 / 4 of the room
    counts = buf.class_counts()
    assert len(buf) == 30 and counts[3] == 8 and max(counts.values()) - min(counts.values()) <= 1


def test_class_balanced_evicts_from_the_largest_class() -> None:
    buf = ClassBalancedBuffer(4, seed=0)
    buf.add([0], [0])
    for row in (1, 2, 3):  # one row per call: the order is the given one
        buf.add([row], [0])
    assert buf.class_counts() == {0: 4}
    buf.add([10], [1])  # K=2: class 1 holds 0 < 4/2 -> evict a class-0 row
    assert buf.class_counts() == {0: 3, 1: 1} and 10 in buf.ids().tolist()
    buf.add([11], [1])  # 1 < 2 -> evict class 0 (the largest)
    assert buf.class_counts() == {0: 2, 1: 2}
    before = buf.ids().tolist()
    buf.add([12], [1])  # 2 >= 4/2: dropped
    assert buf.ids().tolist() == before
    buf.add([20], [2])  # K=3: 0 < 4/3; classes 0 and 1 tie as the largest
    counts = buf.class_counts()
    assert counts[2] == 1 and sorted([counts.get(0, 0), counts.get(1, 0)]) == [1, 2]


def test_class_balanced_ties_are_broken_at_random_but_reproducibly() -> None:
    def victims(seed: int) -> list[int]:
        out = []
        for s in range(seed, seed + 20):
            buf = ClassBalancedBuffer(4, seed=s)
            for row, y in enumerate([0, 0, 1, 1]):
                buf.add([row], [y])
            buf.add([99], [2])
            out.append(min(buf.class_counts().get(c, 0) for c in (0, 1)))
            out.append(buf.class_counts().get(0, 0))
        return out

    assert victims(0) == victims(0)
    chosen = victims(0)[1::2]  # class-0 count after the eviction: 1 or 2
    assert set(chosen) == {1, 2}


def test_class_balanced_state_round_trip() -> None:
    buf = ClassBalancedBuffer(12, seed=2)
    buf.add(np.arange(40), np.arange(40) % 3)
    twin = buffer_from_state(json_round_trip(buf.state_dict()))
    assert twin.ids().tolist() == buf.ids().tolist()
    for b in (buf, twin):
        b.add(np.arange(100, 140), np.arange(40) % 5)
    assert twin.ids().tolist() == buf.ids().tolist()
    assert twin.class_counts() == buf.class_counts()


def test_build_buffer_registry() -> None:
    assert set(BUFFERS) == {"reservoir", "biased_reservoir", "experience_balanced",
                            "class_balanced"}
    assert isinstance(build_buffer("reservoir", 5, seed=1), ReservoirBuffer)
    assert build_buffer("biased_reservoir", 5, alpha=0.5).alpha == 0.5
    with pytest.raises(ConfigError, match="unknown replay buffer 'fifo'"):
        build_buffer("fifo", 5)
    with pytest.raises(ConfigError, match="bad parameters for the 'reservoir' buffer"):
        build_buffer("reservoir", 5, alpha=0.5)


def test_experience_balanced_buffer_gives_each_bucket_its_share() -> None:
    """After t equal buckets each keeps about capacity / t rows; the state round-trips."""
    buf = build_buffer("experience_balanced", 120, seed=3)
    for t in range(4):
        buf.add(np.arange(1000 * t, 1000 * t + 200), np.zeros(200, dtype=np.int64))
    shares = np.bincount(buf.ids() // 1000, minlength=4)
    assert len(buf) == 120 and shares[3] == 30  # the newest takes exactly 1/t
    assert all(abs(s - 30) <= 8 for s in shares)  # the older ones, in expectation
    twin = buffer_from_state(json.loads(json.dumps(buf.state_dict())))
    assert type(twin).__name__ == "ExperienceBalancedBuffer"
    assert twin.ids().tolist() == buf.ids().tolist()
