"""Replay buffers of row ids for continual learning (numpy only: no torch, no Ray).

A buffer stores **row ids** (ints naming rows of the stream's shards) and their labels, never
tensors: the stream actor holds the buffer, and workers fetch the rows by id. Every buffer is
deterministic for a seed and call sequence, and its ``state_dict()`` is JSON-able (ints, lists
and numpy's PCG64 state), so that a restarted actor resumes exactly where it stopped.

- :class:`ReservoirBuffer`: classic reservoir sampling (Vitter's Algorithm R) over every row
  ever offered; each row seen so far is in the buffer with probability ``capacity / n``.
  The CLEAR paper's "Finetuning (reservoir)", ER and AGEM rows use it.
- :class:`BiasedReservoirBuffer`: bucket-level sampling biased toward the latest bucket
  ("Finetuning (biased reservoir)"); the rule is in the class docstring.
- :class:`ExperienceBalancedBuffer`: each bucket keeps ``1/t`` of the buffer (ER's memory).
- :class:`ClassBalancedBuffer`: GDumb's greedy class-balancing sampler (Prabhu et al., ECCV
  2020; avalanche ``GDumbPlugin``).

``BUFFERS`` maps a kind to its class; :func:`build_buffer` and :func:`buffer_from_state`
build one from a config or from a saved state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from raylab.errors import ConfigError


def _as_rows(ids: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Two equally long 1-D int64 arrays (lists, numpy arrays and torch tensors accepted)."""
    out = []
    for name, values in (("ids", ids), ("labels", labels)):
        if hasattr(values, "detach"):  # a torch tensor, without importing torch
            values = values.detach().cpu().numpy()
        arr = np.asarray(values)
        if arr.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
        out.append(arr.astype(np.int64, copy=False))
    if out[0].shape != out[1].shape:
        raise ValueError(f"ids and labels differ in length: {out[0].size} vs {out[1].size}")
    return out[0], out[1]


