"""Classification metrics against numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylab.errors import DataError
from raylab.metrics.classification import (
    ConfusionMatrix,
    TrialVotes,
    classification_report,
    majority_vote,
    row_normalise,
)

LABELS = ["N", "I", "E"]
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]
# Confusion (rows true, cols predicted):
#   N: [2, 1, 1]   I: [1, 2, 0]   E: [0, 1, 2]      column totals 3, 4, 3
# accuracy  = (2 + 2 + 2) / 10 = 0.6
# precision = N 2/3, I 2/4 = 0.5, E 2/3
# recall    = N 2/4 = 0.5, I 2/3, E 2/3
# F1 N = 2 (2/3)(1/2) / (2/3 + 1/2) = (2/3) / (7/6) = 4/7; F1 I = 4/7 (same P, R swapped);
# F1 E = 2/3; macro-F1 = (4/7 + 4/7 + 2/3) / 3 = 38/63.
EXPECTED = {
    "accuracy": 0.6,
    "precision": {"N": 2 / 3, "I": 0.5, "E": 2 / 3},
    "recall": {"N": 0.5, "I": 2 / 3, "E": 2 / 3},
    "f1": {"N": 4 / 7, "I": 4 / 7, "E": 2 / 3},
    "support": {"N": 4, "I": 3, "E": 3},
    "macro_f1": 38 / 63,
    "confusion": [[2, 1, 1], [1, 2, 0], [0, 1, 2]],
}


def _assert_report(report, expected):
    assert set(report) == set(expected)
    assert report["accuracy"] == pytest.approx(expected["accuracy"])
    assert report["macro_f1"] == pytest.approx(expected["macro_f1"])
    for key in ("precision", "recall", "f1"):
        assert report[key] == pytest.approx(expected[key]), key
    assert report["support"] == expected["support"]
    assert report["confusion"] == expected["confusion"]


@pytest.mark.parametrize("convert", [list, np.array, torch.tensor])
def test_classification_report_hand_worked(convert):
    _assert_report(classification_report(convert(Y_TRUE), convert(Y_PRED), LABELS), EXPECTED)


def test_zero_division_gives_zero():
    # Class I is never predicted (precision 0/0) and E never occurs (recall 0/0).
    report = classification_report([0, 1], [0, 0], LABELS)
    assert report["precision"] == {"N": 0.5, "I": 0.0, "E": 0.0}
    assert report["recall"] == {"N": 1.0, "I": 0.0, "E": 0.0}
    # F1 N = 2 * 0.5 * 1 / 1.5 = 2/3; macro over all three labels = (2/3) / 3.
    assert report["f1"]["N"] == pytest.approx(2 / 3)
    assert report["macro_f1"] == pytest.approx(2 / 9)
    empty = classification_report([], [], LABELS)
    assert empty["accuracy"] == 0.0 and empty["macro_f1"] == 0.0


def test_bad_inputs():
    with pytest.raises(DataError, match="differ in length"):
        classification_report([0, 1], [0], LABELS)
    with pytest.raises(DataError, match="expected 0..2"):
        classification_report([0, 3], [0, 1], LABELS)
    with pytest.raises(DataError, match="1-D"):
        classification_report([[0]], [[0]], LABELS)


def test_confusion_matrix_streaming_and_merge():
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(Y_TRUE[:4], Y_PRED[:4])
    b.update(torch.tensor(Y_TRUE[4:]), np.array(Y_PRED[4:]))
    a.merge(b.counts)
    _assert_report(a.result(LABELS), EXPECTED)
    assert a.counts.dtype == np.int64
    summed = ConfusionMatrix(3)
    summed.merge(a.counts + 0)  # e.g. after an all-reduce
    summed.merge(ConfusionMatrix(3))
    assert summed.counts.tolist() == EXPECTED["confusion"]
    a.reset()
    assert a.counts.sum() == 0
    with pytest.raises(DataError, match="shape"):
        a.merge(np.zeros((2, 2)))


def test_row_normalise():
    out = row_normalise([[2, 2], [0, 0], [1, 3]])
    np.testing.assert_allclose(out, [[0.5, 0.5], [0.0, 0.0], [0.25, 0.75]])


def test_majority_vote_with_tie():
    trial_ids = [7, 7, 7, 7, 3, 3, 3, 11]
    preds = [2, 1, 2, 1, 0, 2, 2, 1]
    # Trial 7: two votes for class 1, two for class 2 -> tie -> the lowest index, 1.
    # Trial 3: 0 once, 2 twice -> 2. Trial 11: a single vote for 1.
    assert majority_vote(trial_ids, preds, 3) == {3: 2, 7: 1, 11: 1}


def test_trial_votes_streaming_merge_and_result():
    a, b = TrialVotes(3), TrialVotes(3)
    a.update([7, 7, 3], [2, 1, 0])
    b.update(np.array([7, 7, 3, 3, 11]), torch.tensor([2, 1, 2, 2, 1]))
    a.merge(b.counts)
    assert {t: c.tolist() for t, c in a.counts.items()} == {
        3: [1, 0, 2], 7: [0, 2, 2], 11: [0, 1, 0]}
    # Predicted: 3 -> 2, 7 -> 1 (tie), 11 -> 1; true: 3 is E (2), 7 is N (0), 11 is I (1).
    result = a.result({3: 2, 7: 0, 11: 1, 99: 0})  # trial 99 has no votes: ignored
    assert result["predicted"] == {3: 2, 7: 1, 11: 1}
    assert result["n_trials"] == 3 and result["n_correct"] == 2
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["confusion"] == [[0, 1, 0], [0, 1, 0], [0, 0, 1]]
    with pytest.raises(DataError, match="no true label"):
        a.result({3: 2})
    a.reset()
    assert a.result({})["accuracy"] == 0.0
