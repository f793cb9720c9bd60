"""Tests of AP by class frequency in raylab.metrics.detection (LVIS-style rare / common /
frequent bins), against counts and per-category APs worked out by hand."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from raylab.errors import DataError
from raylab.metrics.detection import (
    AP_KEYS,
    FREQUENCY_BINS,
    CocoEvaluator,
    category_frequencies,
    coco_eval,
    frequency_bins,
)

SIZE = 64
#: Categories A, B, C and D; D is never annotated (outside crowd regions).
A, B, C, D = 1, 2, 3, 4
CATEGORIES = [{"id": i, "name": n, "supercategory": "thing"}
              for i, n in ((A, "a"), (B, "b"), (C, "c"), (D, "d"))]


def _rle(x: int, y: int, w: int, h: int) -> dict[str, Any]:
    """A compressed RLE of the ``w`` x ``h`` pixel rectangle at ``(x, y)`` (exact areas)."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[y:y + h, x:x + w] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [SIZE, SIZE], "counts": rle["counts"].decode()}


def _ground_truth(objects: list[tuple[int, int, tuple[int, int, int, int], int]],
                  images: int) -> dict[str, Any]:
    """A COCO ground-truth dict of ``images`` 64x64 images and ``objects``
    ``(image id, category id, (x, y, w, h), iscrowd)``, with a box and a mask each."""
    annotations = [{"id": n + 1, "image_id": image, "category_id": category,
                    "bbox": [float(v) for v in box], "area": float(box[2] * box[3]),
                    "segmentation": _rle(*box), "iscrowd": crowd}
                   for n, (image, category, box, crowd) in enumerate(objects)]
    return {"images": [{"id": i, "width": SIZE, "height": SIZE, "file_name": f"{i}.png"}
                       for i in range(1, images + 1)],
            "annotations": annotations, "categories": copy.deepcopy(CATEGORIES)}


