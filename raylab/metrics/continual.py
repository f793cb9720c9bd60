"""CLEAR's continual-learning metrics from the accuracy matrix ``R`` (numpy only, no torch).

Lin et al., "The CLEAR Benchmark: Continual LEArning on Real-World Imagery", NeurIPS 2021
Datasets and Benchmarks; checked against avalanche's ``CLEARMetric``
(``avalanche/benchmarks/classic/clear.py``), whose definitions agree with the paper and with
raylab's ``METHODS.md`` section 3.

``R[i][j]`` is the accuracy (a fraction in [0, 1]) on the test data of bucket ``j`` after
training through bucket ``i``; ``T`` buckets give a ``T x T`` matrix. Every metric is a
**plain average** of a set of entries (not a difference to a baseline, unlike the BWT/FWT of
Lopez-Paz & Ranzato 2017):

- in-domain accuracy   = mean of ``R[i][i]`` over ``0 <= i < T`` (the diagonal, ``T`` terms);
- next-domain accuracy = mean of ``R[i][i+1]`` over ``0 <= i < T-1`` (superdiagonal, ``T-1``);
- accuracy             = mean of ``R[i][j]`` over ``i >= j`` (lower triangle and diagonal,
  ``T(T+1)/2`` terms);
- backward transfer    = mean of ``R[i][j]`` over ``i > j`` (strict lower, ``T(T-1)/2``);
- forward transfer     = mean of ``R[i][j]`` over ``i < j`` (strict upper, ``T(T-1)/2``).

Example (``METHODS.md``): ``R = [[.5,.4,.3],[.6,.7,.5],[.55,.65,.8]]`` gives 0.6667, 0.45,
0.6333, 0.60 and 0.40.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

METRIC_NAMES = ("in_domain", "next_domain", "accuracy", "backward_transfer",
                "forward_transfer")


def _check_value(value: Any, where: str) -> float:
    try:
        acc = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"accuracy {where} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= acc <= 1.0:  # also rejects NaN
        raise ValueError(f"accuracy {where} must be in [0, 1] (a fraction, not a percentage), "
                         f"got {value!r}")
    return acc


def _as_matrix(R: Any) -> np.ndarray:
    """``R`` as a validated float64 ``[T, T]`` array."""
    rows = None
    if isinstance(R, np.ndarray) and R.ndim == 2:
        rows = R.tolist()
    elif isinstance(R, (list, tuple)) and all(isinstance(r, (list, tuple, np.ndarray))
                                              for r in R):
        rows = [list(r) for r in R]
    if rows is None:
        shape = getattr(R, "shape", None)
        raise ValueError(f"the accuracy matrix must be a 2-D T x T array or list of lists, got "
                         f"{type(R).__name__}" + (f" of shape {tuple(shape)}" if shape else ""))
    t = len(rows)
    if t < 2:
        raise ValueError(f"the accuracy matrix needs T >= 2 buckets, got T={t}")
    for i, row in enumerate(rows):
        if len(row) != t:
            raise ValueError(f"the accuracy matrix must be square: row {i} has {len(row)} "
                             f"entries, expected {t}")
    return np.array([[_check_value(v, f"R[{i}][{j}]") for j, v in enumerate(row)]
                     for i, row in enumerate(rows)], dtype=np.float64)


def clear_metrics(R: Any) -> dict[str, float]:
    """The five CLEAR metrics of an accuracy matrix (formulas in the module docstring).

    Args:
        R: ``T x T`` accuracies in [0, 1] (list of lists or ndarray); ``R[i][j]`` is the
            accuracy on bucket ``j`` after training through bucket ``i``.

    Returns:
        ``{"in_domain", "next_domain", "accuracy", "backward_transfer",
        "forward_transfer"}`` as floats.

    Raises:
        ValueError: ``R`` is not square, has fewer than 2 buckets, or holds a value that is
            missing, not a number or outside [0, 1].
    """
    r = _as_matrix(R)
    t = r.shape[0]
    lower = np.tril_indices(t, k=-1)
    upper = np.triu_indices(t, k=1)
    diag = np.diagonal(r)
    return {
        "in_domain": float(diag.mean()),
        "next_domain": float(np.diagonal(r, offset=1).mean()),
        "accuracy": float(r[np.tril_indices(t)].mean()),
        "backward_transfer": float(r[lower].mean()),
        "forward_transfer": float(r[upper].mean()),
    }


class AccuracyMatrix:
    """The accuracy matrix ``R`` filled entry by entry while a stream is trained.

    ``set(i, j, acc)`` records the accuracy on bucket ``j`` after training through bucket
    ``i``; unset entries are ``None``. ``to_list()`` / ``from_list()`` give a JSON-able form
    (a list of rows with ``None`` holes), so that the stream actor can persist it and a
    restarted actor can resume. ``result()`` is :func:`clear_metrics` of the full matrix.

    Args:
        num_buckets: ``T`` (>= 2).

    Raises:
        ValueError: ``num_buckets`` < 2.
    """

    def __init__(self, num_buckets: int) -> None:
        if int(num_buckets) != num_buckets or num_buckets < 2:
            raise ValueError(f"an accuracy matrix needs num_buckets >= 2, got {num_buckets!r}")
        self.num_buckets = int(num_buckets)
        self.reset()

    def reset(self) -> None:
        """Forget every entry."""
        self._rows: list[list[float | None]] = [[None] * self.num_buckets
                                                for _ in range(self.num_buckets)]

    def _index(self, value: int, name: str) -> int:
        if int(value) != value or not 0 <= value < self.num_buckets:
            raise ValueError(f"{name} must be a bucket index in 0..{self.num_buckets - 1}, "
                             f"got {value!r}")
        return int(value)

    def set(self, i: int, j: int, acc: float) -> None:
        """Record the accuracy on bucket ``j`` after training through bucket ``i``."""
        i, j = self._index(i, "i"), self._index(j, "j")
        self._rows[i][j] = _check_value(acc, f"R[{i}][{j}]")

    update = set  # the update/result/reset surface of raylab's metrics

    def get(self, i: int, j: int) -> float | None:
        """``R[i][j]``, or None when not recorded yet."""
        return self._rows[self._index(i, "i")][self._index(j, "j")]

    def row(self, i: int) -> list[float | None]:
        """A copy of row ``i`` (accuracies on every bucket after training through ``i``)."""
        return list(self._rows[self._index(i, "i")])

    def missing(self) -> list[tuple[int, int]]:
        """The ``(i, j)`` entries not recorded yet, row by row."""
        return [(i, j) for i, row in enumerate(self._rows) for j, v in enumerate(row)
                if v is None]

    def complete(self) -> bool:
        """True when all ``T x T`` entries are recorded."""
        return all(v is not None for row in self._rows for v in row)

    def result(self) -> dict[str, float]:
        """:func:`clear_metrics` of the matrix.

        Raises:
            ValueError: Some entries are missing (the first few are named).
        """
        missing = self.missing()
        if missing:
            shown = ", ".join(f"R[{i}][{j}]" for i, j in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(f"the accuracy matrix is incomplete: {shown}{more} not recorded")
        return clear_metrics(self._rows)

    def to_list(self) -> list[list[float | None]]:
        """The rows as a JSON-able list of lists (``None`` for unrecorded entries)."""
        return [list(row) for row in self._rows]

    @classmethod
    def from_list(cls, rows: Sequence[Sequence[float | None]]) -> AccuracyMatrix:
        """Rebuild a matrix from :meth:`to_list` output (e.g. after ``json.loads``).

        Raises:
            ValueError: Not square, fewer than 2 rows, or a value outside [0, 1].
        """
        rows = [list(r) for r in rows]
        matrix = cls(len(rows))
        for i, row in enumerate(rows):
            if len(row) != matrix.num_buckets:
                raise ValueError(f"accuracy matrix row {i} has {len(row)} entries, expected "
                                 f"{matrix.num_buckets}")
            for j, value in enumerate(row):
                if value is not None:
                    matrix.set(i, j, value)
        return matrix

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AccuracyMatrix):
            return NotImplemented
        return self._rows == other._rows

    def __repr__(self) -> str:
        done = sum(v is not None for row in self._rows for v in row)
        return f"AccuracyMatrix(num_buckets={self.num_buckets}, recorded={done})"
