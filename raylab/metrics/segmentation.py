"""Semantic segmentation scores: pixel confusion, mIoU and pixel accuracy, with Hungarian matching.

Supervised scoring (a linear probe, a segmentation head) compares predicted class ids with the
true classes directly. Unsupervised scoring (STEGO, Hamilton et al., "Unsupervised Semantic
Segmentation by Distilling Feature Correspondences", ICLR 2022) first assigns every predicted
cluster id to a class: the assignment is the one-to-one matching that maximises the matched
pixels, found by the Hungarian algorithm on the cluster x class confusion matrix
(``scipy.optimize.linear_sum_assignment(..., maximize=True)``), as in the reference
``UnsupervisedMetrics`` (mhamilton723/STEGO ``src/utils.py``).

Definitions, from a square confusion ``M`` with rows = predicted class and columns = true
class (every count is of pixels whose target is not ``ignore_index``):

- ``tp = diag(M)``, ``fp = row sums - tp``, ``fn = column sums - tp``;
- ``IoU_k = tp_k / (tp_k + fp_k + fn_k)``, NaN for a class absent from both the prediction
  and the target (0 / 0); ``mIoU`` is the mean over the classes whose IoU is not NaN;
- pixel ``accuracy = sum(tp) / (number of scored pixels)``.

All scores are percentages (x100), as the STEGO tables report them. With no scored pixel at
all, ``miou`` and ``accuracy`` are NaN.

More clusters than classes (``n_clusters > n_classes``): the Hungarian matching assigns
``n_classes`` clusters; the others are *unassigned* (``-1`` in the assignment) and every pixel
they hold counts as wrong: a false negative of its true class (it enlarges that class's union
and the accuracy's denominator) and a false positive of no class. This differs from the
reference in two ways, both deliberate: STEGO's ``update`` drops the pixels of cluster ids
``>= n_classes`` before counting them, and its ``compute`` scores the unassigned clusters as one
extra "junk" class whose IoU (0) enters the mean. Here no pixel is dropped and the mean runs
over the ``n_classes`` true classes only. With ``n_clusters == n_classes`` the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from raylab.errors import DataError


class SegmentationLabelError(DataError, ValueError):
    """A predicted or true label outside its range (a :class:`DataError` and a ValueError)."""


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _is_tensor(values: Any) -> bool:
    """True for a torch tensor (duck-typed, so that this module imports without torch)."""
    return hasattr(values, "detach") and hasattr(values, "device")


def _as_numpy_ids(values: Any, name: str) -> np.ndarray:
    """An int64 numpy array of label ids from a list, numpy array or torch tensor."""
    if _is_tensor(values):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        if not np.issubdtype(arr.dtype, np.floating) or np.any(arr != np.round(arr)):
            raise SegmentationLabelError(f"{name} must hold integer label ids, got dtype "
                                         f"{arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _as_counts(confusion: Any, name: str = "confusion") -> np.ndarray:
    """A 2-D int64 count matrix from a numpy array, a list or a (possibly float) tensor."""
    if _is_tensor(confusion):
        confusion = confusion.detach().cpu().numpy()
    arr = np.asarray(confusion)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D count matrix, got shape {tuple(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or np.any(arr != np.round(arr)):
            raise ValueError(f"{name} must hold whole pixel counts, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} holds a negative count {arr.min()}")
    return arr.astype(np.int64)


def _first_bad(values: Any, bad: Any) -> int:
    """The first value where ``bad`` is true (numpy or torch)."""
    return int(values[bad].reshape(-1)[0])


def _confusion_torch(pred: Any, target: Any, n_pred: int, n_classes: int,
                     ignore_index: int | None) -> np.ndarray:
    """:func:`confusion_matrix` on the tensors' device; only the counts leave it."""
    import torch

    if pred.is_floating_point() or pred.is_complex():
        raise SegmentationLabelError(f"pred must hold integer label ids, got dtype {pred.dtype}")
    if target.is_floating_point() or target.is_complex():
        raise SegmentationLabelError(
            f"target must hold integer label ids, got dtype {target.dtype}")
    p = pred.detach().reshape(-1).long()
    t = target.detach().reshape(-1).to(device=p.device, dtype=torch.long)
    bad_p = (p < 0) | (p >= n_pred)
    if bool(bad_p.any()):
        raise SegmentationLabelError(
            f"pred holds id {_first_bad(p, bad_p)}, expected 0..{n_pred - 1} (n_pred={n_pred})")
    valid = t != ignore_index if ignore_index is not None else torch.ones_like(t, dtype=torch.bool)
    bad_t = valid & ((t < 0) | (t >= n_classes))
    if bool(bad_t.any()):
        raise SegmentationLabelError(
            f"target holds class {_first_bad(t, bad_t)}, expected 0..{n_classes - 1} or "
            f"ignore_index {ignore_index}")
    size = n_pred * n_classes
    # Ignored pixels go to one extra bin that is dropped (no boolean indexing on the device).
    index = torch.where(valid, p * n_classes + t, torch.full_like(p, size))
    counts = torch.bincount(index, minlength=size + 1)[:size]
    return counts.cpu().numpy().astype(np.int64).reshape(n_pred, n_classes)