class ReplayBuffer:
    """What every buffer shares: the stored ids and labels, a seeded RNG and state I/O.

    Args:
        capacity: Most rows the buffer holds (>= 1).
        seed: Seed of the buffer's own ``numpy.random.Generator`` (PCG64).

    Raises:
        ConfigError: ``capacity`` < 1.
    """

    kind: ClassVar[str] = ""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if int(capacity) != capacity or capacity < 1:
            raise ConfigError(f"buffer capacity must be an integer >= 1, got {capacity!r}")
        self.capacity = int(capacity)
        self.seed = int(seed)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._ids: list[int] = []
        self._labels: list[int] = []

    def add(self, ids: Any, labels: Any) -> None:
        """Offer rows to the buffer (see each subclass for the rule)."""
        raise NotImplementedError

    def ids(self) -> np.ndarray:
        """The stored row ids (int64 copy, in slot order)."""
        return np.asarray(self._ids, dtype=np.int64)

    def labels(self) -> np.ndarray:
        """The labels of :meth:`ids`, slot by slot (int64 copy)."""
        return np.asarray(self._labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ids)

    def class_counts(self) -> dict[int, int]:
        """Stored rows per label."""
        labels, counts = np.unique(self.labels(), return_counts=True)
        return {int(k): int(v) for k, v in zip(labels, counts)}

    def sample(self, n: int, rng: np.random.Generator | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """``min(n, len(self))`` stored ``(ids, labels)`` drawn without replacement.

        Args:
            n: Rows wanted (>= 0).
            rng: Generator to draw with; None uses the buffer's own (which then also
                changes what later :meth:`add` calls do, deterministically).
        """
        if n < 0:
            raise ValueError(f"cannot sample {n} rows")
        rng = self._rng if rng is None else rng
        pick = rng.choice(len(self._ids), size=min(int(n), len(self._ids)), replace=False)
        return self.ids()[pick], self.labels()[pick]

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: config, contents and the RNG state."""
        return {"kind": self.kind, "capacity": self.capacity, "seed": self.seed,
                "ids": list(self._ids), "labels": list(self._labels),
                "rng": self._rng.bit_generator.state, **self._extra_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (e.g. after a JSON round trip).

        Raises:
            ValueError: The state is of another kind or capacity, or its ids and labels
                differ in length.
        """
        if state.get("kind") != self.kind or int(state.get("capacity", -1)) != self.capacity:
            raise ValueError(f"cannot load a {state.get('kind')!r} buffer state of capacity "
                             f"{state.get('capacity')!r} into a {self.kind!r} buffer of "
                             f"capacity {self.capacity}")
        ids, labels = _as_rows(state["ids"], state["labels"])
        if ids.size > self.capacity:
            raise ValueError(f"the state holds {ids.size} rows, more than the capacity "
                             f"{self.capacity}")
        self.seed = int(state["seed"])
        self._ids, self._labels = ids.tolist(), labels.tolist()
        self._rng = np.random.Generator(np.random.PCG64())
        self._rng.bit_generator.state = dict(state["rng"])
        self._load_extra_state(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(capacity={self.capacity}, stored={len(self)})"


class ReservoirBuffer(ReplayBuffer):
    """Uniform reservoir sampling over every row ever offered (Algorithm R).

    The ``m``-th row offered (0-based, over all :meth:`add` calls) fills a free slot while
    ``m < capacity``; after that it replaces a uniformly random slot with probability
    ``capacity / (m + 1)``. After ``n`` rows, every row offered is stored with probability
    ``capacity / n`` (all of them while ``n <= capacity``). Call :meth:`add` as often as
    convenient (per batch or per bucket).
    """

    kind = "reservoir"

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
        self.seen = 0

    def add(self, ids: Any, labels: Any) -> None:
        """Offer rows in the given order."""
        ids, labels = _as_rows(ids, labels)
        take = min(self.capacity - len(self._ids), ids.size)
        self._ids.extend(ids[:take].tolist())
        self._labels.extend(labels[:take].tolist())
        rest = ids.size - take
        if rest:
            positions = self.seen + take + np.arange(rest, dtype=np.int64)
            slots = self._rng.integers(0, positions + 1)  # uniform in [0, m]
            for k in np.flatnonzero(slots < self.capacity).tolist():
                slot = int(slots[k])
                self._ids[slot] = int(ids[take + k])
                self._labels[slot] = int(labels[take + k])
        self.seen += int(ids.size)

    def _extra_state(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.seen = int(state["seen"])


class BiasedReservoirBuffer(ReplayBuffer):
    """Bucket-level sampling that gives the newest bucket a fixed or ``1/t`` share.

    Each :meth:`add` call is **one whole bucket**. For the ``t``-th bucket (1-based) the
    share is ``s_t = 1`` for ``t = 1``, else ``alpha`` (fixed) or ``1 / t`` (``dynamic``).
    The bucket then takes ``n_new = min(len(bucket), max(round(s_t * capacity), free))``
    slots (``free``: the slots still empty), drawn uniformly from the bucket; the rows
    already stored keep ``min(stored, capacity - n_new)`` slots, drawn uniformly from them
    (random eviction). So a full buffer holds exactly ``round(alpha * capacity)`` rows of
    the latest bucket, and older bucket ``t - k`` keeps about ``alpha (1 - alpha)^k`` of the
    buffer: an exponential recency bias, as in Aggarwal's biased reservoir sampling (VLDB
    2006). With ``dynamic``, ``1/t`` keeps every bucket at about ``1/t`` of the buffer
    (equal shares for equally large buckets).

    ``METHODS.md`` names the policy but does not define it; the rule above is the brief's
    ("fixed alpha: each new bucket takes alpha of the buffer; dynamic: alpha = 1/t"). The
    CLEAR authors' script keeps each new row with probability ``alpha`` and evicts the
    **oldest** rows first; raylab evicts at random instead.

    Args:
        capacity: Most rows held.
        alpha: Share of the buffer for each new bucket in (0, 1]; required when fixed, and
            must be None with ``dynamic`` (which sets the share to ``1/t``).
        dynamic: Use ``1/t`` instead of a fixed ``alpha``.
        seed: RNG seed.

    Raises:
        ConfigError: A missing, extra or out-of-range ``alpha``.
    """

    kind = "biased_reservoir"

    def __init__(self, capacity: int, alpha: float | None = None, dynamic: bool = False,
                 seed: int = 0) -> None:
        super().__init__(capacity, seed)
        if dynamic and alpha is not None:
            raise ConfigError("a dynamic biased reservoir sets alpha = 1/t itself; leave "
                              f"alpha unset (got alpha={alpha!r})")
        if not dynamic and (alpha is None or not 0.0 < float(alpha) <= 1.0):
            raise ConfigError(f"a fixed biased reservoir needs alpha in (0, 1], got {alpha!r}")
        self.alpha = None if alpha is None else float(alpha)
        self.dynamic = bool(dynamic)
        self.buckets_added = 0
        self._buckets: list[int] = []

    def share(self, t: int) -> float:
        """The share of the buffer the ``t``-th bucket (1-based) takes."""
        if t <= 1:
            return 1.0
        return 1.0 / t if self.dynamic else float(self.alpha)

    def add(self, ids: Any, labels: Any) -> None:
        """Offer one whole bucket (call once per bucket)."""
        ids, labels = _as_rows(ids, labels)
        t = self.buckets_added + 1
        free = self.capacity - len(self._ids)
        quota = int(round(self.share(t) * self.capacity))
        n_new = min(ids.size, max(quota, free))
        n_old = min(len(self._ids), self.capacity - n_new)
        old = np.sort(self._rng.choice(len(self._ids), size=n_old, replace=False))
        new = np.sort(self._rng.choice(ids.size, size=n_new, replace=False))
        self._ids = [self._ids[i] for i in old.tolist()] + ids[new].tolist()
        self._labels = [self._labels[i] for i in old.tolist()] + labels[new].tolist()
        self._buckets = [self._buckets[i] for i in old.tolist()] + [self.buckets_added] * n_new
        self.buckets_added = t

    def buckets(self) -> np.ndarray:
        """The bucket index (0-based, in :meth:`add` order) of each stored row."""
        return np.asarray(self._buckets, dtype=np.int64)

    def _extra_state(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "dynamic": self.dynamic,
                "buckets_added": self.buckets_added, "buckets": list(self._buckets)}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        if bool(state["dynamic"]) != self.dynamic or state["alpha"] != self.alpha:
            raise ValueError(f"the state has alpha={state['alpha']!r}, "
                             f"dynamic={state['dynamic']!r}; this buffer alpha={self.alpha!r}, "
                             f"dynamic={self.dynamic!r}")
        self.buckets_added = int(state["buckets_added"])
        self._buckets = [int(b) for b in state["buckets"]]


class ClassBalancedBuffer(ReplayBuffer):
    """GDumb's greedy class-balancing sampler.

    Rows of one :meth:`add` call are offered one at a time in a random order (drawn from
    the buffer's RNG, so that a class-sorted bucket listing does not matter). A row of
    class ``y`` is stored if the buffer has a free slot. When it is full, with ``K`` the
    number of classes offered so far (including ``y``), the row is stored only if ``y``
    holds fewer than ``capacity / K`` rows; it then replaces a random row of the largest
    class (ties between largest classes broken at random). Otherwise it is dropped.
    """

    kind = "class_balanced"

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
        self._seen_classes: set[int] = set()
        self._slots: dict[int, list[int]] = {}  # class -> its slots in _ids

    def add(self, ids: Any, labels: Any) -> None:
        """Offer rows (in a random order)."""
        ids, labels = _as_rows(ids, labels)
        for k in self._rng.permutation(ids.size).tolist():
            self._offer(int(ids[k]), int(labels[k]))

    def _offer(self, row: int, y: int) -> None:
        self._seen_classes.add(y)
        if len(self._ids) < self.capacity:
            self._slots.setdefault(y, []).append(len(self._ids))
            self._ids.append(row)
            self._labels.append(y)
            return
        if len(self._slots.get(y, ())) >= self.capacity / len(self._seen_classes):
            return
        largest = max(len(s) for s in self._slots.values())
        tied = sorted(c for c, s in self._slots.items() if len(s) == largest)
        victim = tied[int(self._rng.integers(len(tied)))] if len(tied) > 1 else tied[0]
        slots = self._slots[victim]
        k = int(self._rng.integers(len(slots)))
        slot = slots[k]
        slots[k] = slots[-1]
        slots.pop()
        if not slots:
            del self._slots[victim]
        self._slots.setdefault(y, []).append(slot)
        self._ids[slot] = row
        self._labels[slot] = y

    def _extra_state(self) -> dict[str, Any]:
        return {"seen_classes": sorted(self._seen_classes),
                "slots": {str(c): list(s) for c, s in sorted(self._slots.items())}}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._seen_classes = {int(c) for c in state["seen_classes"]}
        self._slots = {int(c): [int(i) for i in s] for c, s in state["slots"].items()}


class ExperienceBalancedBuffer(BiasedReservoirBuffer):
    """Every bucket keeps about ``1/t`` of the buffer after ``t`` buckets: the dynamic
    biased reservoir under its own name. This is ER's memory, as avalanche's ``Replay``
    plugin keeps an experience-balanced buffer by default (the CLEAR authors ran ER with
    it); the eviction is uniform over stored rows, so the balance holds in expectation."""

    kind = "experience_balanced"

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, alpha=None, dynamic=True, seed=seed)


BUFFERS: dict[str, type[ReplayBuffer]] = {
    "reservoir": ReservoirBuffer,
    "biased_reservoir": BiasedReservoirBuffer,
    "experience_balanced": ExperienceBalancedBuffer,
    "class_balanced": ClassBalancedBuffer,
}


def build_buffer(kind: str, capacity: int, seed: int = 0, **kwargs: Any) -> ReplayBuffer:
    """The buffer registered as ``kind`` (``BUFFERS``), e.g. ``build_buffer("biased_reservoir",
    3300, alpha=0.5)``.

    Raises:
        ConfigError: Unknown kind, unknown keyword or a bad value.
    """
    if kind not in BUFFERS:
        raise ConfigError(f"unknown replay buffer {kind!r}; choose one of {sorted(BUFFERS)}")
    try:
        return BUFFERS[kind](capacity, seed=seed, **kwargs)
    except TypeError as err:
        raise ConfigError(f"bad parameters for the {kind!r} buffer: {err}") from None


def buffer_from_state(state: Mapping[str, Any]) -> ReplayBuffer:
    """A buffer rebuilt from its :meth:`ReplayBuffer.state_dict` (config included)."""
    kind = state.get("kind")
    extra = {}
    if kind == "biased_reservoir":
        extra = {"alpha": state["alpha"], "dynamic": state["dynamic"]}
    buffer = build_buffer(kind, int(state["capacity"]), seed=int(state["seed"]), **extra)
    buffer.load_state_dict(state)
    return buffer
