"""COCO box and mask AP with pycocotools' ``COCOeval`` (the reference implementation).

Detections are COCO result dictionaries: ``image_id``, ``category_id`` (the COCO id, as in
the ground truth), ``bbox`` (``[x, y, w, h]`` absolute pixels), ``score`` and, for
``segm``, ``segmentation`` (compressed RLE ``{"size": [h, w], "counts": str | bytes}``).
As in detectron2, boxes are evaluated without the masks and masks without the boxes, so that
each result's ``area`` comes from what is evaluated.

Values are fractions in [0, 1], not percent. Where COCOeval reports -1 (no ground truth in
that size range, e.g. no small objects), the value is NaN.

AP by class frequency (LVIS-style rare / common / frequent): :func:`category_frequencies`
counts each category in the *training* ground truth, :func:`frequency_bins` groups the
categories by those counts, and ``coco_eval(..., frequency_bins=...)`` adds ``AP_<bin>``,
the mean per-category AP over each group.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from raylab.errors import DataError

IOU_TYPES = ("bbox", "segm")
#: Names of the first six entries of ``COCOeval.stats``.
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
#: Default frequency bins: name -> inclusive ``(lo, hi)`` range of a category's training
#: count (``hi`` None: no upper bound). LVIS bins by the number of *training images* a
#: category appears in (rare 1-10, common 11-100, frequent >100); raylab counts training
#: *instances* (annotations) by default, so pass ``count="images"`` to
#: :func:`category_frequencies` to reproduce LVIS exactly. Read-only; copy it to change it.
FREQUENCY_BINS: Mapping[str, tuple[int, int | None]] = MappingProxyType(
    {"rare": (1, 10), "common": (11, 100), "frequent": (101, None)})
#: What :func:`category_frequencies` can count.
FREQUENCY_COUNTS = ("instances", "images")


def _quiet() -> contextlib.AbstractContextManager:
    """Swallow pycocotools' prints."""
    return contextlib.redirect_stdout(io.StringIO())


def load_ground_truth(gt: str | os.PathLike | dict[str, Any]) -> Any:
    """A ``pycocotools.coco.COCO`` of a ground-truth JSON file or an already loaded dict.

    Raises:
        DataError: The file is missing or not a COCO ground-truth JSON.
    """
    from pycocotools.coco import COCO

    if isinstance(gt, dict):
        dataset = gt
    else:
        try:
            with open(gt, encoding="utf-8") as fh:
                dataset = json.load(fh)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read the ground-truth JSON ({exc}); expected a COCO "
                            "instances JSON", path=gt) from None
    if not (isinstance(dataset, dict) and all(
            isinstance(dataset.get(k), list) for k in ("images", "annotations", "categories"))):
        raise DataError("expected a COCO ground-truth JSON with images, annotations and "
                        "categories lists", path=None if isinstance(gt, dict) else gt)
    coco = COCO()
    coco.dataset = dataset
    with _quiet():
        coco.createIndex()
    return coco


def category_frequencies(train_gt: str | os.PathLike | dict[str, Any],
                         count: str = "instances") -> dict[int, int]:
    """How often each category occurs in the training ground truth.

    Args:
        train_gt: The *training* ground-truth JSON (a path, or its loaded dictionary): the
            frequency of a category is how much the model saw of it, not how much the
            evaluation split holds.
        count: ``"instances"``: the number of annotations of the category, crowd regions
            (``iscrowd=1``) excluded since COCOeval ignores them too. ``"images"``: the
            number of distinct images with at least one such annotation (LVIS' definition).

    Returns:
        ``{category id: count}`` for every category of the JSON, 0 for those without
        (non-crowd) annotations.

    Raises:
        DataError: Unreadable ground truth, or an annotation of a category it does not
            list.
        ValueError: An unknown ``count``.
    """
    if count not in FREQUENCY_COUNTS:
        raise ValueError(f"count: unknown {count!r}; expected one of {FREQUENCY_COUNTS}")
    coco = load_ground_truth(train_gt)
    path = None if isinstance(train_gt, dict) else train_gt
    images: dict[int, set[int]] = {int(c["id"]): set() for c in coco.dataset["categories"]}
    instances = dict.fromkeys(images, 0)
    for ann in coco.dataset["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        category = int(ann["category_id"])
        if category not in instances:
            raise DataError(f"annotation {ann.get('id')} has category id {category}, which "
                            "the categories list does not hold", path=path)
        instances[category] += 1
        images[category].add(int(ann["image_id"]))
    if count == "images":
        return {k: len(v) for k, v in images.items()}
    return instances


def _check_bins(bins: Mapping[str, tuple[int, int | None]]) -> list[tuple[int, int | None, str]]:
    """``bins`` as ``(lo, hi, name)`` sorted by ``lo``, after checking them.

    Raises:
        ValueError: A bin with an empty name, a bad range, or overlapping another.
    """
    ranges: list[tuple[int, int | None, str]] = []
    for name, bounds in bins.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"frequency bin {name!r}: the name must be a non-empty string")
        try:
            lo, hi = bounds
        except (TypeError, ValueError):
            raise ValueError(f"frequency bin {name!r}: expected a (lo, hi) pair, got "
                             f"{bounds!r}") from None
        # bool is an int; a True bound is a mistake, not 1.
        if not isinstance(lo, int) or isinstance(lo, bool) or lo < 0:
            raise ValueError(f"frequency bin {name!r}: lo must be an integer >= 0, got {lo!r}")
        if hi is not None and (not isinstance(hi, int) or isinstance(hi, bool) or hi < lo):
            raise ValueError(f"frequency bin {name!r}: hi must be None or an integer >= lo "
                             f"({lo}), got {hi!r}")
        ranges.append((lo, hi, name))
    ranges.sort(key=lambda r: r[0])
    for (_, hi, name), (lo, _, other) in zip(ranges, ranges[1:]):
        # Sorted by lo, a bin overlaps the next one iff it reaches the next one's lo.
        if hi is None or hi >= lo:
            raise ValueError(f"frequency bin {name!r} overlaps frequency bin {other!r}")
    return ranges


