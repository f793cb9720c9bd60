"""Tests of raylab.metrics.detection: COCO AP equals pycocotools' COCOeval run directly."""

from __future__ import annotations

import contextlib
import copy
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from raylab.data.coco import convert_coco, write_ground_truth_json
from raylab.data.detection_sample import write_detection_sample
from raylab.errors import DataError
from raylab.metrics.detection import AP_KEYS, CocoEvaluator, coco_eval


def _quiet_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _direct(gt_path: Path, detections: list[dict], iou_type: str,
            image_ids: list[int] | None = None) -> dict[str, float]:
    """pycocotools run by hand, as its own example does; boxes are evaluated without masks
    and masks without boxes (so that a result's area is that of what is evaluated)."""
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    results = [{k: v for k, v in d.items() if k != drop} for d in copy.deepcopy(detections)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(AP_KEYS, (float(v) for v in evaluator.stats[:6]), strict=True))


def _same(ours: dict[str, float], reference: dict[str, float]) -> None:
    assert set(ours) == set(AP_KEYS)
    for key, value in reference.items():
        if value < 0:
            assert math.isnan(ours[key]), key
        else:
            assert ours[key] == pytest.approx(value, abs=1e-12), key


def _all_equal(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> None:
    """Equal results per IoU type, NaN equal to NaN."""
    assert a.keys() == b.keys()
    for iou_type in a:
        assert a[iou_type] == pytest.approx(b[iou_type], abs=1e-12, nan_ok=True), iou_type


def _as_predictions(gt: COCO) -> list[dict[str, Any]]:
    """Every non-crowd ground-truth instance as a detection of score 1."""
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 1.0, "segmentation": gt.annToRLE(a)}
            for a in gt.anns.values() if not a["iscrowd"]]


def _perturbed(gt: COCO, seed: int = 0) -> list[dict[str, Any]]:
    """Jittered, shifted, partly dropped ground truth plus false positives, random scores."""
    rng = np.random.default_rng(seed)
    cats = gt.getCatIds()
    dets = []
    for ann in gt.anns.values():
        if rng.random() < 0.2:
            continue
        image = gt.imgs[ann["image_id"]]
        h, w = image["height"], image["width"]
        dx, dy = (int(v) for v in rng.integers(-3, 4, size=2))
        mask = np.roll(gt.annToMask(ann), (dy, dx), axis=(0, 1))
        x, y, bw, bh = ann["bbox"]
        box = [x + dx + rng.normal(0, 1), y + dy + rng.normal(0, 1), bw * rng.uniform(0.8, 1.2),
               bh * rng.uniform(0.8, 1.2)]
        category = ann["category_id"] if rng.random() < 0.9 else int(rng.choice(cats))
        dets.append({"image_id": ann["image_id"], "category_id": category, "bbox": box,
                     "score": float(rng.random()),
                     "segmentation": mask_utils.encode(np.asfortranarray(mask))})
        if rng.random() < 0.3:  # a false positive in the same image
            fp = np.zeros((h, w), np.uint8)
            x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
            fp[y0:y0 + 10, x0:x0 + 10] = 1
            dets.append({"image_id": ann["image_id"], "category_id": int(rng.choice(cats)),
                         "bbox": [float(x0), float(y0), 10.0, 10.0],
                         "score": float(rng.random()),
                         "segmentation": mask_utils.encode(np.asfortranarray(fp))})
    return dets


@pytest.fixture(scope="module")
def gt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = write_detection_sample(tmp_path_factory.mktemp("eval") / "raw", images=2,
                                 val_images=10, size=96, seed=2)
    return raw / "annotations" / "instances_val.json"


@pytest.fixture(scope="module")
def gt(gt_path: Path) -> COCO:
    return _quiet_coco(gt_path)


def test_equals_pycocotools_directly(gt_path: Path, gt: COCO) -> None:
    dets = _perturbed(gt)
    before = copy.deepcopy(dets)
    ours = coco_eval(gt_path, dets)
    assert set(ours) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        _same(ours[iou_type], _direct(gt_path, dets, iou_type))
        assert 0 < ours[iou_type]["AP"] < 1
    assert [d.keys() for d in dets] == [d.keys() for d in before]  # inputs left unchanged
    # Counts as text give the same numbers as counts as bytes.
    text = [{**d, "segmentation": {**d["segmentation"],
                                   "counts": d["segmentation"]["counts"].decode()}}
            for d in dets]
    assert coco_eval(gt_path, text, iou_types=("segm",))["segm"] == ours["segm"]