def confusion_matrix(pred: Any, target: Any, n_pred: int, n_classes: int,
                     ignore_index: int | None = 255) -> np.ndarray:
    """Pixel counts ``[n_pred, n_classes]``: ``counts[p, t]`` pixels predicted ``p`` of class ``t``.

    Pixels whose target equals ``ignore_index`` are not counted. When both inputs are torch
    tensors the counting runs on their device (``torch.bincount``) and only the counts come
    back; otherwise the inputs become numpy arrays and ``np.bincount`` counts them.

    Args:
        pred: Predicted class or cluster ids (integer array or tensor, any shape).
        target: True class ids, same shape as ``pred``; ``ignore_index`` marks void pixels.
        n_pred: Number of predicted ids (classes, or clusters for unsupervised scoring).
        n_classes: Number of true classes.
        ignore_index: Target value of void pixels, or None when every pixel counts.

    Returns:
        int64 numpy array ``[n_pred, n_classes]`` (rows = predicted, columns = true).

    Raises:
        ValueError: ``n_pred`` or ``n_classes`` below 1, or the shapes differ.
        SegmentationLabelError: (a ValueError) a ``pred`` value, on any pixel, outside
            ``0..n_pred-1``, or a target value that is neither in ``0..n_classes-1`` nor
            ``ignore_index``; the message names the value and the range.
    """
    n_pred = _check_count(n_pred, "n_pred")
    n_classes = _check_count(n_classes, "n_classes")
    pred_shape = tuple(getattr(pred, "shape", np.shape(pred)))
    target_shape = tuple(getattr(target, "shape", np.shape(target)))
    if pred_shape != target_shape:
        raise ValueError(f"pred and target differ in shape: {pred_shape} vs {target_shape}")
    if _is_tensor(pred) and _is_tensor(target):
        return _confusion_torch(pred, target, n_pred, n_classes, ignore_index)
    p = _as_numpy_ids(pred, "pred").reshape(-1)
    t = _as_numpy_ids(target, "target").reshape(-1)
    bad_p = (p < 0) | (p >= n_pred)
    if bad_p.any():
        raise SegmentationLabelError(
            f"pred holds id {_first_bad(p, bad_p)}, expected 0..{n_pred - 1} (n_pred={n_pred})")
    valid = t != ignore_index if ignore_index is not None else np.ones(t.shape, dtype=bool)
    bad_t = valid & ((t < 0) | (t >= n_classes))
    if bad_t.any():
        raise SegmentationLabelError(
            f"target holds class {_first_bad(t, bad_t)}, expected 0..{n_classes - 1} or "
            f"ignore_index {ignore_index}")
    size = n_pred * n_classes
    index = np.where(valid, p * n_classes + t, size)  # void pixels to a dropped extra bin
    counts = np.bincount(index, minlength=size + 1)[:size]
    return counts.astype(np.int64).reshape(n_pred, n_classes)


def hungarian_match(confusion: Any) -> np.ndarray:
    """The class assigned to each predicted cluster by a maximum-weight one-to-one matching.

    ``linear_sum_assignment(confusion, maximize=True)``: the matching maximises the number of
    pixels whose cluster is assigned to their true class. With more clusters than classes,
    ``n_pred - n_classes`` clusters stay unassigned (``-1``); their pixels count as errors in
    :func:`unsupervised_miou` (STEGO leaves them out of the matching too; no majority-class
    fallback is applied). With fewer clusters than classes, some classes get no cluster.

    Args:
        confusion: ``[n_pred, n_classes]`` counts, rows = cluster, columns = true class.

    Returns:
        int64 array ``[n_pred]``: the class of each cluster, or -1 for an unassigned one.
    """
    cm = _as_counts(confusion)
    rows, cols = linear_sum_assignment(cm, maximize=True)
    assignment = np.full(cm.shape[0], -1, dtype=np.int64)
    assignment[rows] = cols
    return assignment