def frequency_bins(frequencies: Mapping[int, int],
                   bins: Mapping[str, tuple[int, int | None]] = FREQUENCY_BINS,
                   ) -> dict[str, list[int]]:
    """Categories grouped by frequency, for ``coco_eval(..., frequency_bins=...)``.

    Args:
        frequencies: ``{category id: count}``, e.g. from :func:`category_frequencies`.
        bins: ``{name: (lo, hi)}``, inclusive ranges of counts (``hi`` None: no upper
            bound) that must not overlap; :data:`FREQUENCY_BINS` by default.

    Returns:
        ``{name: sorted category ids}`` for every bin, in the order of ``bins`` (a bin may
        be empty). A category whose count is in no range (with the default bins, one never
        seen in training: count 0) is in no bin.

    Raises:
        ValueError: A bin with an empty name, a bad range (``lo`` not an integer >= 0,
            ``hi`` neither None nor an integer >= ``lo``), or overlapping another.
    """
    ranges = _check_bins(bins)
    out: dict[str, list[int]] = {name: [] for name in bins}
    for category, n in frequencies.items():
        for lo, hi, name in ranges:
            if lo <= n and (hi is None or n <= hi):
                out[name].append(int(category))
                break
    return {name: sorted(ids) for name, ids in out.items()}


def _bin_ap(evaluator: Any, categories: Iterable[int]) -> float:
    """Mean per-category AP (IoU .50:.95, area all, 100 detections) over ``categories``.

    As ``COCOeval.summarize`` computes ``stats[0]``, restricted to these categories'
    columns of ``eval["precision"]`` (``[T, R, K, A, M]``, -1 where a category has no
    ground truth). A category with ground truth has all ``T x R`` entries set, so the mean
    over them is also the mean of the per-category APs. Categories that are not in the
    ground truth, or have none in the evaluated images, do not count; NaN if none is left.
    """
    import numpy as np

    params = evaluator.params
    index = {int(c): k for k, c in enumerate(params.catIds)}
    ks = sorted({index[int(c)] for c in categories if int(c) in index})
    if not ks:
        return math.nan
    a = [i for i, label in enumerate(params.areaRngLbl) if label == "all"]
    m = [i for i, n in enumerate(params.maxDets) if n == 100]
    s = evaluator.eval["precision"][:, :, ks][:, :, :, a][:, :, :, :, m]
    s = s[s > -1]
    return float(np.mean(s)) if s.size else math.nan


def _result(det: dict[str, Any], iou_type: str) -> dict[str, Any]:
    """One detection reduced to what ``iou_type`` evaluates, with plain Python types."""
    out = {"image_id": int(det["image_id"]), "category_id": int(det["category_id"]),
           "score": float(det["score"])}
    if iou_type == "bbox":
        out["bbox"] = [float(v) for v in det["bbox"]]
    else:
        seg = det["segmentation"]
        out["segmentation"] = {"size": [int(v) for v in seg["size"]],
                               "counts": seg["counts"]}
    return out


def _empty_results(gt: Any) -> Any:
    """A results ``COCO`` without detections (``loadRes`` fails on an empty list)."""
    from pycocotools.coco import COCO

    res = COCO()
    res.dataset = {"images": list(gt.dataset["images"]), "annotations": [],
                   "categories": list(gt.dataset["categories"])}
    with _quiet():
        res.createIndex()
    return res