def test_ground_truth_as_predictions_scores_one(gt_path: Path, gt: COCO) -> None:
    result = coco_eval(gt_path, _as_predictions(gt))
    for iou_type in ("bbox", "segm"):
        values = result[iou_type]
        assert values["AP"] == values["AP50"] == values["AP75"] == pytest.approx(1.0)
        assert all(v == pytest.approx(1.0) or math.isnan(v) for v in values.values())
        assert math.isnan(values["APl"])  # no object above 96x96 px: COCOeval's -1


def test_empty_detections_score_zero(gt_path: Path) -> None:
    result = coco_eval(gt_path, [])
    for iou_type in ("bbox", "segm"):
        values = result[iou_type]
        assert values["AP"] == values["AP50"] == values["AP75"] == values["APs"] == 0.0
        assert math.isnan(values["APl"])
    assert coco_eval(gt_path, [], iou_types=("bbox",)).keys() == {"bbox"}


def test_image_ids_restrict_evaluation(gt_path: Path, gt: COCO) -> None:
    subset = sorted(gt.getImgIds())[:4]
    dets = [d for d in _perturbed(gt, seed=1) if d["image_id"] in subset]
    restricted = coco_eval(gt_path, dets, image_ids=subset)
    for iou_type in ("bbox", "segm"):
        _same(restricted[iou_type], _direct(gt_path, dets, iou_type, image_ids=subset))
    # Over every image, the unpredicted images' objects count as misses.
    assert coco_eval(gt_path, dets)["bbox"]["AP"] < restricted["bbox"]["AP"]
    perfect = [d for d in _as_predictions(gt) if d["image_id"] in subset]
    assert coco_eval(gt_path, perfect, image_ids=subset)["segm"]["AP"] == pytest.approx(1.0)


def test_evaluator_accumulates(gt_path: Path, gt: COCO) -> None:
    dets = _perturbed(gt, seed=3)
    metric = CocoEvaluator(gt_path, iou_types=("bbox",), only_predicted=False)
    metric.update(dets[: len(dets) // 2])
    metric.update(dets[len(dets) // 2:])
    assert metric.result() == coco_eval(gt_path, dets, iou_types=("bbox",))
    metric.reset()
    assert metric.result()["bbox"]["AP"] == 0.0
    only = CocoEvaluator(gt_path, iou_types=("bbox",))
    first = sorted(gt.getImgIds())[0]
    only.update([d for d in dets if d["image_id"] == first], image_ids=[first])
    _same(only.result()["bbox"], _direct(gt_path, [d for d in dets if d["image_id"] == first],
                                         "bbox", image_ids=[first]))


def test_shards_ground_truth_evaluates_like_the_source(gt_path: Path, gt: COCO,
                                                       tmp_path: Path) -> None:
    raw = gt_path.parents[1]
    convert_coco(raw / "images" / "val", gt_path, tmp_path / "shards")
    written = write_ground_truth_json(tmp_path / "shards", tmp_path / "gt.json")
    dets = _perturbed(gt, seed=4)
    _all_equal(coco_eval(written, dets), coco_eval(gt_path, dets))


def test_errors(gt_path: Path, gt: COCO, tmp_path: Path) -> None:
    det = _as_predictions(gt)[0]
    with pytest.raises(DataError, match="image id\\(s\\) 987654"):
        coco_eval(gt_path, [{**det, "image_id": 987654}])
    with pytest.raises(ValueError, match="iou_types"):
        coco_eval(gt_path, [det], iou_types=("keypoints",))
    with pytest.raises(ValueError, match="lacks 'segmentation'"):
        coco_eval(gt_path, [{k: v for k, v in det.items() if k != "segmentation"}])
    with pytest.raises(DataError, match="cannot read the ground-truth JSON"):
        coco_eval(tmp_path / "nope.json", [det])
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(DataError, match="expected a COCO ground-truth JSON"):
        coco_eval(tmp_path / "bad.json", [det])


# ---------------------------------------------------------------------------- real data

@pytest.mark.data
def test_real_coco128(real_data_root: Path, tmp_path: Path) -> None:
    path = real_data_root / "coco128" / "annotations" / "instances_val2017.json"
    if not path.is_file():
        pytest.skip(f"real COCO128 copy not found at {path}")
    real = _quiet_coco(path)
    perfect = coco_eval(path, _as_predictions(real))
    assert all(perfect[t][k] == pytest.approx(1.0) for t in perfect for k in AP_KEYS)
    dets = _perturbed(real, seed=5)
    ours = coco_eval(path, dets)
    for iou_type in ("bbox", "segm"):
        _same(ours[iou_type], _direct(path, dets, iou_type))
    convert_coco(real_data_root / "coco128" / "images" / "val2017", path, tmp_path / "shards")
    written = write_ground_truth_json(tmp_path / "shards", tmp_path / "gt.json")
    _all_equal(coco_eval(written, dets), ours)
