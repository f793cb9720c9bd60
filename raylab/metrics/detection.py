"""COCO box and mask AP with pycocotools' ``COCOeval`` (the reference implementation).

Detections are COCO result dictionaries: ``image_id``, ``category_id`` (the COCO id, as in
the ground truth), ``bbox`` (``[x, y, w, h]`` absolute pixels), ``score`` and, for
``segm``, ``segmentation`` (compressed RLE ``{"size": [h, w], "counts": str | bytes}``).
As in detectron2, boxes are evaluated without the masks and masks without the boxes, so that
each result's ``area`` comes from what is evaluated.

Values are fractions in [0, 1], not percent. Where COCOeval reports -1 (no ground truth in
that size range, e.g. no small objects), the value is NaN.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

from raylab.errors import DataError

IOU_TYPES = ("bbox", "segm")
#: Names of the first six entries of ``COCOeval.stats``.
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


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
              image_ids: Iterable[int] | None = None) -> dict[str, dict[str, float]]:
    """COCO AP of ``detections`` against a ground-truth JSON, with pycocotools' COCOeval.

    Args:
        gt_json_path: The ground-truth JSON (a path, or its loaded dictionary), e.g. the
            source JSON or one from :func:`raylab.data.coco.write_ground_truth_json`.
        detections: COCO result dictionaries (see the module docstring).
        iou_types: Some of ``"bbox"`` and ``"segm"``.
        image_ids: Evaluate only these images (e.g. those actually predicted); all
            ground-truth images if None.

    Returns:
        ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl"}}``, fractions in [0, 1];
        NaN where there is no ground truth to score (COCOeval's -1). Without detections
        every AP with ground truth is 0.

    Raises:
        DataError: Unreadable ground truth, or a detection's image id not in it.
        ValueError: An unknown ``iou_types`` entry, or a detection missing a field.
    """
    from pycocotools.cocoeval import COCOeval

    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown:
        raise ValueError(f"iou_types: unknown {unknown}; expected some of {IOU_TYPES}")
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
    return out


class CocoEvaluator:
    """``update``/``result``/``reset`` around :func:`coco_eval` (detections accumulate).

    Args:
        gt_json_path: The ground-truth JSON (path or loaded dictionary).
        iou_types: Some of ``"bbox"`` and ``"segm"``.
        only_predicted: Evaluate only the images passed to :meth:`update` (for evaluating
            a subset), not every ground-truth image; before any update, every image.
    """

    def __init__(self, gt_json_path: str | os.PathLike | dict[str, Any],
                 iou_types: Sequence[str] = IOU_TYPES, only_predicted: bool = True) -> None:
        self.gt = gt_json_path
        self.iou_types = tuple(iou_types)
        self.only_predicted = only_predicted
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
        return coco_eval(self.gt, self.detections, self.iou_types, image_ids=ids)