def _grid(image: int, category: int, n: int) -> list[tuple[int, int, tuple, int]]:
    """``n`` (at most 16) disjoint 10x10 objects on a 4x4 grid of one image."""
    return [(image, category, (16 * (k % 4), 16 * (k // 4), 10, 10), 0) for k in range(n)]


@pytest.fixture(scope="module")
def train_gt() -> dict[str, Any]:
    """A: 1 instance (plus a crowd region); B: 12 in 3 images; C: 150 in 10 images;
    D: only a crowd region."""
    objects = [(1, A, (40, 40, 10, 10), 0), (2, A, (0, 0, 30, 30), 1),
               (3, D, (0, 0, 30, 30), 1)]
    for image in (1, 2, 3):
        objects += _grid(image, B, 4)
    for image in range(1, 11):
        objects += _grid(image, C, 15)
    return _ground_truth(objects, images=10)


#: The evaluation ground truth: A twice in image 1, B in images 1 and 2, C in image 3.
VAL_OBJECTS = [(1, A, (0, 0, 16, 16), 0), (1, A, (32, 32, 16, 16), 0),
               (1, B, (0, 40, 16, 16), 0), (2, B, (8, 8, 16, 16), 0),
               (3, C, (0, 0, 16, 16), 0)]


@pytest.fixture(scope="module")
def val_gt() -> dict[str, Any]:
    return _ground_truth(VAL_OBJECTS, images=3)


def _det(image: int, category: int, box: tuple[int, int, int, int],
         score: float = 1.0) -> dict[str, Any]:
    return {"image_id": image, "category_id": category, "bbox": [float(v) for v in box],
            "score": score, "segmentation": _rle(*box)}


#: A found exactly (AP 1), B not at all (AP 0), C by a box of IoU 160/256 = 0.625, a hit at
#: IoU thresholds .50, .55 and .60 only (AP 3/10).
DETECTIONS = [_det(1, A, (0, 0, 16, 16)), _det(1, A, (32, 32, 16, 16)),
              _det(3, C, (0, 0, 16, 10))]
PER_CATEGORY_AP = {A: 1.0, B: 0.0, C: 0.3}


# ------------------------------------------------------------------------ frequencies

def test_category_frequencies_by_hand(train_gt: dict[str, Any], tmp_path: Path) -> None:
    assert category_frequencies(train_gt) == {A: 1, B: 12, C: 150, D: 0}
    assert category_frequencies(train_gt, count="instances") == {A: 1, B: 12, C: 150, D: 0}
    # Crowd regions count for neither: A's is in image 2, D's in image 3.
    assert category_frequencies(train_gt, count="images") == {A: 1, B: 3, C: 10, D: 0}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(train_gt))
    assert category_frequencies(path) == {A: 1, B: 12, C: 150, D: 0}
    assert category_frequencies(str(path), count="images") == {A: 1, B: 3, C: 10, D: 0}


def test_category_frequencies_errors(train_gt: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="count: unknown 'boxes'"):
        category_frequencies(train_gt, count="boxes")
    stray = copy.deepcopy(train_gt)
    stray["annotations"][0]["category_id"] = 77
    with pytest.raises(DataError, match="category id 77"):
        category_frequencies(stray)
    with pytest.raises(DataError, match="cannot read the ground-truth JSON"):
        category_frequencies(tmp_path / "nope.json")


def test_frequency_bins_by_hand(train_gt: dict[str, Any]) -> None:
    assert dict(FREQUENCY_BINS) == {"rare": (1, 10), "common": (11, 100),
                                    "frequent": (101, None)}
    by_instances = frequency_bins(category_frequencies(train_gt))
    assert by_instances == {"rare": [A], "common": [B], "frequent": [C]}  # D (0): none
    assert list(by_instances) == ["rare", "common", "frequent"]
    # LVIS' image counts (1, 3, 10) put all three in "rare".
    by_images = frequency_bins(category_frequencies(train_gt, count="images"))
    assert by_images == {"rare": [A, B, C], "common": [], "frequent": []}
    # Bounds are inclusive; counts outside every range are in no bin; ids come sorted.
    counts = {9: 10, 8: 11, 7: 100, 6: 101, 5: 0, 4: 5, 3: 150}
    assert frequency_bins(counts) == {"rare": [4, 9], "common": [7, 8], "frequent": [3, 6]}
    assert frequency_bins(counts, {"few": (5, 11), "many": (100, 101)}) == {
        "few": [4, 8, 9], "many": [6, 7]}
    # A range may take in categories never seen in training (count 0) if asked to.
    assert frequency_bins(counts, {"unseen": (0, 0)}) == {"unseen": [5]}
    assert frequency_bins({}, FREQUENCY_BINS) == {"rare": [], "common": [], "frequent": []}


@pytest.mark.parametrize(("bins", "message"), [
    ({"": (1, 10)}, "bin '': the name must be a non-empty string"),
    ({3: (1, 10)}, "bin 3: the name must be a non-empty string"),
    ({"rare": (-1, 10)}, "bin 'rare': lo must be an integer >= 0, got -1"),
    ({"rare": (1.5, 10)}, "bin 'rare': lo must be an integer >= 0, got 1.5"),
    ({"rare": (True, 10)}, "bin 'rare': lo must be an integer >= 0, got True"),
    ({"rare": (None, 10)}, "bin 'rare': lo must be an integer >= 0"),
    ({"rare": (10, 9)}, r"bin 'rare': hi must be None or an integer >= lo \(10\), got 9"),
    ({"rare": (1, "10")}, "bin 'rare': hi must be None or an integer >= lo"),
    ({"rare": (1,)}, r"bin 'rare': expected a \(lo, hi\) pair, got \(1,\)"),
    ({"rare": 5}, "bin 'rare': expected a"),
    ({"rare": (1, 10), "common": (10, 100)}, "bin 'rare' overlaps frequency bin 'common'"),
    ({"all": (0, None), "rare": (1, 10)}, "bin 'all' overlaps frequency bin 'rare'"),
    ({"b": (20, 30), "a": (1, 40)}, "bin 'a' overlaps frequency bin 'b'"),
])
def test_frequency_bins_validation(bins: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        frequency_bins({A: 1}, bins)


def test_adjacent_bins_are_valid() -> None:
    assert frequency_bins({A: 10, B: 11}, {"x": (11, None), "y": (0, 10)}) == {
        "x": [B], "y": [A]}


# ---------------------------------------------------------------------- AP per bin

def test_bin_ap_by_hand(train_gt: dict[str, Any], val_gt: dict[str, Any]) -> None:
    bins = frequency_bins(category_frequencies(train_gt))  # rare A, common B, frequent C
    custom = {"ab": [A, B], "a": [A], "c": [C], "d": [D], "unknown": [999], "empty": [],
              "all": [A, B, C, D]}
    result = coco_eval(val_gt, DETECTIONS, frequency_bins={**bins, **custom})
    overall = sum(PER_CATEGORY_AP.values()) / 3
    for iou_type in ("bbox", "segm"):
        values = result[iou_type]
        assert set(values) == set(AP_KEYS) | {f"AP_{n}" for n in (*bins, *custom)}
        assert values["AP"] == pytest.approx(overall, abs=1e-12)
        assert values["AP_rare"] == pytest.approx(1.0, abs=1e-12)
        assert values["AP_common"] == pytest.approx(0.0, abs=1e-12)
        assert values["AP_frequent"] == pytest.approx(0.3, abs=1e-12)
        assert values["AP_ab"] == pytest.approx(0.5, abs=1e-12)
        assert values["AP_a"] == pytest.approx(1.0, abs=1e-12)
        assert values["AP_c"] == pytest.approx(0.3, abs=1e-12)
        # D has no ground truth, 999 is no category: neither counts.
        assert values["AP_all"] == pytest.approx(values["AP"], abs=1e-12)
        for name in ("d", "unknown", "empty"):
            assert math.isnan(values[f"AP_{name}"]), name


def test_bin_without_ground_truth_in_evaluated_images(val_gt: dict[str, Any]) -> None:
    # Only image 3 (C) evaluated: A and B have no ground truth there.
    result = coco_eval(val_gt, [d for d in DETECTIONS if d["image_id"] == 3],
                       iou_types=("bbox",), image_ids=[3],
                       frequency_bins={"rare": [A], "common": [B], "frequent": [C],
                                       "ab": [A, B], "abc": [A, B, C]})["bbox"]
    assert math.isnan(result["AP_rare"]) and math.isnan(result["AP_common"])
    assert math.isnan(result["AP_ab"])
    assert result["AP_frequent"] == result["AP_abc"] == pytest.approx(0.3, abs=1e-12)
    assert result["AP"] == pytest.approx(0.3, abs=1e-12)


def test_no_bins_keeps_the_keys(val_gt: dict[str, Any]) -> None:
    plain = coco_eval(val_gt, DETECTIONS)
    assert all(set(v) == set(AP_KEYS) for v in plain.values())
    with_bins = coco_eval(val_gt, DETECTIONS, frequency_bins={"a": [A]})
    for iou_type, values in plain.items():
        assert {k: with_bins[iou_type][k] for k in AP_KEYS} == pytest.approx(
            values, nan_ok=True)
    no_bins = coco_eval(val_gt, DETECTIONS, frequency_bins={})
    assert no_bins.keys() == plain.keys()
    for iou_type, values in plain.items():
        assert no_bins[iou_type] == pytest.approx(values, nan_ok=True)
    with pytest.raises(ValueError, match="frequency bin '': the name"):
        coco_eval(val_gt, DETECTIONS, frequency_bins={"": [A]})


def _noisy(gt: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """Shifted, partly dropped or mislabelled ground truth plus false positives."""
    rng = np.random.default_rng(seed)
    dets = []
    for ann in gt["annotations"]:
        if ann["iscrowd"] or rng.random() < 0.2:
            continue
        x, y, w, h = (int(v) for v in ann["bbox"])
        dx, dy = (int(v) for v in rng.integers(-3, 4, size=2))
        box = (min(max(x + dx, 0), SIZE - w), min(max(y + dy, 0), SIZE - h), w, h)
        category = ann["category_id"] if rng.random() < 0.85 else int(rng.integers(1, 5))
        dets.append(_det(ann["image_id"], category, box, float(rng.random())))
        if rng.random() < 0.3:
            fx, fy = (int(v) for v in rng.integers(0, SIZE - 8, size=2))
            dets.append(_det(ann["image_id"], int(rng.integers(1, 5)), (fx, fy, 8, 8),
                             float(rng.random())))
    return dets


def _per_category_ap(gt: dict[str, Any], dets: list[dict[str, Any]], iou_type: str,
                     category: int) -> float:
    """One category's AP from pycocotools run on that category alone (-1: no truth)."""
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    results = [{k: v for k, v in d.items() if k != drop} for d in copy.deepcopy(dets)]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(results), iou_type)
        evaluator.params.catIds = [category]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


def test_bin_ap_equals_mean_of_per_category_runs(train_gt: dict[str, Any]) -> None:
    """Imperfect detections: each bin's AP is the mean of the APs of pycocotools run on
    each of its categories alone, and the bin of every category gives the overall AP."""
    dets = _noisy(train_gt, seed=0)
    bins = {"a": [A], "b": [B], "ab": [A, B], "bc": [B, C], "all": [A, B, C, D]}
    result = coco_eval(train_gt, dets, frequency_bins=bins)
    for iou_type in ("bbox", "segm"):
        single = {c: _per_category_ap(train_gt, dets, iou_type, c) for c in (A, B, C, D)}
        assert single[D] == -1  # crowd only: nothing to score
        assert 0 < single[B] < 1 and 0 < single[C] < 1
        values = result[iou_type]
        for name, categories in bins.items():
            scored = [single[c] for c in categories if single[c] >= 0]
            assert values[f"AP_{name}"] == pytest.approx(np.mean(scored), abs=1e-12), name
        assert values["AP_all"] == pytest.approx(values["AP"], abs=1e-12)


def test_evaluator_passes_bins(train_gt: dict[str, Any], val_gt: dict[str, Any]) -> None:
    bins = frequency_bins(category_frequencies(train_gt))
    metric = CocoEvaluator(val_gt, iou_types=("bbox",), only_predicted=False,
                           frequency_bins={k: iter(v) for k, v in bins.items()})
    metric.update(DETECTIONS[:1])
    metric.update(DETECTIONS[1:])
    first = metric.result()
    assert first == coco_eval(val_gt, DETECTIONS, iou_types=("bbox",), frequency_bins=bins)
    assert first["bbox"]["AP_frequent"] == pytest.approx(0.3, abs=1e-12)
    assert metric.result() == first  # the bins were not spent by the first result
    metric.reset()
    empty = metric.result()["bbox"]
    assert empty["AP_rare"] == empty["AP_common"] == empty["AP_frequent"] == 0.0
    # Only the predicted images (3): A and B have no ground truth there.
    only = CocoEvaluator(val_gt, iou_types=("segm",), frequency_bins=bins)
    only.update([d for d in DETECTIONS if d["image_id"] == 3], image_ids=[3])
    values = only.result()["segm"]
    assert math.isnan(values["AP_rare"]) and math.isnan(values["AP_common"])
    assert values["AP_frequent"] == pytest.approx(0.3, abs=1e-12)
    plain = CocoEvaluator(val_gt, iou_types=("bbox",))
    plain.update(DETECTIONS)
    assert set(plain.result()["bbox"]) == set(AP_KEYS)
