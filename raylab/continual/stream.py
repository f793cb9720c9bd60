"""The CLEAR stream: protocol, bucket cursor, replay buffer and accuracy matrix in one place.

:class:`StreamProtocol` is pure Python/numpy (no Ray, no torch): it owns the train/test split
of every bucket, the cursor (which bucket is released for training), the replay buffer (row
ids and labels, :mod:`raylab.continual.buffers`) and the accuracy matrix ``R``
(:class:`~raylab.metrics.continual.AccuracyMatrix`). :class:`StreamService` wraps it with a
state file that is rewritten atomically after every change, and
:func:`raylab.runtime.actors.start_stream` runs the service as a named, restartable Ray
actor; a restarted actor re-runs ``__init__``, which loads the file, so it resumes where it
stopped (``RAY_NOTES.md``, stateful actors).

Buckets and rows (``METHODS.md`` section 3). ``bucket_rows`` maps a bucket index to its
``(row ids, labels)``; row ids are ints unique across the whole stream (the caller's
numbering of the shard rows). Bucket 0 is the pre-training bucket (unlabeled in CLEAR,
labels -1): it is never trained on or tested by the supervised protocol, whatever its
labels. Every other bucket must be fully labelled; these buckets, in increasing order, are
the stream ``b_0 < b_1 < ... < b_{T-1}`` (``T >= 2``), and ``R[i][j]`` is the accuracy on the
test rows of ``b_j`` after training through ``b_i``.

Protocols:

- ``"iid"``: each labelled bucket is split once, for the whole run, into train and test
  rows, stratified by label: the bucket's train size is ``n_train = floor(f * n + 0.5)``
  clamped to ``[1, n - 1]`` (``f = train_fraction``, 0.7); each class ``c`` first gets
  ``floor(f * n_c)`` train rows, and the remaining ``n_train - sum_c floor(f * n_c)`` rows
  go one each to the classes with the largest remainders ``f * n_c - floor(f * n_c)``
  (ties: smaller label first). Which rows of a class are trained on is a permutation drawn
  from ``numpy.random.default_rng([seed, bucket])``. Test rows are never handed out for
  training, replay or buffering (checked on construction, on load and on every release).
- ``"streaming"``: bucket ``b_t`` trains on all of its rows, and the test set of ``b_j`` is
  also all of its rows. Row ``i`` of ``R`` is measured after training through ``b_i``, so
  ``R[i][i+1]`` is the accuracy on ``b_{i+1}`` *before* training on it: today's test set is
  tomorrow's training set, and the next-domain accuracy is the streaming score. (``R[i][i]``
  is then an accuracy on rows just trained on.)

Validation rows (``val_fraction``). A share of each bucket's training pool (IID: its train
split; streaming: all of it) is set aside, stratified by label with the rule above and
``default_rng([seed, bucket, 1])``. A *validating* stream (``validate=True``, a Tune trial)
trains on the pool without them and measures ``R`` on them; the final run trains on the
whole pool and never measures on them (IID: its test split as above; streaming: all of the
bucket but its validation rows). So the rows behind Tune's metric are never the rows behind
the final one. With ``val_fraction=0`` the streaming test sets are whole buckets, as in the
paper, and the stream cannot validate.

Replay. With a buffer, bucket ``b_t``'s training rows are added to it once, when ``b_t``
is finished (``finish_bucket``), so training on ``b_t`` replays the buffer as it was after
``b_{t-1}``. With ``trains_on_buffer`` (GDumb) the bucket is added *before* training: the
training rows handed out for ``b_t`` are the buffer's contents after adding ``b_t`` (a
deterministic preview; the committed buffer is updated identically on finish), and there
is no separate replay.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raylab.continual.buffers import BUFFERS, ReplayBuffer, buffer_from_state, build_buffer
from raylab.data import fs
from raylab.errors import ConfigError, RaylabError
from raylab.metrics.continual import AccuracyMatrix, clear_metrics

PROTOCOLS = ("iid", "streaming")
PRETRAIN_BUCKET = 0
STATE_FORMAT = "raylab.stream"
STATE_VERSION = 1


class StreamError(RaylabError):
    """The stream's protocol was broken (order, overlap, accuracies) or its state is bad."""


