"""Classification metrics: confusion matrix, precision/recall/F1 and trial majority votes.

Definitions (per class ``k``, from the confusion matrix ``M``, rows = true, cols = predicted):
precision ``M[k, k] / sum(M[:, k])``, recall ``M[k, k] / sum(M[k, :])``, F1 their harmonic
mean, macro-F1 the unweighted mean of F1 over **all** classes in ``labels`` (also those absent
from the data). Every ratio whose denominator is zero is reported as 0.0 (as scikit-learn's
``zero_division=0``), including the accuracy of an empty input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from raylab.errors import DataError


def _as_int_array(values: Any, name: str) -> np.ndarray:
    """A 1-D int64 numpy array from a list, numpy array or torch tensor."""
    if hasattr(values, "detach"):  # torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or np.any(arr != np.round(arr)):
            raise DataError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_pair(y_true: Any, y_pred: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    t = _as_int_array(y_true, "y_true")
    p = _as_int_array(y_pred, "y_pred")
    if t.shape != p.shape:
        raise DataError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    for name, arr in (("y_true", t), ("y_pred", p)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise DataError(
                f"{name} holds class index {int(arr.min() if arr.min() < 0 else arr.max())}, "
                f"expected 0..{num_classes - 1}"
            )
    return t, p


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def confusion_counts(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """Confusion counts ``[C, C]`` int64, rows = true class, columns = predicted class."""
    t, p = _check_pair(y_true, y_pred, num_classes)
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def report_from_confusion(confusion: Any, labels: Sequence[str]) -> dict[str, Any]:
    """The :func:`classification_report` dict computed from confusion counts.

    Args:
        confusion: ``[C, C]`` counts, rows = true, columns = predicted.
        labels: ``C`` class names in index order.

    Raises:
        DataError: The shapes of ``confusion`` and ``labels`` disagree.
    """
    cm = np.asarray(confusion, dtype=np.int64)
    labels = [str(name) for name in labels]
    n = len(labels)
    if cm.shape != (n, n):
        raise DataError(f"confusion matrix has shape {cm.shape}, expected ({n}, {n}) for {labels}")
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    precision = _safe_div(tp, cm.sum(axis=0))
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {
        "accuracy": float(_safe_div(tp.sum(), cm.sum())),
        "precision": {k: float(v) for k, v in zip(labels, precision, strict=True)},
        "recall": {k: float(v) for k, v in zip(labels, recall, strict=True)},
        "f1": {k: float(v) for k, v in zip(labels, f1, strict=True)},
        "support": {k: int(v) for k, v in zip(labels, support, strict=True)},
        "macro_f1": float(f1.mean()) if n else 0.0,
        "confusion": cm.tolist(),
    }


def classification_report(y_true: Any, y_pred: Any, labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support, macro-F1 and the confusion matrix.

    Args:
        y_true: True class indices (list, numpy array or torch tensor).
        y_pred: Predicted class indices, same length.
        labels: Class names in index order; ``len(labels)`` is the number of classes.

    Returns:
        ``{"accuracy": float, "precision": {label: float}, "recall": {label: float},
        "f1": {label: float}, "support": {label: int}, "macro_f1": float,
        "confusion": [[int]]}`` with confusion rows = true, columns = predicted. A ratio with a
        zero denominator is 0.0 (see the module docstring).

    Raises:
        DataError: Inputs are not 1-D, differ in length or hold an index outside the labels.
    """
    return report_from_confusion(confusion_counts(y_true, y_pred, len(labels)), labels)


def row_normalise(confusion: Any) -> np.ndarray:
    """Divide each row by its total (float64); rows with a zero total stay zero."""
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.ndim != 2:
        raise DataError(f"confusion matrix must be 2-D, got shape {cm.shape}")
    return _safe_div(cm, cm.sum(axis=1, keepdims=True))


class ConfusionMatrix:
    """Streaming confusion matrix; its counts can be summed across workers.

    Example:
        >>> cm = ConfusionMatrix(3)
        >>> cm.update([0, 1, 2], [0, 2, 2])
        >>> cm.result(["N", "I", "E"])["accuracy"]  # doctest: +ELLIPSIS
        0.666...
    """

    def __init__(self, num_classes: int) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise DataError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self._counts = np.zeros((num_classes, num_classes), dtype=np.int64)

    @property
    def counts(self) -> np.ndarray:
        """A copy of the int64 counts ``[C, C]`` (rows = true, columns = predicted)."""
        return self._counts.copy()

    def update(self, y_true: Any, y_pred: Any) -> None:
        """Add a batch of true and predicted class indices."""
        self._counts += confusion_counts(y_true, y_pred, self.num_classes)

    def merge(self, counts: Any) -> None:
        """Add counts from another worker (an array ``[C, C]`` or a ConfusionMatrix)."""
        if isinstance(counts, ConfusionMatrix):
            counts = counts._counts
        other = np.asarray(counts)
        if other.shape != self._counts.shape:
            raise DataError(f"cannot merge counts of shape {other.shape} into {self._counts.shape}")
        self._counts += other.astype(np.int64)

    def result(self, labels: Sequence[str]) -> dict[str, Any]:
        """The :func:`classification_report` dict of everything seen."""
        return report_from_confusion(self._counts, labels)

    def reset(self) -> None:
        """Zero the counts."""
        self._counts[:] = 0


