"""Segmentation metrics (mIoU, pixel accuracy, Hungarian matching) against hand-worked numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raylab.errors import DataError
from raylab.metrics.segmentation import (
    SegmentationMetric,
    confusion_matrix,
    hungarian_match,
    per_class_table,
    scores_from_confusion,
    supervised_miou,
    unsupervised_miou,
)

# Hand-worked 2-class 3x3 example.
TARGET = np.array([[0, 0, 1],
                   [0, 1, 1],
                   [1, 1, 1]])
PRED = np.array([[0, 1, 1],
                 [0, 0, 1],
                 [1, 1, 0]])
# (pred, true) pairs: (0,0) (1,0) (1,1) / (0,0) (0,1) (1,1) / (1,1) (1,1) (0,1)
# Confusion, rows = pred, cols = true: [[2, 2], [1, 4]]; row sums 4, 5; column sums 3, 6.
# class 0: tp 2, fp 4-2 = 2, fn 3-2 = 1 -> IoU 2/5 = 40 %
# class 1: tp 4, fp 5-4 = 1, fn 6-4 = 2 -> IoU 4/7 = 57.142857 %
# mIoU (40 + 400/7) / 2 = 340/7 = 48.571428 %; accuracy 6/9 = 66.666 %.
HAND_CONFUSION = [[2, 2], [1, 4]]
HAND_IOU = [40.0, 400 / 7]
HAND_MIOU = 340 / 7
HAND_ACC = 200 / 3


def _random_labels(rng, shape, n_classes, void_frac=0.1):
    target = rng.integers(0, n_classes, size=shape)
    target[rng.random(shape) < void_frac] = 255
    return target


def test_confusion_matrix_hand_example():
    cm = confusion_matrix(PRED, TARGET, 2, 2)
    assert cm.dtype == np.int64
    assert cm.tolist() == HAND_CONFUSION


def test_supervised_hand_example():
    scores = supervised_miou(PRED, TARGET, 2)
    assert scores["iou"] == pytest.approx(HAND_IOU)
    assert scores["miou"] == pytest.approx(HAND_MIOU)
    assert scores["accuracy"] == pytest.approx(HAND_ACC)
    assert scores["pixels"] == 9
    # Identity beats the swap (6 vs 3 matched pixels), so matching changes nothing.
    unsup = unsupervised_miou(PRED, TARGET, 2)
    assert unsup["assignment"] == [0, 1]
    assert unsup["miou"] == pytest.approx(HAND_MIOU)
    assert unsup["accuracy"] == pytest.approx(HAND_ACC)


def test_scores_from_confusion_hand_example():
    scores = scores_from_confusion(np.array(HAND_CONFUSION))
    assert scores["miou"] == pytest.approx(HAND_MIOU)
    assert scores["accuracy"] == pytest.approx(HAND_ACC)
    assert set(scores) == {"miou", "accuracy", "iou", "pixels"}


def test_perfect_prediction():
    rng = np.random.default_rng(0)
    target = _random_labels(rng, (2, 16, 16), 5)
    pred = np.where(target == 255, 0, target)
    for scores in (supervised_miou(pred, target, 5), unsupervised_miou(pred, target, 5)):
        assert scores["miou"] == 100.0
        assert scores["accuracy"] == 100.0
        assert scores["pixels"] == int((target != 255).sum())


def test_permuted_labels_match_perfectly_but_score_low_supervised():
    rng = np.random.default_rng(1)
    n = 6
    target = _random_labels(rng, (3, 20, 20), n)
    perm = rng.permutation(n)
    while np.any(perm == np.arange(n)):  # a derangement: every class renamed
        perm = rng.permutation(n)
    # Void pixels get arbitrary (wrong) predictions: they must not count.
    pred = np.where(target == 255, rng.integers(0, n, size=target.shape), perm[target % 255])
    unsup = unsupervised_miou(pred, target, n)
    assert unsup["miou"] == pytest.approx(100.0)
    assert unsup["accuracy"] == pytest.approx(100.0)
    # Cluster perm[k] holds class k, so the assignment is the inverse permutation.
    assert unsup["assignment"] == np.argsort(perm).tolist()
    sup = supervised_miou(pred, target, n)
    assert sup["miou"] == 0.0 and sup["accuracy"] == 0.0


def test_partial_permutation_supervised_lower():
    target = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([1, 1, 0, 0, 2, 2])  # classes 0 and 1 swapped, 2 right
    sup = supervised_miou(pred, target, 3)
    assert sup["iou"] == [0.0, 0.0, 100.0]
    assert sup["miou"] == pytest.approx(100 / 3)
    assert sup["accuracy"] == pytest.approx(100 / 3)
    unsup = unsupervised_miou(pred, target, 3)
    assert unsup["miou"] == 100.0 and unsup["assignment"] == [1, 0, 2]


def test_ignore_index_not_counted():
    target = np.array([0, 1, 255, 255])
    pred = np.array([0, 1, 1, 0])
    scores = supervised_miou(pred, target, 2)
    assert scores["pixels"] == 2 and scores["miou"] == 100.0
    # Another void label, and none at all.
    assert supervised_miou(pred, np.array([0, 1, -1, -1]), 2, ignore_index=-1)["miou"] == 100.0
    cm = confusion_matrix(pred, np.array([0, 1, 1, 0]), 2, 2, ignore_index=None)
    assert cm.sum() == 4


def test_absent_class_is_nan_and_left_out_of_mean():
    target = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])
    scores = supervised_miou(pred, target, 3)
    # class 0: tp 1, fp 0, fn 1 -> 50 %; class 1: tp 2, fp 1, fn 0 -> 66.67 %; class 2 absent.
    assert scores["iou"][:2] == pytest.approx([50.0, 200 / 3])
    assert math.isnan(scores["iou"][2])
    assert scores["miou"] == pytest.approx((50.0 + 200 / 3) / 2)
    assert scores["accuracy"] == pytest.approx(75.0)
    # A class predicted but never true is not NaN: its IoU is 0 and counts in the mean.
    scores = supervised_miou(np.array([0, 2]), np.array([0, 0]), 3)
    assert scores["iou"][0] == 50.0
    assert math.isnan(scores["iou"][1]) and scores["iou"][2] == 0.0
    assert scores["miou"] == pytest.approx(25.0)


def test_no_scored_pixels_gives_nan():
    scores = supervised_miou(np.array([0, 1]), np.array([255, 255]), 2)
    assert scores["pixels"] == 0
    assert math.isnan(scores["miou"]) and math.isnan(scores["accuracy"])


def test_extra_clusters_unassigned_pixels_are_errors():
    target = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    pred = np.array([0, 0, 0, 2, 1, 1, 1, 1, 2, 2])
    # Confusion (rows = cluster, cols = class): c0 [3, 0], c1 [0, 4], c2 [1, 2].
    # Best matching c0->0, c1->1 (7 pixels); c2 is unassigned and its 3 pixels are wrong.
    # class 0: tp 3, fp 0, fn 1 -> 75 %; class 1: tp 4, fp 0, fn 2 -> 66.67 %.
    # mIoU (75 + 200/3) / 2 = 70.833 %; accuracy 7/10 = 70 %.
    assert confusion_matrix(pred, target, 3, 2).tolist() == [[3, 0], [0, 4], [1, 2]]
    assert hungarian_match([[3, 0], [0, 4], [1, 2]]).tolist() == [0, 1, -1]
    scores = unsupervised_miou(pred, target, 2, n_clusters=3)
    assert scores["assignment"] == [0, 1, -1]
    assert scores["iou"] == pytest.approx([75.0, 200 / 3])
    assert scores["miou"] == pytest.approx((75.0 + 200 / 3) / 2)
    assert scores["accuracy"] == pytest.approx(70.0)
    assert scores["pixels"] == 10


def test_fewer_clusters_than_classes():
    target = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([1, 1, 0, 0, 0, 0])
    # c0 [0, 2, 2], c1 [2, 0, 0]: c1->0 and c0->1 or 2 (tie, 2 pixels either way).
    scores = unsupervised_miou(pred, target, 3, n_clusters=2)
    assert scores["assignment"][1] == 0
    assert scores["accuracy"] == pytest.approx(400 / 6)
    # class 0: 100 %; the matched class: tp 2, fp 2 -> 50 %; the other: 0 %.
    assert sorted(scores["iou"]) == pytest.approx([0.0, 50.0, 100.0])


def test_scores_from_confusion_unmatched_and_shape():
    scores = scores_from_confusion([[3, 0], [0, 4]], unmatched=[1, 2])
    assert scores["miou"] == pytest.approx((75.0 + 200 / 3) / 2)
    assert scores["pixels"] == 10
    with pytest.raises(ValueError, match="square"):
        scores_from_confusion(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="2 entries"):
        scores_from_confusion(np.eye(2), unmatched=[1, 2, 3])


@pytest.mark.parametrize("unsupervised", [False, True])
def test_accumulating_metric_equals_one_shot(unsupervised):
    rng = np.random.default_rng(2)
    n_classes, n_pred = 4, (6 if unsupervised else 4)
    t1, t2 = _random_labels(rng, (2, 8, 8), n_classes), _random_labels(rng, (3, 8, 8), n_classes)
    p1, p2 = rng.integers(0, n_pred, t1.shape), rng.integers(0, n_pred, t2.shape)
    metric = SegmentationMetric(n_classes, n_pred=n_pred, unsupervised=unsupervised)
    metric.update(p1, t1)
    metric.update(torch.from_numpy(p2), torch.from_numpy(t2))
    pred, target = np.concatenate([p1, p2]), np.concatenate([t1, t2])
    if unsupervised:
        whole = unsupervised_miou(pred, target, n_classes, n_clusters=n_pred)
    else:
        whole = supervised_miou(pred, target, n_classes)
    assert metric.confusion.tolist() == confusion_matrix(pred, target, n_pred, n_classes).tolist()
    np.testing.assert_equal(metric.result(), whole)

    # Two workers: all-reduce (sum) their confusions as tensors, score the sum.
    a = SegmentationMetric(n_classes, n_pred=n_pred, unsupervised=unsupervised)
    b = SegmentationMetric(n_classes, n_pred=n_pred, unsupervised=unsupervised)
    a.update(p1, t1)
    b.update(p2, t2)
    reduced = torch.from_numpy(a.confusion) + torch.from_numpy(b.confusion)
    np.testing.assert_equal(a.result(reduced), whole)
    np.testing.assert_equal(a.result(reduced.double()), whole)  # a float all-reduce too
    a.merge(b)
    np.testing.assert_equal(a.result(), whole)

    metric.reset()
    assert metric.confusion.sum() == 0


def test_metric_argument_checks():
    with pytest.raises(ValueError, match="n_pred == n_classes"):
        SegmentationMetric(3, n_pred=4)
    with pytest.raises(ValueError, match="n_classes"):
        SegmentationMetric(0)
    metric = SegmentationMetric(3)
    with pytest.raises(ValueError, match="does not fit"):
        metric.result(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="does not fit"):
        metric.merge(np.zeros((3, 4)))


def test_bad_values_raise_naming_the_value():
    target = np.array([0, 1, 2])
    with pytest.raises(ValueError, match=r"pred holds id 7, expected 0\.\.2"):
        confusion_matrix(np.array([0, 7, 1]), target, 3, 3)
    with pytest.raises(ValueError, match=r"pred holds id -1"):
        supervised_miou(torch.tensor([0, -1, 1]), torch.tensor([0, 1, 2]), 3)
    with pytest.raises(ValueError, match=r"target holds class 9, expected 0\.\.2 or "
                                         r"ignore_index 255"):
        confusion_matrix(np.array([0, 1, 2]), np.array([0, 9, 2]), 3, 3)
    with pytest.raises(ValueError, match=r"target holds class -1"):
        unsupervised_miou(torch.tensor([0, 1, 2]), torch.tensor([0, -1, 2]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((4,), int), 3, 3)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(np.array([0.5, 1.0]), np.array([0, 1]), 2, 2)
    # The label errors are also raylab DataErrors, which the CLI reports as one line.
    with pytest.raises(DataError):
        confusion_matrix(np.array([3]), np.array([0]), 3, 3)


def test_torch_and_numpy_agree():
    rng = np.random.default_rng(3)
    target = _random_labels(rng, (2, 12, 12), 5).astype(np.uint8)
    pred = rng.integers(0, 7, target.shape)
    expected = confusion_matrix(pred, target, 7, 5)
    assert expected.sum() == int((target != 255).sum())
    t_pred, t_target = torch.from_numpy(pred), torch.from_numpy(target)  # int64 and uint8
    assert confusion_matrix(t_pred, t_target, 7, 5).tolist() == expected.tolist()
    assert confusion_matrix(t_pred, target, 7, 5).tolist() == expected.tolist()  # mixed
    assert confusion_matrix(pred.tolist(), target.tolist(), 7, 5).tolist() == expected.tolist()
    np.testing.assert_equal(unsupervised_miou(t_pred, t_target, 5, n_clusters=7),
                            unsupervised_miou(pred, target, 5, n_clusters=7))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_counted_on_device():
    rng = np.random.default_rng(4)
    target = _random_labels(rng, (2, 12, 12), 5)
    pred = rng.integers(0, 5, target.shape)
    expected = confusion_matrix(pred, target, 5, 5)
    got = confusion_matrix(torch.from_numpy(pred).cuda(), torch.from_numpy(target).cuda(), 5, 5)
    assert got.tolist() == expected.tolist()


def test_per_class_table():
    scores = supervised_miou(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), 3)
    table = per_class_table(scores, ["road", "car", "sky"])
    assert [name for name, _ in table] == ["road", "car", "sky"]
    assert table[0][1] == pytest.approx(50.0) and table[1][1] == pytest.approx(200 / 3)
    assert math.isnan(table[2][1])
    with pytest.raises(ValueError, match="2 class names for 3"):
        per_class_table(scores, ["road", "car"])