def shard_indices(n: int, rank: int, world_size: int, pad: bool = True) -> list[int]:
    """Positions ``rank, rank + W, ...`` of ``n`` items for worker ``rank`` of ``W``.

    With ``pad`` the list is first extended cyclically to a multiple of ``W`` (as torch's
    ``DistributedSampler`` does), so every worker gets ``ceil(n / W)`` items and DDP
    workers run the same number of steps; without it the shards partition the items.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise StreamError(f"rank must be in [0, world_size) with world_size >= 1, got "
                          f"rank={rank!r}, world_size={world_size!r}")
    if n == 0:
        return []
    total = math.ceil(n / world_size) * world_size if pad else n
    return [k % n for k in range(rank, total, world_size)]


def strategy_flags(strategy: Any, capacity: int | None = None,
                   **buffer_kwargs: Any) -> dict[str, Any]:
    """The ``buffer``, ``trains_on_buffer`` and ``from_scratch`` arguments of
    :class:`StreamProtocol` for a strategy (anything with ``buffer_kind``,
    ``trains_on_buffer`` and ``from_scratch``), e.g. ``strategy_flags(GDumb(), 3300)``.

    Raises:
        ConfigError: The strategy needs a buffer but no ``capacity`` is given.
    """
    kind = getattr(strategy, "buffer_kind", None)
    if kind is not None and capacity is None:
        raise ConfigError(f"strategy {type(strategy).__name__} keeps a {kind!r} replay buffer; "
                          "give its capacity")
    buffer = None if kind is None else {"kind": kind, "capacity": capacity, **buffer_kwargs}
    return {"buffer": buffer, "trains_on_buffer": bool(strategy.trains_on_buffer),
            "from_scratch": bool(strategy.from_scratch)}


def _normalise_rows(bucket_rows: Mapping[Any, Sequence[Sequence[int]]]
                    ) -> dict[int, tuple[list[int], list[int]]]:
    """Buckets as ``{int: (ids sorted, labels)}``; checks lengths and unique ids."""
    out: dict[int, tuple[list[int], list[int]]] = {}
    owner: dict[int, int] = {}
    for key in sorted(bucket_rows, key=int):
        b = int(key)
        if b < 0:
            raise StreamError(f"bucket indices must be >= 0, got {key!r}")
        ids, labels = (np.asarray(v, dtype=np.int64).reshape(-1) for v in bucket_rows[key])
        if ids.size != labels.size:
            raise StreamError(f"bucket {b} has {ids.size} row ids but {labels.size} labels")
        order = np.argsort(ids, kind="stable")
        ids, labels = ids[order].tolist(), labels[order].tolist()
        for row in ids:
            if row in owner:
                where = "twice in it" if owner[row] == b else f"also in bucket {owner[row]}"
                raise StreamError(f"row id {row} of bucket {b} is {where}; row ids must be "
                                  "unique across the stream")
            owner[row] = b
        if b != PRETRAIN_BUCKET and (not ids or min(labels) < 0):
            raise StreamError(f"bucket {b} is empty or has unlabeled rows (label < 0); only "
                              f"bucket {PRETRAIN_BUCKET} (pre-training) may be unlabeled")
        out[b] = (ids, labels)
    if sum(b != PRETRAIN_BUCKET for b in out) < 2:
        raise StreamError(f"a stream needs at least 2 labelled buckets besides bucket "
                          f"{PRETRAIN_BUCKET}, got {sorted(out)}")
    return out


def _split_iid(ids: list[int], labels: list[int], fraction: float, rng: np.random.Generator
               ) -> list[int]:
    """The train ids of one bucket: stratified, largest-remainder rule (module docstring)."""
    n = len(ids)
    if n < 2:
        raise StreamError(f"an IID bucket needs >= 2 rows to have train and test rows, got {n}")
    n_train = min(max(math.floor(fraction * n + 0.5), 1), n - 1)
    by_class: dict[int, list[int]] = {}
    for row, y in zip(ids, labels):
        by_class.setdefault(y, []).append(row)
    quota = {c: math.floor(fraction * len(rows)) for c, rows in by_class.items()}
    rest = sorted(by_class, key=lambda c: (-(fraction * len(by_class[c]) - quota[c]), c))
    for c in rest[:n_train - sum(quota.values())]:
        quota[c] += 1
    train: list[int] = []
    for c in sorted(by_class):
        train.extend(rng.permutation(by_class[c])[:quota[c]].tolist())
    return rng.permutation(train).tolist()  # shuffled, so strided shards mix classes


class StreamProtocol:
    """The stream's protocol and state (rules in the module docstring).

    Args:
        bucket_rows: ``{bucket: (row ids, labels)}``; bucket 0 is the pre-training bucket.
        protocol: ``"iid"`` or ``"streaming"``.
        train_fraction: Share of each bucket trained on under ``"iid"`` (in (0, 1)).
        buffer: None (no replay) or ``{"kind": a BUFFERS key, "capacity": int, ...}``; other
            keys go to the buffer (e.g. ``alpha``); its seed defaults to ``seed``.
        seed: Seed of the IID split and the streaming order.
        trains_on_buffer: Train on the buffer after adding the bucket to it (GDumb).
        from_scratch: The strategy re-initialises the model per bucket (reported to workers).
        val_fraction: Share of each bucket's training pool set aside as validation rows
            (module docstring), in [0, 1).
        validate: Train without the validation rows and measure ``R`` on them (a Tune
            trial); needs ``val_fraction > 0``.

    Raises:
        ConfigError: A bad protocol, fraction or buffer config.
        StreamError: Bad ``bucket_rows`` (duplicate ids, unlabeled or too few buckets).
    """

    def __init__(self, bucket_rows: Mapping[Any, Sequence[Sequence[int]]], protocol: str = "iid",
                 train_fraction: float = 0.7, buffer: Mapping[str, Any] | None = None,
                 seed: int = 0, trains_on_buffer: bool = False, from_scratch: bool = False,
                 val_fraction: float = 0.0, validate: bool = False) -> None:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"stream protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if not 0.0 < float(train_fraction) < 1.0:
            raise ConfigError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
        if trains_on_buffer and buffer is None:
            raise ConfigError("trains_on_buffer (GDumb) needs a replay buffer config")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if validate and not val_fraction:
            raise ConfigError("a validating stream needs val_fraction > 0")
        self.config = {"protocol": protocol, "train_fraction": float(train_fraction),
                       "buffer": None if buffer is None else dict(buffer), "seed": int(seed),
                       "trains_on_buffer": bool(trains_on_buffer),
                       "from_scratch": bool(from_scratch),
                       "val_fraction": float(val_fraction), "validate": bool(validate)}
        self.rows = _normalise_rows(bucket_rows)
        self.buckets = [b for b in self.rows if b != PRETRAIN_BUCKET]
        self.label = {row: y for ids, labels in self.rows.values() for row, y in zip(ids, labels)}
        self.buffer = None if buffer is None else self._build_buffer(dict(buffer))
        self.train = {b: self._training_pool(b) for b in self.buckets}
        self.matrix = AccuracyMatrix(len(self.buckets))
        self.cursor = 0
        self._setup()

    # --- construction helpers -----------------------------------------------------------

    def _build_buffer(self, cfg: dict[str, Any]) -> ReplayBuffer:
        kind = cfg.pop("kind", None)
        if kind not in BUFFERS or "capacity" not in cfg:
            raise ConfigError(f"buffer config needs 'kind' (one of {sorted(BUFFERS)}) and "
                              f"'capacity', got kind={kind!r}, keys {sorted(cfg)}")
        return build_buffer(kind, cfg.pop("capacity"), seed=cfg.pop("seed", self.seed), **cfg)

    def _split(self, b: int) -> list[int]:
        """The bucket's training pool: IID its train split, streaming all its rows."""
        ids, labels = self.rows[b]
        rng = np.random.default_rng([self.seed, b])
        if self.protocol == "streaming":
            return rng.permutation(ids).tolist()
        return _split_iid(ids, labels, self.config["train_fraction"], rng)

    def _val_split(self, b: int, pool: list[int]) -> list[int]:
        """The validation rows of bucket ``b``: a stratified share of its training pool."""
        fraction = self.config.get("val_fraction", 0.0)
        if not fraction:
            return []
        keep = set(_split_iid(pool, [self.label[row] for row in pool], 1.0 - fraction,
                              np.random.default_rng([self.seed, b, 1])))
        return [row for row in pool if row not in keep]

    def _training_pool(self, b: int) -> list[int]:
        """The rows bucket ``b`` trains on: its pool, less its validation rows when the
        stream validates."""
        pool = self._split(b)
        if not self.config.get("validate"):
            return pool
        val = set(self._val_split(b, pool))
        return [row for row in pool if row not in val]

    def _setup(self) -> None:
        """Derived lookups, then the split invariants (also run after loading a state)."""
        self.label = {row: y for ids, labels in self.rows.values() for row, y in zip(ids, labels)}
        self.position = {b: i for i, b in enumerate(self.buckets)}
        self.test: dict[int, list[int]] = {}
        #: Rows that must never be trained on: the IID test splits, and the validation rows
        #: of a validating stream.
        self.held_out: set[int] = set()
        validate = self.config.get("validate", False)
        for b in self.buckets:
            ids, train = self.rows[b][0], set(self.train[b])
            if not train <= set(ids) or len(train) != len(self.train[b]):
                raise StreamError(f"the train ids of bucket {b} are not distinct rows of it")
            pool = self._split(b)
            val = self._val_split(b, pool)
            if validate:
                self.test[b] = val
            elif self.protocol == "streaming":
                val_set = set(val)
                self.test[b] = [row for row in ids if row not in val_set]
            else:
                pooled = set(pool)
                self.test[b] = [row for row in ids if row not in pooled]
            if self.protocol == "iid":
                pooled = set(pool)
                self.held_out.update(row for row in ids if row not in pooled)
            if validate:
                self.held_out.update(val)
            if not self.test[b] or self.held_out.intersection(self.train[b]):
                raise StreamError(f"bucket {b}: its test rows are empty or overlap training "
                                  "rows")
        self._preview: tuple[int, ReplayBuffer] | None = None

    @property
    def protocol(self) -> str:
        return self.config["protocol"]

    @property
    def seed(self) -> int:
        return self.config["seed"]

    @property
    def done(self) -> bool:
        """True once every labelled bucket is finished."""
        return self.cursor >= len(self.buckets)

    @property
    def current(self) -> int | None:
        """The bucket released for training (None when done)."""
        return None if self.done else self.buckets[self.cursor]

    def finished(self) -> list[int]:
        """The buckets finished so far, in order."""
        return self.buckets[:self.cursor]

    # --- the protocol ---------------------------------------------------------------------

    def next_bucket(self, rank: int = 0, world_size: int = 1, bucket: int | None = None
                    ) -> dict[str, Any] | None:
        """The bucket to train now, or None when the stream is done.

        Idempotent: until ``finish_bucket`` it returns the same bucket (a restarted worker
        asks again); it never skips ahead.

        Args:
            rank, world_size: Return worker ``rank``'s shard of the training rows
                (:func:`shard_indices`, padded so every worker gets as many rows).
            bucket: The bucket the caller means to train; an error unless it is the current
                one (e.g. bucket ``t`` while ``t - 1`` is not finished).

        Returns:
            ``{"bucket", "index" (its row of R), "train_ids", "train_labels" (this worker's
            shard), "num_train" (all workers), "class_counts" (of all training rows),
            "replay_ids", "replay_labels" (the whole buffer; empty with trains_on_buffer),
            "eval_buckets", "from_scratch", "protocol"}``.

        Raises:
            StreamError: ``bucket`` is not the current bucket; a bad rank.
        """
        if bucket is not None:
            self._require_current(int(bucket), "train")
        if self.done:
            return None
        t = self.current
        ids, labels = self._training_rows(t)
        replay_ids: list[int] = []
        replay_labels: list[int] = []
        if self.buffer is not None and not self.config["trains_on_buffer"]:
            replay_ids, replay_labels = self.buffer.ids().tolist(), self.buffer.labels().tolist()
        leaked = self.held_out.intersection(ids + replay_ids)
        if leaked:
            raise StreamError(f"bucket {t}: {len(leaked)} held-out test or validation rows "
                              f"would be trained on (e.g. {sorted(leaked)[:3]})")
        pick = shard_indices(len(ids), rank, world_size)
        return {"bucket": t, "index": self.position[t],
                "train_ids": [ids[k] for k in pick], "train_labels": [labels[k] for k in pick],
                "num_train": len(ids), "class_counts": dict(sorted(Counter(labels).items())),
                "replay_ids": replay_ids, "replay_labels": replay_labels,
                "eval_buckets": list(self.buckets),
                "from_scratch": self.config["from_scratch"], "protocol": self.protocol}

    def _training_rows(self, t: int) -> tuple[list[int], list[int]]:
        if not self.config["trains_on_buffer"]:
            return self.train[t], [self.label[row] for row in self.train[t]]
        if self._preview is None or self._preview[0] != self.cursor:
            preview = buffer_from_state(self.buffer.state_dict())
            self._add_to(preview, t)
            self._preview = (self.cursor, preview)
        preview = self._preview[1]
        return preview.ids().tolist(), preview.labels().tolist()

    def _add_to(self, buffer: ReplayBuffer, t: int) -> None:
        buffer.add(self.train[t], [self.label[row] for row in self.train[t]])

    def _require_current(self, t: int, action: str) -> None:
        if t not in self.position:
            raise StreamError(f"bucket {t} is not a labelled bucket of this stream "
                              f"{self.buckets}")
        if self.position[t] < self.cursor:
            raise StreamError(f"cannot {action} bucket {t}: it is already finished")
        if self.position[t] > self.cursor:
            raise StreamError(f"cannot {action} bucket {t}: bucket {self.current} is not "
                              "finished yet (buckets are trained in order)")

    def test_ids(self, bucket: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """The rows to evaluate bucket ``bucket`` on (IID: its test split; streaming: all
        of it but its validation rows; validating: its validation rows), worker ``rank``'s
        part of them (an unpadded partition).

        Raises:
            StreamError: ``bucket`` is not a labelled bucket; a bad rank.
        """
        b = int(bucket)
        if b not in self.position:
            raise StreamError(f"bucket {bucket!r} is not a labelled bucket of this stream "
                              f"{self.buckets}")
        ids = self.test[b]
        return [ids[k] for k in shard_indices(len(ids), rank, world_size, pad=False)]

    def _check_accuracies(self, t: int, accuracies: Mapping[Any, float]) -> list[float]:
        given = {}
        for key, value in accuracies.items():
            j = int(key)
            if j not in self.position:
                raise StreamError(f"finish_bucket({t}): bucket {key!r} is not a labelled "
                                  f"bucket of this stream {self.buckets}")
            try:
                acc = float(value)
            except (TypeError, ValueError):
                acc = math.nan
            if not 0.0 <= acc <= 1.0:  # also NaN
                raise StreamError(f"finish_bucket({t}): the accuracy on bucket {j} must be a "
                                  f"fraction in [0, 1], got {value!r}")
            given[j] = acc
        missing = [j for j in self.buckets if j not in given]
        if missing:
            raise StreamError(f"finish_bucket({t}): accuracies missing for buckets {missing}; "
                              "evaluate on every labelled bucket")
        return [given[j] for j in self.buckets]

    def finish_bucket(self, bucket: int, accuracies: Mapping[int, float]) -> dict[str, Any]:
        """Record row ``R[t]`` after training bucket ``t``, update the buffer, advance.

        A repeat of the call that finished the last bucket, with the same accuracies, is a
        no-op (Ray replays actor calls after a restart); any other repeat is an error.

        Args:
            bucket: The current bucket ``t``.
            accuracies: ``{j: accuracy in [0, 1]}`` for every labelled bucket ``j``.

        Returns:
            ``{"bucket", "next_bucket" (None when done), "replayed"}``.

        Raises:
            StreamError: ``t`` is not current, or an accuracy is missing, unknown or out of
                [0, 1]. Nothing changes then.
        """
        t = int(bucket)
        last = self.cursor - 1
        if self.position.get(t, self.cursor) != last:
            self._require_current(t, "finish")
        row = self._check_accuracies(t, accuracies)
        if self.position[t] == last:
            if self.matrix.row(last) == row:
                return {"bucket": t, "next_bucket": self.current, "replayed": True}
            raise StreamError(f"bucket {t} is already finished with other accuracies; "
                              f"the current bucket is {self.current}")
        for j, acc in enumerate(row):
            self.matrix.set(self.cursor, j, acc)
        if self.buffer is not None:
            self._add_to(self.buffer, t)
        self.cursor += 1
        self._preview = None
        return {"bucket": t, "next_bucket": self.current, "replayed": False}

    def metrics(self) -> dict[str, Any]:
        """``{"buckets", "matrix" (R as lists, None holes), "finished", "complete",
        "metrics" (clear_metrics(R) once complete, else None)}``."""
        complete = self.matrix.complete()
        matrix = self.matrix.to_list()
        return {"buckets": list(self.buckets), "matrix": matrix, "finished": self.finished(),
                "complete": complete, "metrics": clear_metrics(matrix) if complete else None}

    # --- state ---------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """SHA-256 of the config and the rows: what a resumed run must share."""
        text = json.dumps({"config": self.config, "rows": {str(b): r for b, r in
                                                           self.rows.items()}}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, JSON-able."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "config": self.config,
                "fingerprint": self.fingerprint(),
                "rows": {str(b): [ids, labels] for b, (ids, labels) in self.rows.items()},
                "train": {str(b): list(v) for b, v in self.train.items()},
                "cursor": self.cursor, "finished": self.finished(),
                "matrix": self.matrix.to_list(),
                "buffer": None if self.buffer is None else self.buffer.state_dict()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> StreamProtocol:
        """Rebuild a protocol from :meth:`state_dict` output (e.g. after ``json.loads``).

        Raises:
            StreamError: Not a stream state, another version, or inconsistent contents.
        """
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise StreamError(f"not a version-{STATE_VERSION} stream state (format "
                              f"{state.get('format')!r}, version {state.get('version')!r})")
        self = cls.__new__(cls)
        try:
            self.config = dict(state["config"])
            if self.config["protocol"] not in PROTOCOLS:
                raise ValueError(f"unknown protocol {self.config['protocol']!r}")
            self.rows = _normalise_rows(state["rows"])
            self.buckets = [b for b in self.rows if b != PRETRAIN_BUCKET]
            self.train = {int(b): [int(r) for r in v] for b, v in state["train"].items()}
            self.matrix = AccuracyMatrix.from_list(state["matrix"])
            self.cursor = int(state["cursor"])
            buf = state["buffer"]
            self.buffer = None if buf is None else buffer_from_state(buf)
        except (KeyError, TypeError, ValueError) as err:
            raise StreamError(f"the stream state is malformed: {err!r}") from None
        if self.fingerprint() != state.get("fingerprint"):
            raise StreamError("the stream state's fingerprint does not match its config and rows")
        filled = [i for i in range(len(self.buckets)) if None not in self.matrix.row(i)]
        if sorted(self.train) != self.buckets or filled != list(range(self.cursor)) or \
                list(state.get("finished", [])) != self.finished():
            raise StreamError("the stream state is inconsistent: its cursor, finished buckets "
                              "and accuracy matrix rows disagree")
        self._setup()
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` as JSON, atomically: a temporary file, then a rename;
        in object storage one PUT, which stores all of it or nothing."""
        fs.write_atomic(path, json.dumps(self.state_dict()).encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> StreamProtocol:
        """A protocol from a file (or object) written by :meth:`save`."""
        try:
            state = json.loads(fs.read_bytes(path))
        except (OSError, ValueError) as err:
            raise StreamError(f"{os.fspath(path)}: cannot read the stream state: {err}") from None
        return cls.from_state(state)


class StreamService:
    """The stream as a service: a :class:`StreamProtocol` persisted to ``state_path``.

    Usable as a plain object (tests) or as a Ray actor
    (:func:`raylab.runtime.actors.start_stream`). ``__init__``
    resumes from ``state_path`` when the file exists (a restarted actor re-runs it), after
    checking that ``protocol_kwargs``, when given, describe the same stream; otherwise it
    builds a fresh protocol and saves it at once, so the split is fixed from the start.
    Every change is saved atomically before the method returns; if saving fails the change
    is rolled back and the error raised.

    ``state_path`` is a file-system path (with actors that may restart on another node, one
    the nodes share: NFS) or an object-store URI (``s3://``, ``gs://``), which every node
    reaches.

    Raises:
        StreamError: A saved state of another stream, or neither a state file nor
            ``bucket_rows``.
        DataError: The store refused a request (credentials, bucket).
    """

    def __init__(self, state_path: str | os.PathLike, **protocol_kwargs: Any) -> None:
        self.state_path = os.fspath(state_path) if fs.is_uri(state_path) else Path(state_path)
        if fs.kind(self.state_path) == "file":
            self.protocol = StreamProtocol.load(self.state_path)
            if protocol_kwargs and StreamProtocol(**protocol_kwargs).fingerprint() != \
                    self.protocol.fingerprint():
                raise StreamError(f"{self.state_path} holds the state of another stream (other "
                                  "rows or config); use a new path to start afresh")
        elif "bucket_rows" in protocol_kwargs:
            self.protocol = StreamProtocol(**protocol_kwargs)
            self.protocol.save(self.state_path)
        else:
            raise StreamError(f"no stream state at {self.state_path} and no bucket_rows given")

    def next_bucket(self, rank: int = 0, world_size: int = 1, bucket: int | None = None
                    ) -> dict[str, Any] | None:
        """:meth:`StreamProtocol.next_bucket` (changes nothing)."""
        return self.protocol.next_bucket(rank, world_size, bucket)

    def test_ids(self, bucket: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """:meth:`StreamProtocol.test_ids`."""
        return self.protocol.test_ids(bucket, rank, world_size)

    def finish_bucket(self, bucket: int, accuracies: Mapping[int, float]) -> dict[str, Any]:
        """:meth:`StreamProtocol.finish_bucket`, then save (rolled back if saving fails)."""
        before = self.protocol.state_dict()
        result = self.protocol.finish_bucket(bucket, accuracies)
        try:
            self.protocol.save(self.state_path)
        except BaseException:
            self.protocol = StreamProtocol.from_state(before)
            raise
        return result

    def metrics(self) -> dict[str, Any]:
        """:meth:`StreamProtocol.metrics`."""
        return self.protocol.metrics()

    def state(self, full: bool = False) -> dict[str, Any]:
        """A progress summary, or the whole :meth:`StreamProtocol.state_dict` if ``full``."""
        if full:
            return self.protocol.state_dict()
        p = self.protocol
        return {"state_path": str(self.state_path), "protocol": p.protocol,
                "buckets": list(p.buckets), "finished": p.finished(), "current": p.current,
                "buffer_rows": 0 if p.buffer is None else len(p.buffer), "done": p.done}


__all__ = ["PROTOCOLS", "StreamError", "StreamProtocol", "StreamService", "shard_indices",
           "strategy_flags"]
