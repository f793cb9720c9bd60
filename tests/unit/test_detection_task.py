"""The detection task on the engine (no Ray): two workers stay identical and score every
evaluation image exactly once; the ground truth a worker rebuilds from its rows equals the
source JSON; the lr schedules; the predictions of a trained model map back to the image.

The resume-equivalence test for detection is the engine's own
(``test_engine_properties.py::test_resume_matches_the_uninterrupted_run[detection]``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from raylab import config as cfglib
from raylab.metrics.detection import coco_eval
from raylab.tasks.detection.config import DetectionConfig
from raylab.tasks.detection.data import eval_batch, read_batch
from raylab.tasks.detection.task import ground_truth_rows, lr_schedule
from raylab.transforms.detection import ResizePad
from raylab.transforms.detection_batch import contiguous_label_map
from tests import scenarios
from tests.ddp import run_ranks


def test_two_workers_stay_identical_and_score_each_image_once() -> None:
    """5 evaluation images over 2 workers (3 + 2): gathered to the chief, scored once,
    the same AP on both; DDP keeps the replicas bit-identical."""
    (w0, r0), (w1, r1) = run_ranks(scenarios.train, 2, "detection", {})
    drift = [k for k in w0 if not torch.equal(w0[k], w1[k])]
    assert not drift, drift[:3]
    assert [r["test_rows"] for r in r0] == [r["test_rows"] for r in r1] == [5, 5, 5]
    assert [r["test_bbox_AP"] for r in r0] == [r["test_bbox_AP"] for r in r1]
    # AP by class frequency: each bin's AP, the same on both workers.
    for key in ("test_bbox_AP_rare", "test_segm_AP_frequent"):
        assert [r.get(key) for r in r0] == [r.get(key) for r in r1]
        assert all(0.0 <= r[key] <= 1.0 for r in r0), key
    assert [r["train_samples"] for r in r0] == [12, 12, 12]
    assert all(np.isfinite(r["train_loss"]) for r in r0)


def _sample_rows(split: str) -> tuple[dict, dict]:
    scenarios._detection_rows(split, ResizePad(64), True)  # makes the sample
    folder = scenarios._DETECTION_SAMPLE / split
    batch = read_batch(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    source = json.loads(open(manifest["extra"]["source_json"]).read())
    return batch, source


def test_ground_truth_rebuilt_from_rows_equals_the_source_json() -> None:
    batch, source = _sample_rows("val")
    out = eval_batch(batch, ResizePad(64), contiguous_label_map([1, 2]))
    rebuilt = []
    for i in range(len(out["image_id"])):
        rebuilt += ground_truth_rows(out, i, (int(out["height"][i]), int(out["width"][i])))
    by_id = {a["id"]: a for a in source["annotations"]}
    assert sorted(a["id"] for a in rebuilt) == sorted(by_id)
    for ann in rebuilt:
        original = by_id[ann["id"]]
        assert ann["category_id"] == original["category_id"]
        assert ann["bbox"] == pytest.approx(original["bbox"], abs=1e-4)
        h, w = ann["segmentation"]["size"]
        seg = original["segmentation"]
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) \
            else (mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg)
        assert np.array_equal(mask_utils.decode(ann["segmentation"]), mask_utils.decode(rle))
    # Ground truth given back as predictions scores 1.0: nothing was lost on the way.
    gt = {"images": [{"id": int(i), "height": int(h), "width": int(w)} for i, h, w in
                     zip(out["image_id"], out["height"], out["width"])],
          "annotations": rebuilt, "categories": source["categories"]}
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 1.0, "segmentation": a["segmentation"]} for a in rebuilt]
    result = coco_eval(gt, dets)
    assert result["bbox"]["AP"] == pytest.approx(1.0)
    assert result["segm"]["AP"] == pytest.approx(1.0)


def test_category_counts_of_the_shards_match_the_json() -> None:
    """Instances (non-crowd annotations) and images per category, read from the shards'
    two list columns, against a count over the source JSON."""
    from collections import Counter

    from raylab.data.shards import shard_paths
    from raylab.tasks.detection.data import category_counts

    _, source = _sample_rows("train")
    paths = shard_paths(scenarios._DETECTION_SAMPLE / "train")
    ids = [c["id"] for c in source["categories"]]
    plain = [a for a in source["annotations"] if not a.get("iscrowd")]
    instances = Counter(a["category_id"] for a in plain)
    images = Counter(c for _, c in {(a["image_id"], a["category_id"]) for a in plain})
    assert category_counts(paths, ids) == {i: instances.get(i, 0) for i in ids}
    assert category_counts(paths, ids, "images") == {i: images.get(i, 0) for i in ids}
    assert sum(category_counts(paths, ids).values()) > sum(
        category_counts(paths, ids, "images").values())  # some images hold two of a kind


def test_lr_schedules_by_hand() -> None:
    cfg = cfglib.apply_overrides(DetectionConfig(), {
        "optim.lr": 1e-4, "optim.batch_size": 16, "optim.reference_batch": 64,
        "optim.epochs": 10, "optim.warmup_iters": 5, "optim.milestones": [0.5, 0.9]})
    lr = lr_schedule(cfg, steps_per_epoch=10)
    base = 1e-4 * 16 / 64  # linear scaling from the reference batch
    assert len(lr) == 100
    assert lr[0] == pytest.approx(base * 0.001)
    assert lr[5] == lr[49] == pytest.approx(base)
    assert lr[50] == pytest.approx(base * 0.1) and lr[90] == pytest.approx(base * 0.01)
    cosine = lr_schedule(cfglib.apply_overrides(cfg, {"optim.schedule": "cosine"}), 10)
    assert cosine[5] == pytest.approx(base) and cosine[-1] < base * 0.01
    assert cosine[0] == pytest.approx(base * 0.001)