def _vote_table(trial_ids: Any, preds: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique trial ids and their per-class window counts ``[n_trials, C]``."""
    ids = _as_int_array(trial_ids, "trial_ids")
    p = _as_int_array(preds, "preds")
    if ids.shape != p.shape:
        raise DataError(f"trial_ids and preds differ in length: {ids.size} vs {p.size}")
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise DataError(f"preds hold a class index outside 0..{num_classes - 1}")
    unique, inverse = np.unique(ids, return_inverse=True)
    table = np.zeros((unique.size, num_classes), dtype=np.int64)
    np.add.at(table, (inverse.reshape(-1), p), 1)
    return unique, table


def majority_vote(trial_ids: Any, preds: Any, num_classes: int) -> dict[int, int]:
    """Each trial's label by majority vote of its windows' predicted classes.

    Ties are broken in favour of the lowest class index (``argmax`` returns the first
    maximum), so a trial with votes ``[2, 2, 1]`` is class 0.

    Args:
        trial_ids: Trial id of every window.
        preds: Predicted class index of every window.
        num_classes: Number of classes.

    Returns:
        ``{trial_id: predicted class}`` for every trial seen.
    """
    unique, table = _vote_table(trial_ids, preds, num_classes)
    return {int(t): int(c) for t, c in zip(unique, table.argmax(axis=1), strict=True)}


class TrialVotes:
    """Streaming per-trial window votes; trial-level accuracy by majority vote.

    ``counts`` maps trial id to its per-class window counts (int64 ``[C]``); workers' counts
    are combined with :meth:`merge`. Ties go to the lowest class index, as in
    :func:`majority_vote`.
    """

    def __init__(self, num_classes: int) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise DataError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self._counts: dict[int, np.ndarray] = {}

    @property
    def counts(self) -> dict[int, np.ndarray]:
        """A copy of ``{trial_id: int64 [C] window counts per predicted class}``."""
        return {t: c.copy() for t, c in sorted(self._counts.items())}

    def _add(self, trial: int, row: np.ndarray) -> None:
        if trial in self._counts:
            self._counts[trial] += row
        else:
            self._counts[trial] = row.astype(np.int64, copy=True)

    def update(self, trial_ids: Any, preds: Any) -> None:
        """Add the predicted classes of a batch of windows and their trial ids."""
        unique, table = _vote_table(trial_ids, preds, self.num_classes)
        for t, row in zip(unique.tolist(), table, strict=True):
            self._add(t, row)

    def merge(self, counts: TrialVotes | Mapping[int, Any]) -> None:
        """Add another worker's votes (a TrialVotes or its ``counts`` mapping)."""
        if isinstance(counts, TrialVotes):
            counts = counts._counts
        for t, row in counts.items():
            arr = np.asarray(row, dtype=np.int64)
            if arr.shape != (self.num_classes,):
                raise DataError(
                    f"trial {t}: vote counts have shape {arr.shape}, expected ({self.num_classes},)"
                )
            self._add(int(t), arr)

    def predictions(self) -> dict[int, int]:
        """``{trial_id: majority class}`` (ties to the lowest class index)."""
        return {t: int(np.argmax(c)) for t, c in sorted(self._counts.items())}

    def result(self, trial_labels: Mapping[int, int]) -> dict[str, Any]:
        """Trial-level accuracy over the trials that received votes.

        Args:
            trial_labels: True class of each trial; may hold trials without votes (ignored).

        Returns:
            ``{"accuracy": float, "n_trials": int, "n_correct": int,
            "predicted": {trial_id: int}, "confusion": [[int]]}`` (trial-level confusion,
            rows = true, columns = predicted). Accuracy is 0.0 when no trial was voted.

        Raises:
            DataError: A voted trial has no label.
        """
        predicted = self.predictions()
        unlabeled = [t for t in predicted if t not in trial_labels]
        if unlabeled:
            raise DataError(f"trials {unlabeled[:10]} received votes but have no true label")
        true = [int(trial_labels[t]) for t in predicted]
        cm = confusion_counts(true, list(predicted.values()), self.num_classes)
        n_correct = int(np.trace(cm))
        return {
            "accuracy": float(_safe_div(n_correct, len(predicted))),
            "n_trials": len(predicted),
            "n_correct": n_correct,
            "predicted": predicted,
            "confusion": cm.tolist(),
        }

    def reset(self) -> None:
        """Forget all votes."""
        self._counts.clear()