def _percent(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan, dtype=np.float64)
    np.divide(100.0 * num, den, out=out, where=den != 0)
    return out


def scores_from_confusion(confusion: Any, unmatched: Any = None) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU (percent) from a square confusion matrix.

    Args:
        confusion: ``[n, n]`` counts, rows = predicted class, columns = true class.
        unmatched: Optional ``[n]`` counts of pixels of each true class that were predicted as
            no class (unassigned clusters); they are false negatives of their class and
            count in the accuracy's denominator.

    Returns:
        ``{"miou": float, "accuracy": float, "iou": list[float], "pixels": int}`` with
        ``iou[k]`` NaN for a class absent from both the prediction and the target, ``miou``
        the mean of the non-NaN IoUs, ``pixels`` the number of scored pixels. ``miou`` and
        ``accuracy`` are NaN when no class appears at all.

    Raises:
        ValueError: ``confusion`` is not square, or ``unmatched`` does not have ``n`` entries.
    """
    cm = _as_counts(confusion)
    n = cm.shape[0]
    if cm.shape != (n, n):
        raise ValueError(f"confusion must be square, got shape {cm.shape}")
    extra = np.zeros(n, dtype=np.int64)
    if unmatched is not None:
        extra = _as_counts(np.reshape(np.asarray(unmatched), (1, -1)), "unmatched")[0]
        if extra.shape != (n,):
            raise ValueError(f"unmatched must have {n} entries, got {extra.shape[0]}")
    tp = np.diag(cm)
    fp = cm.sum(axis=1) - tp
    fn = cm.sum(axis=0) - tp + extra
    iou = _percent(tp, tp + fp + fn)
    present = ~np.isnan(iou)
    pixels = int(cm.sum() + extra.sum())
    return {
        "miou": float(iou[present].mean()) if present.any() else float("nan"),
        "accuracy": float(_percent(tp.sum(), pixels)),
        "iou": [float(v) for v in iou],
        "pixels": pixels,
    }


def _matched_scores(confusion: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Hungarian-match a ``[n_clusters, n_classes]`` confusion and score it."""
    assignment = hungarian_match(confusion)
    matched = np.zeros((n_classes, n_classes), dtype=np.int64)
    assigned = assignment >= 0
    np.add.at(matched, assignment[assigned], confusion[assigned])
    unmatched = confusion[~assigned].sum(axis=0)
    scores = scores_from_confusion(matched, unmatched)
    scores["assignment"] = [int(a) for a in assignment]
    return scores


def unsupervised_miou(pred: Any, target: Any, n_classes: int, ignore_index: int | None = 255,
                      n_clusters: int | None = None) -> dict[str, Any]:
    """STEGO's unsupervised scores: Hungarian-match cluster ids to classes, then mIoU/accuracy.

    Args:
        pred: Cluster ids ``0..n_clusters-1`` (integer array or tensor, any shape).
        target: True class ids of the same shape; ``ignore_index`` marks void pixels.
        n_classes: Number of true classes.
        ignore_index: Target value of void pixels (not scored), or None.
        n_clusters: Number of cluster ids; defaults to ``n_classes``.

    Returns:
        The :func:`scores_from_confusion` dict (percent) of the matched ``[n_classes,
        n_classes]`` confusion, plus ``"assignment"``: the class of each cluster, -1 for an
        unassigned one (whose pixels count as false negatives of their true class).

    Raises:
        ValueError: As :func:`confusion_matrix`.
    """
    n_clusters = n_classes if n_clusters is None else n_clusters
    cm = confusion_matrix(pred, target, n_clusters, n_classes, ignore_index)
    return _matched_scores(cm, n_classes)


def supervised_miou(pred: Any, target: Any, n_classes: int,
                    ignore_index: int | None = 255) -> dict[str, Any]:
    """mIoU and pixel accuracy of predicted class ids, without matching (e.g. a linear probe).

    Args:
        pred: Predicted class ids ``0..n_classes-1`` (integer array or tensor, any shape).
        target: True class ids of the same shape; ``ignore_index`` marks void pixels.
        n_classes: Number of classes.
        ignore_index: Target value of void pixels (not scored), or None.

    Returns:
        The :func:`scores_from_confusion` dict (percent).

    Raises:
        ValueError: As :func:`confusion_matrix`.
    """
    return scores_from_confusion(confusion_matrix(pred, target, n_classes, n_classes,
                                                  ignore_index))


