"""The CLEAR stream's protocol and its persisted service (pure Python: no Ray is started)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest

import raylab.data.fs
from raylab.continual.buffers import ClassBalancedBuffer
from raylab.continual.stream import (
    StreamError,
    StreamProtocol,
    StreamService,
    shard_indices,
    strategy_flags,
)
from raylab.errors import ConfigError, RaylabError
from raylab.metrics.continual import clear_metrics

CLASSES = 3


def make_rows(n_buckets: int = 10, per_class: int = 10, classes: int = CLASSES
              ) -> dict[int, tuple[list[int], list[int]]]:
    """Bucket 0 unlabeled, then ``n_buckets`` labelled buckets; ids unique, in odd order."""
    rows: dict[int, tuple[list[int], list[int]]] = {0: (list(range(900000, 900020)), [-1] * 20)}
    for b in range(1, n_buckets + 1):
        ids = [b * 1000 + k for k in range(per_class * classes)]
        labels = [k % classes for k in range(per_class * classes)]
        rows[b] = (ids[::-1], labels[::-1])
    return rows


def acc(i: int, j: int) -> float:
    """A distinct accuracy for R[i][j] (buckets 1-based)."""
    return round(0.3 + 0.05 * i + 0.01 * j, 4)


def row_for(t: int, buckets: list[int]) -> dict[int, float]:
    return {j: acc(t, j) for j in buckets}


RESERVOIR = {"kind": "reservoir", "capacity": 25}


# --- IID split -----------------------------------------------------------------------------


def test_iid_split_is_70_30_stratified_disjoint_and_seeded() -> None:
    rows = make_rows(per_class=11)  # 33 rows per bucket, 11 per class
    p = StreamProtocol(rows, "iid", seed=3)
    assert p.buckets == list(range(1, 11))
    for b in p.buckets:
        ids, labels = rows[b]
        label = dict(zip(ids, labels))
        train, test = set(p.train[b]), set(p.test_ids(b))
        assert len(train) == math.floor(0.7 * 33 + 0.5) == 23 and len(test) == 10
        assert not train & test and train | test == set(ids)
        per_class = Counter(label[r] for r in train)
        assert sorted(per_class.values()) == [7, 8, 8]  # floor(7.7) = 7, two remainders
    same = StreamProtocol(rows, "iid", seed=3)
    other = StreamProtocol(rows, "iid", seed=4)
    assert all(same.train[b] == p.train[b] for b in p.buckets)
    assert any(set(other.train[b]) != set(p.train[b]) for b in p.buckets)
    shuffled = {b: (ids[::-1], labels[::-1]) for b, (ids, labels) in rows.items()}
    assert StreamProtocol(shuffled, "iid", seed=3).train == p.train  # input order is irrelevant


def test_bucket_zero_is_never_trained_or_tested() -> None:
    p = StreamProtocol(make_rows(3), "iid")
    with pytest.raises(StreamError, match="not a labelled bucket"):
        p.test_ids(0)
    assert 0 not in p.next_bucket()["eval_buckets"]


def test_no_iid_test_row_is_ever_trained_on_with_a_reservoir_buffer() -> None:
    p = StreamProtocol(make_rows(), "iid", buffer=RESERVOIR, seed=1)
    test = {r for b in p.buckets for r in p.test_ids(b)}
    handed: set[int] = set()
    while (b := p.next_bucket()) is not None:
        handed |= set(b["train_ids"]) | set(b["replay_ids"])
        assert len(b["replay_ids"]) == len(b["replay_labels"]) <= 25
        p.finish_bucket(b["bucket"], row_for(b["bucket"], p.buckets))
        assert not test & set(p.buffer.ids().tolist())
    assert handed and not handed & test
    assert len(p.buffer) == 25


# --- streaming ---------------------------------------------------------------------------


def test_streaming_tests_on_all_rows_and_trains_on_all_rows() -> None:
    rows = make_rows(4)
    p = StreamProtocol(rows, "streaming")
    for b in p.buckets:
        assert p.test_ids(b) == sorted(rows[b][0])
    while (nb := p.next_bucket()) is not None:
        t = nb["bucket"]
        assert sorted(nb["train_ids"]) == p.test_ids(t) == sorted(rows[t][0])
        p.finish_bucket(t, row_for(t, p.buckets))
    R = p.metrics()["matrix"]
    # next-domain: R[i][i+1] is bucket i+1's accuracy measured after training through i,
    # i.e. before bucket i+1 was trained on.
    assert [R[i][i + 1] for i in range(3)] == [acc(t, t + 1) for t in (1, 2, 3)]


# --- order ----------------------------------------------------------------------------------


def test_next_bucket_is_idempotent_and_order_is_enforced() -> None:
    p = StreamProtocol(make_rows(3), "iid", buffer=RESERVOIR)
    first = p.next_bucket()
    assert first["bucket"] == 1 and p.next_bucket() == first
    with pytest.raises(StreamError, match="bucket 1 is not finished"):
        p.next_bucket(bucket=2)
    with pytest.raises(StreamError, match="bucket 1 is not finished"):
        p.finish_bucket(2, row_for(2, p.buckets))
    assert p.next_bucket(bucket=1) == first and p.cursor == 0
    p.finish_bucket(1, row_for(1, p.buckets))
    assert p.next_bucket()["bucket"] == 2
    with pytest.raises(StreamError, match="already finished"):
        p.next_bucket(bucket=1)
    with pytest.raises(StreamError, match="already finished with other accuracies"):
        p.finish_bucket(1, {j: 0.0 for j in p.buckets})
    # A replay of the very call that finished bucket 1 (Ray retries) changes nothing.
    buffer_before = p.buffer.state_dict()
    assert p.finish_bucket(1, row_for(1, p.buckets))["replayed"] is True
    assert p.cursor == 1 and p.buffer.state_dict() == buffer_before
    p.finish_bucket(2, row_for(2, p.buckets))
    with pytest.raises(StreamError, match="already finished"):
        p.finish_bucket(1, row_for(1, p.buckets))  # not the last one: never a replay


def test_accuracies_are_checked_before_anything_changes() -> None:
    p = StreamProtocol(make_rows(3), "iid")
    with pytest.raises(StreamError, match=r"missing for buckets \[2, 3\]"):
        p.finish_bucket(1, {1: 0.5})
    with pytest.raises(StreamError, match="fraction in"):
        p.finish_bucket(1, {1: 0.5, 2: 50.0, 3: 0.5})
    with pytest.raises(StreamError, match="fraction in"):
        p.finish_bucket(1, {1: 0.5, 2: float("nan"), 3: 0.5})
    with pytest.raises(StreamError, match="not a labelled bucket"):
        p.finish_bucket(1, {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5})
    with pytest.raises(StreamError, match="not a labelled bucket"):
        p.finish_bucket(7, {1: 0.5, 2: 0.5, 3: 0.5})
    assert p.cursor == 0 and p.matrix.missing() == [(i, j) for i in range(3) for j in range(3)]
    assert issubclass(StreamError, RaylabError)


def test_full_run_fills_the_matrix_and_metrics_are_clears() -> None:
    p = StreamProtocol(make_rows(10), "iid", buffer={"kind": "biased_reservoir",
                                                      "capacity": 30, "alpha": 0.5})
    assert p.metrics()["metrics"] is None
    while (b := p.next_bucket()) is not None:
        p.finish_bucket(b["bucket"], row_for(b["bucket"], p.buckets))
    out = p.metrics()
    R = [[acc(i, j) for j in range(1, 11)] for i in range(1, 11)]
    assert out["complete"] and out["matrix"] == R and out["finished"] == list(range(1, 11))
    assert out["metrics"] == clear_metrics(R)
    assert p.next_bucket() is None
    with pytest.raises(StreamError, match="already finished"):
        p.finish_bucket(5, row_for(5, p.buckets))


# --- GDumb ---------------------------------------------------------------------------------


def test_gdumb_trains_on_the_buffer_after_adding_the_bucket() -> None:
    rows = make_rows(3)
    cfg = {"kind": "class_balanced", "capacity": 12}
    p = StreamProtocol(rows, "iid", buffer=cfg, seed=5, trains_on_buffer=True,
                       from_scratch=True)
    mirror = ClassBalancedBuffer(12, seed=5)
    for t in p.buckets:
        nb = p.next_bucket()
        assert p.next_bucket() == nb  # the preview does not touch the committed buffer
        mirror.add(p.train[t], [dict(zip(*rows[t]))[r] for r in p.train[t]])
        assert nb["train_ids"] == mirror.ids().tolist()
        assert nb["train_labels"] == mirror.labels().tolist()
        assert nb["replay_ids"] == [] and nb["from_scratch"] is True
        if t == 1:  # the committed buffer is still empty: bucket 1 was added first
            assert len(p.buffer) == 0 and len(nb["train_ids"]) == 12
            assert set(nb["train_ids"]) <= set(p.train[1])
        p.finish_bucket(t, row_for(t, p.buckets))
        assert p.buffer.ids().tolist() == nb["train_ids"]  # committed == what was trained


def test_strategy_flags_follow_the_strategy() -> None:
    class GDumbLike:
        buffer_kind, trains_on_buffer, from_scratch = "class_balanced", True, True

    flags = strategy_flags(GDumbLike(), 50)
    assert flags == {"buffer": {"kind": "class_balanced", "capacity": 50},
                     "trains_on_buffer": True, "from_scratch": True}
    with pytest.raises(ConfigError, match="capacity"):
        strategy_flags(GDumbLike())
    with pytest.raises(ConfigError, match="needs a replay buffer"):
        StreamProtocol(make_rows(3), trains_on_buffer=True)


# --- sharding -----------------------------------------------------------------------------


def test_workers_get_equal_padded_training_shards_and_a_test_partition() -> None:
    assert shard_indices(5, 0, 2) == [0, 2, 4] and shard_indices(5, 1, 2) == [1, 3, 0]
    assert shard_indices(5, 1, 2, pad=False) == [1, 3]
    with pytest.raises(StreamError):
        shard_indices(5, 2, 2)
    p = StreamProtocol(make_rows(3, per_class=7), "iid")  # 21 rows -> 15 train
    shards = [p.next_bucket(rank, 4) for rank in range(4)]
    assert {len(s["train_ids"]) for s in shards} == {4}
    assert set().union(*(s["train_ids"] for s in shards)) == set(p.train[1])
    parts = [p.test_ids(1, rank, 4) for rank in range(4)]
    assert sorted(sum(parts, [])) == p.test_ids(1)


# --- persistence and restart ---------------------------------------------------------------


def test_state_round_trips_through_json() -> None:
    p = StreamProtocol(make_rows(4), "iid", buffer=RESERVOIR, seed=2)
    for _ in range(2):
        b = p.next_bucket()
        p.finish_bucket(b["bucket"], row_for(b["bucket"], p.buckets))
    q = StreamProtocol.from_state(json.loads(json.dumps(p.state_dict())))
    assert q.state_dict() == p.state_dict() and q.next_bucket() == p.next_bucket()
    bad = p.state_dict()
    bad["cursor"] = 3
    with pytest.raises(StreamError, match="inconsistent"):
        StreamProtocol.from_state(bad)
    leaky = p.state_dict()
    leaky["train"]["3"] = leaky["rows"]["3"][0]  # bucket 3 would train on its test rows
    with pytest.raises(StreamError, match="bucket 3: its test rows are empty or overlap"):
        StreamProtocol.from_state(leaky)


def _drive(service: StreamService, trained: list[int], stop_after: int | None = None) -> None:
    """A driver loop: train (recorded in ``trained``), evaluate, finish."""
    done = 0
    while (b := service.next_bucket()) is not None and done != stop_after:
        t = b["bucket"]
        trained.append(t)
        service.finish_bucket(t, row_for(t, service.protocol.buckets))
        done += 1


def test_a_restarted_service_resumes_without_training_a_bucket_twice(tmp_path: Path) -> None:
    kwargs = {"bucket_rows": make_rows(10), "protocol": "iid", "buffer": RESERVOIR, "seed": 7}
    path = tmp_path / "run" / "stream.json"
    trained: list[int] = []
    first = StreamService(path, **kwargs)
    assert path.exists()  # the split is fixed on disk from the start
    _drive(first, trained, stop_after=4)
    saved_buffer, saved_R = first.protocol.buffer.state_dict(), first.metrics()["matrix"]
    assert first.state()["finished"] == [1, 2, 3, 4] and first.state()["current"] == 5
    # The actor dies while bucket 5 is being trained; Ray re-runs __init__ with the same args.
    pending = first.next_bucket()
    del first
    second = StreamService(path, **kwargs)
    assert second.protocol.buffer.state_dict() == saved_buffer
    assert second.metrics()["matrix"] == saved_R
    assert second.next_bucket() == pending  # bucket 5 again, identical rows and replay
    _drive(second, trained)
    assert trained == list(range(1, 11))  # each bucket exactly once, none skipped
    uninterrupted = StreamService(tmp_path / "other.json", **kwargs)
    _drive(uninterrupted, [])
    assert second.state(full=True) == uninterrupted.state(full=True)
    third = StreamService(path)  # no arguments needed to resume
    assert third.next_bucket() is None and third.metrics()["complete"]


def test_a_state_file_of_another_stream_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "stream.json"
    StreamService(path, bucket_rows=make_rows(3), protocol="iid")
    with pytest.raises(StreamError, match="another stream"):
        StreamService(path, bucket_rows=make_rows(3), protocol="streaming")
    with pytest.raises(StreamError, match="no stream state"):
        StreamService(tmp_path / "missing.json")
    # A store URI is a valid place (tests/integration/test_object_storage.py).


def test_a_failed_save_leaves_the_old_file_and_rolls_back(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    path = tmp_path / "stream.json"
    service = StreamService(path, bucket_rows=make_rows(3), buffer=RESERVOIR)
    before = path.read_text()

    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone mid-write")

    monkeypatch.setattr(raylab.data.fs.os, "replace", crash)
    with pytest.raises(OSError, match="mid-write"):
        service.finish_bucket(1, row_for(1, [1, 2, 3]))
    monkeypatch.undo()
    assert path.read_text() == before and os.listdir(tmp_path) == ["stream.json"]
    assert service.state()["current"] == 1 and len(service.protocol.buffer) == 0
    service.finish_bucket(1, row_for(1, [1, 2, 3]))
    assert StreamService(path).state()["finished"] == [1]


# --- bad input -----------------------------------------------------------------------------


def test_bad_rows_and_config_are_clear_errors() -> None:
    rows = make_rows(3)
    dup = dict(rows)
    dup[3] = ([2000] + rows[3][0][1:], rows[3][1])
    with pytest.raises(StreamError, match="row id 2000 of bucket 3 is also in bucket 2"):
        StreamProtocol(dup)
    unlabeled = dict(rows)
    unlabeled[2] = (rows[2][0], [-1] * len(rows[2][0]))
    with pytest.raises(StreamError, match="bucket 2 is empty or has unlabeled rows"):
        StreamProtocol(unlabeled)
    with pytest.raises(StreamError, match="at least 2 labelled buckets"):
        StreamProtocol({0: rows[0], 1: rows[1]})
    with pytest.raises(ConfigError, match="protocol"):
        StreamProtocol(rows, "online")
    with pytest.raises(ConfigError, match="train_fraction"):
        StreamProtocol(rows, train_fraction=1.0)
    with pytest.raises(ConfigError, match="kind"):
        StreamProtocol(rows, buffer={"kind": "fifo", "capacity": 3})


@pytest.mark.parametrize("protocol", ["iid", "streaming"])
def test_validation_rows_are_never_the_final_runs_test_rows(protocol: str) -> None:
    """Tuning never sees test rows: a validating stream (a Tune trial) trains without its
    validation rows and scores only them; the final stream never scores them."""
    rows = make_rows(4)
    final = StreamProtocol(rows, protocol, seed=1, val_fraction=0.2)
    tuning = StreamProtocol(rows, protocol, seed=1, val_fraction=0.2, validate=True)
    paper = StreamProtocol(rows, protocol, seed=1)  # val_fraction 0: the paper's test sets
    for b in final.buckets:
        ids = set(rows[b][0])
        val = set(tuning.test_ids(b))
        n_pool = len(paper.train[b])
        assert len(val) == round(0.2 * n_pool)  # stratified share of the training pool
        assert not val & set(final.test_ids(b))  # disjoint from the final metric's rows
        assert not val & set(tuning.train[b])  # and never trained on while tuning
        # Tune trains on the pool less the validation rows; the final run on all of it.
        assert set(tuning.train[b]) | val == set(final.train[b]) == set(paper.train[b])
        if protocol == "iid":  # the 30 % test split is untouched
            assert set(final.test_ids(b)) == set(paper.test_ids(b)) == ids - set(
                paper.train[b])
        else:  # streaming scores the whole bucket but its validation rows
            assert set(final.test_ids(b)) == ids - val
            assert set(paper.test_ids(b)) == ids
    # The validation rows of every class are in proportion (stratified).
    counts = Counter(tuning.label[r] for r in tuning.test_ids(1))
    assert max(counts.values()) - min(counts.values()) <= 1
    # A validating stream refuses to leak: validation rows never go out for training.
    b = tuning.next_bucket()
    assert not set(b["train_ids"]) & set(tuning.test_ids(b["bucket"]))
    with pytest.raises(ConfigError, match="val_fraction > 0"):
        StreamProtocol(rows, protocol, val_fraction=0.0, validate=True)
    # The state round-trips and fingerprints the validation setting.
    again = StreamProtocol.from_state(json.loads(json.dumps(tuning.state_dict())))
    assert again.test_ids(2) == tuning.test_ids(2)
    assert tuning.fingerprint() != final.fingerprint()
