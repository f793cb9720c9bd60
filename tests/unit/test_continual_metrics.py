"""CLEAR's accuracy-matrix metrics against hand-worked numbers and a loop reference."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raylab.metrics.continual import AccuracyMatrix, clear_metrics


def reference_clear_metrics(R: list[list[float]]) -> dict[str, float]:
    """The paper's plain averages, written as loops over (i, j)."""
    t = len(R)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    return {
        "in_domain": mean([R[i][i] for i in range(t)]),
        "next_domain": mean([R[i][i + 1] for i in range(t - 1)]),
        "accuracy": mean([R[i][j] for i in range(t) for j in range(t) if i >= j]),
        "backward_transfer": mean([R[i][j] for i in range(t) for j in range(t) if i > j]),
        "forward_transfer": mean([R[i][j] for i in range(t) for j in range(t) if i < j]),
    }


def test_hand_worked_3x3() -> None:
    R = [[0.9, 0.3, 0.6],
         [0.5, 0.8, 0.4],
         [0.7, 0.2, 1.0]]
    got = clear_metrics(R)
    assert set(got) == {"in_domain", "next_domain", "accuracy", "backward_transfer",
                        "forward_transfer"}
    assert got["in_domain"] == pytest.approx((0.9 + 0.8 + 1.0) / 3)  # 0.9
    assert got["next_domain"] == pytest.approx((0.3 + 0.4) / 2)  # R01, R12: 0.35
    # lower triangle with the diagonal: .9, .5, .8, .7, .2, 1.0 -> 4.1 / 6
    assert got["accuracy"] == pytest.approx(4.1 / 6)
    assert got["backward_transfer"] == pytest.approx((0.5 + 0.7 + 0.2) / 3)  # 0.4667
    assert got["forward_transfer"] == pytest.approx((0.3 + 0.6 + 0.4) / 3)  # 0.4333


def test_methods_md_example() -> None:
    R = np.array([[.5, .4, .3], [.6, .7, .5], [.55, .65, .8]])
    got = clear_metrics(R)
    want = {"in_domain": 0.6667, "next_domain": 0.45, "accuracy": 0.6333,
            "backward_transfer": 0.60, "forward_transfer": 0.40}
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=5e-5), key


@pytest.mark.parametrize("t", [2, 3, 5, 10])
def test_matches_loop_reference(t: int) -> None:
    R = np.random.default_rng(t).uniform(0.0, 1.0, size=(t, t))
    got = clear_metrics(R)
    want = reference_clear_metrics(R.tolist())
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    assert all(isinstance(v, float) for v in got.values())


def test_two_buckets_by_hand() -> None:
    got = clear_metrics([[0.2, 0.4], [0.6, 1.0]])
    assert got == pytest.approx({"in_domain": 0.6, "next_domain": 0.4, "accuracy": 0.6,
                                 "backward_transfer": 0.6, "forward_transfer": 0.4})


@pytest.mark.parametrize(("R", "match"), [
    ([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], "square"),
    ([[0.5, 0.5], [0.5]], "square"),
    ([[0.5]], "T >= 2"),
    ([], "T >= 2"),
    (np.zeros(4), "2-D"),
    ("0.5", "2-D"),
    ([[0.5, 1.5], [0.5, 0.5]], r"R\[0\]\[1\].*\[0, 1\]"),
    ([[0.5, 0.5], [-0.1, 0.5]], r"R\[1\]\[0\]"),
    ([[85.0, 90.0], [80.0, 95.0]], "not a percentage"),
    ([[0.5, float("nan")], [0.5, 0.5]], r"R\[0\]\[1\]"),
    ([[0.5, None], [0.5, 0.5]], "must be a number"),
])
def test_bad_matrices_are_reported(R: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        clear_metrics(R)


def test_accuracy_matrix_fill_and_result() -> None:
    m = AccuracyMatrix(2)
    assert not m.complete() and m.missing() == [(0, 0), (0, 1), (1, 0), (1, 1)]
    m.set(0, 0, 0.2)
    m.set(0, 1, 0.4)
    assert m.row(0) == [0.2, 0.4] and m.row(1) == [None, None]
    with pytest.raises(ValueError, match=r"incomplete: R\[1\]\[0\], R\[1\]\[1\]"):
        m.result()
    m.update(1, 0, 0.6)
    m.set(1, 1, 1.0)
    assert m.complete() and m.get(1, 0) == 0.6
    assert m.result() == clear_metrics([[0.2, 0.4], [0.6, 1.0]])
    m.reset()
    assert m.missing() == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_accuracy_matrix_json_round_trip() -> None:
    m = AccuracyMatrix(3)
    m.set(0, 0, 0.5)
    m.set(0, 1, 0.25)
    m.set(2, 1, 1.0)
    text = json.dumps(m.to_list())
    back = AccuracyMatrix.from_list(json.loads(text))
    assert back == m and back.num_buckets == 3
    assert back.to_list() == [[0.5, 0.25, None], [None, None, None], [None, 1.0, None]]
    row = back.row(0)
    row[0] = 0.0  # a copy: the matrix is unchanged
    assert back.get(0, 0) == 0.5


def test_accuracy_matrix_checks_inputs() -> None:
    with pytest.raises(ValueError, match="num_buckets >= 2"):
        AccuracyMatrix(1)
    m = AccuracyMatrix(3)
    with pytest.raises(ValueError, match=r"j must be a bucket index in 0\.\.2"):
        m.set(0, 3, 0.5)
    with pytest.raises(ValueError, match=r"i must be a bucket index"):
        m.row(-1)
    with pytest.raises(ValueError, match=r"R\[0\]\[0\]"):
        m.set(0, 0, 1.01)
    with pytest.raises(ValueError, match="row 1 has 2 entries, expected 3"):
        AccuracyMatrix.from_list([[None] * 3, [None] * 2, [None] * 3])
    with pytest.raises(ValueError, match="num_buckets >= 2"):
        AccuracyMatrix.from_list([[0.5]])