class SegmentationMetric:
    """Streaming pixel confusion for segmentation, supervised or unsupervised (Hungarian).

    Distributed use: every worker calls :meth:`update` on its batches, the workers all-reduce
    (sum) ``metric.confusion`` as a tensor, and each calls ``result(summed_confusion)``. The
    Hungarian matching must run on the summed counts (not per worker), which this guarantees.
    :meth:`merge` adds another worker's counts in place instead.

    Args:
        n_classes: Number of true classes.
        n_pred: Number of predicted ids (clusters when unsupervised); defaults to
            ``n_classes`` and must equal it when supervised.
        unsupervised: Match predicted ids to classes by the Hungarian algorithm.
        ignore_index: Target value of void pixels, or None.

    Example:
        >>> m = SegmentationMetric(2, unsupervised=True)
        >>> m.update([[1, 1], [0, 0]], [[0, 0], [1, 255]])
        >>> m.result()["miou"], m.result()["assignment"]
        (100.0, [1, 0])
    """

    def __init__(self, n_classes: int, n_pred: int | None = None, unsupervised: bool = False,
                 ignore_index: int | None = 255) -> None:
        self.n_classes = _check_count(n_classes, "n_classes")
        self.n_pred = self.n_classes if n_pred is None else _check_count(n_pred, "n_pred")
        if not unsupervised and self.n_pred != self.n_classes:
            raise ValueError(f"supervised scoring needs n_pred == n_classes, got "
                             f"{self.n_pred} and {self.n_classes}")
        self.unsupervised = bool(unsupervised)
        self.ignore_index = ignore_index
        self._counts = np.zeros((self.n_pred, self.n_classes), dtype=np.int64)

    @property
    def confusion(self) -> np.ndarray:
        """A copy of the int64 counts ``[n_pred, n_classes]`` (rows = predicted, cols = true)."""
        return self._counts.copy()

    def update(self, pred: Any, target: Any) -> None:
        """Add a batch of predicted ids and true classes (any equal shapes)."""
        self._counts += confusion_matrix(pred, target, self.n_pred, self.n_classes,
                                         self.ignore_index)

    def _check_shape(self, counts: np.ndarray) -> np.ndarray:
        if counts.shape != self._counts.shape:
            raise ValueError(f"confusion of shape {counts.shape} does not fit this metric's "
                             f"{self._counts.shape}")
        return counts

    def merge(self, other: SegmentationMetric | Any) -> None:
        """Add another worker's counts (a SegmentationMetric, an array or a tensor)."""
        if isinstance(other, SegmentationMetric):
            other = other._counts
        self._counts += self._check_shape(_as_counts(other))

    def result(self, confusion: Any = None) -> dict[str, Any]:
        """Scores of everything seen, or of ``confusion`` (e.g. the all-reduced counts).

        Args:
            confusion: Counts ``[n_pred, n_classes]`` to score instead of this worker's own
                (array or tensor, float allowed if whole); None scores :attr:`confusion`.

        Returns:
            The :func:`supervised_miou` dict, or when unsupervised the
            :func:`unsupervised_miou` dict (with ``"assignment"``).
        """
        cm = self._counts if confusion is None else self._check_shape(_as_counts(confusion))
        if self.unsupervised:
            return _matched_scores(cm, self.n_classes)
        return scores_from_confusion(cm)

    def reset(self) -> None:
        """Zero the counts."""
        self._counts[:] = 0


def per_class_table(scores: dict[str, Any], class_names: Sequence[str]) -> list[tuple[str, float]]:
    """``(class name, IoU percent)`` rows for a report, NaN kept for absent classes.

    Args:
        scores: A dict with ``"iou"`` (from any scoring function here).
        class_names: One name per class, in index order.

    Raises:
        ValueError: The number of names differs from the number of IoUs.
    """
    iou = list(scores["iou"])
    names = [str(name) for name in class_names]
    if len(names) != len(iou):
        raise ValueError(f"{len(names)} class names for {len(iou)} per-class IoUs")
    return [(name, float(v)) for name, v in zip(names, iou, strict=True)]