def coco_eval(gt_json_path: str | os.PathLike | dict[str, Any],
              detections: Iterable[dict[str, Any]],
              iou_types: Sequence[str] = IOU_TYPES,
              image_ids: Iterable[int] | None = None,
              frequency_bins: Mapping[str, Iterable[int]] | None = None,
              ) -> dict[str, dict[str, float]]:
    """COCO AP of ``detections`` against a ground-truth JSON, with pycocotools' COCOeval.

    Args:
        gt_json_path: The ground-truth JSON (a path, or its loaded dictionary), e.g. the
            source JSON or one from :func:`raylab.data.coco.write_ground_truth_json`.
        detections: COCO result dictionaries (see the module docstring).
        iou_types: Some of ``"bbox"`` and ``"segm"``.
        image_ids: Evaluate only these images (e.g. those actually predicted); all
            ground-truth images if None.
        frequency_bins: ``{name: category ids}`` (e.g. from :func:`frequency_bins`): adds
            ``AP_<name>`` per IoU type, the mean over the bin's categories of their AP
            (IoU .50:.95, all areas, 100 detections). Categories without ground truth in
            the evaluated images do not count; NaN if no category of the bin has any.

    Returns:
        ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl"}}``, fractions in [0, 1];
        NaN where there is no ground truth to score (COCOeval's -1). Without detections
        every AP with ground truth is 0. With ``frequency_bins``, also ``AP_<name>`` for
        each bin.

    Raises:
        DataError: Unreadable ground truth, or a detection's image id not in it.
        ValueError: An unknown ``iou_types`` entry, a detection missing a field, or a
            frequency bin with an empty name.
    """
    from pycocotools.cocoeval import COCOeval

    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown:
        raise ValueError(f"iou_types: unknown {unknown}; expected some of {IOU_TYPES}")
    bins: dict[str, list[int]] = {}
    for name, categories in (frequency_bins or {}).items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"frequency bin {name!r}: the name must be a non-empty string")
        bins[name] = [int(c) for c in categories]
    gt = load_ground_truth(gt_json_path)
    detections = list(detections)
    known = set(gt.getImgIds())
    stray = sorted({int(d["image_id"]) for d in detections} - known)
    if stray:
        raise DataError(f"detections for image id(s) {', '.join(map(str, stray[:10]))} that "
                        "the ground truth does not hold", path=None if isinstance(
                            gt_json_path, dict) else gt_json_path)
    out: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        try:
            results = [_result(d, iou_type) for d in detections]
        except KeyError as exc:
            raise ValueError(f"a detection lacks {exc} (needed for {iou_type})") from None
        with _quiet():
            dt = gt.loadRes(results) if results else _empty_results(gt)
            evaluator = COCOeval(gt, dt, iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = sorted({int(i) for i in image_ids})
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        out[iou_type] = {k: (math.nan if v < 0 else float(v))
                         for k, v in zip(AP_KEYS, evaluator.stats[:6], strict=True)}
        for name, categories in bins.items():
            out[iou_type][f"AP_{name}"] = _bin_ap(evaluator, categories)
    return out


class CocoEvaluator:
    """``update``/``result``/``reset`` around :func:`coco_eval` (detections accumulate).

    Args:
        gt_json_path: The ground-truth JSON (path or loaded dictionary).
        iou_types: Some of ``"bbox"`` and ``"segm"``.
        only_predicted: Evaluate only the images passed to :meth:`update` (for evaluating
            a subset), not every ground-truth image; before any update, every image.
        frequency_bins: ``{name: category ids}``: also report ``AP_<name>`` (see
            :func:`coco_eval`).
    """

    def __init__(self, gt_json_path: str | os.PathLike | dict[str, Any],
                 iou_types: Sequence[str] = IOU_TYPES, only_predicted: bool = True,
                 frequency_bins: Mapping[str, Iterable[int]] | None = None) -> None:
        self.gt = gt_json_path
        self.iou_types = tuple(iou_types)
        self.only_predicted = only_predicted
        # Copied: an iterator would be spent by the first result().
        self.frequency_bins = (None if frequency_bins is None else
                               {name: [int(c) for c in ids]
                                for name, ids in frequency_bins.items()})
        self.reset()

    def reset(self) -> None:
        self.detections: list[dict[str, Any]] = []
        self.image_ids: set[int] = set()

    def update(self, detections: Iterable[dict[str, Any]],
               image_ids: Iterable[int] = ()) -> None:
        """Add detections; ``image_ids`` names images predicted (also those with none)."""
        for det in detections:
            self.detections.append(det)
            self.image_ids.add(int(det["image_id"]))
        self.image_ids.update(int(i) for i in image_ids)

    def result(self) -> dict[str, dict[str, float]]:
        ids = sorted(self.image_ids) if self.only_predicted and self.image_ids else None
        return coco_eval(self.gt, self.detections, self.iou_types, image_ids=ids,
                         frequency_bins=self.frequency_bins)
