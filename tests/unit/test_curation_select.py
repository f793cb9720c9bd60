"""raylab.curation.select: CLEAR-style time buckets, prompt ensembling, top-k selection.

Every expected value below is worked out by hand from data built so the answer is known.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter

import numpy as np
import pytest

from raylab.curation.select import (
    BucketSelection,
    assign_buckets,
    bucket_edges,
    class_embeddings,
    cosine_scores,
    parse_date_edges,
    select_bucket,
)
from raylab.errors import ConfigError

# ------------------------------------------------------------------------- time buckets


def test_quantile_edges_split_evenly() -> None:
    ts = np.arange(100, dtype=np.float64)
    edges = bucket_edges(np.random.default_rng(0).permutation(ts), 4)
    # Linear quantile q of 0..99 sits at position 99 q: 0, 24.75, 49.5, 74.25, 99.
    np.testing.assert_allclose(edges, [0.0, 24.75, 49.5, 74.25, 99.0])
    assert edges.dtype == np.float64
    # 0..24, 25..49, 50..74, 75..99 (99 == last edge goes into the last bucket).
    assert np.bincount(assign_buckets(ts, edges)).tolist() == [25, 25, 25, 25]
    np.testing.assert_array_equal(bucket_edges(ts, 1), [0.0, 99.0])


def test_assign_buckets_boundaries() -> None:
    edges = np.array([0.0, 10.0, 20.0])
    t = np.array([-1.0, 0.0, 5.0, 9.999, 10.0, 19.999, 20.0, 20.5, np.nan])
    # left-closed [0, 10), [10, 20]; the last edge is inclusive; outside (and NaN) is -1.
    got = assign_buckets(t, edges)
    assert got.tolist() == [-1, 0, 0, 0, 1, 1, 1, -1, -1]
    assert got.dtype == np.int64
    assert assign_buckets(t[:4].reshape(2, 2), edges).tolist() == [[-1, 0], [0, 0]]


@pytest.mark.parametrize(("ts", "n", "match"), [
    (np.arange(10), 0, "n_buckets must be an integer >= 1"),
    (np.array([]), 2, "no timestamps"),
    (np.array([1.0, np.nan]), 1, r"timestamp 1 is not finite"),
    # Quantile positions 0, 1, 2, 3, 4 of [1, 1, 1, 1, 2] give edges 1, 1, 1, 1, 2.
    (np.array([1, 1, 1, 1, 2]), 4, r"2 distinct timestamps among 5"),
    (np.array([5, 5, 5]), 1, r"1 distinct timestamps among 3"),
])
def test_bucket_edges_errors(ts: np.ndarray, n: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        bucket_edges(ts, n)


@pytest.mark.parametrize(("edges", "match"), [
    ([0.0], r"1-D list of at least 2, got shape \(1,\)"),
    ([0.0, 1.0, 1.0], "increase strictly"),
])
def test_assign_buckets_rejects_bad_edges(edges: list[float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        assign_buckets(np.array([0.5]), np.array(edges))


def test_parse_date_edges_iso_and_numbers() -> None:
    day = 86400.0
    jan1 = 1577836800.0  # 2020-01-01T00:00:00Z
    got = parse_date_edges([
        "2020-01-01",                 # naive date: midnight UTC
        "2020-01-02T00:00:00",        # naive datetime: UTC
        "2020-01-03T01:00:00+01:00",  # 00:00 UTC
        "2020-01-04T00:00:00Z",
        jan1 + 4 * day,               # POSIX seconds as given
        dt.date(2020, 1, 6),          # what YAML makes of an unquoted date
        int(jan1 + 6 * day),
    ])
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, jan1 + day * np.arange(7))


@pytest.mark.parametrize(("edges", "match"), [
    (["2020-01-01"], "at least 2 date edges, got 1"),
    ("2020-01-01", "must be a list"),
    (["2020-01-02", "2020-01-01"],
     r"date edge 1 \('2020-01-01'\) is not after date edge 0 \('2020-01-02'\)"),
    ([0, 10, 10], r"date edge 2 \(10\) is not after"),
    (["2020-01-01", "not a date"], r"date edge 1 \('not a date'\) is not an ISO-8601"),
    ([0.0, float("nan")], r"date edge 1 \(nan\) is not finite"),
    ([0, True], r"date edge 1 \(True\) is not a date"),
    ([None, 1], r"date edge 0 \(None\) is not a date"),
])
def test_parse_date_edges_errors(edges: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_date_edges(edges)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- CLIP scores


def test_class_embeddings_average_normalised_prompts() -> None:
    r = 1 / math.sqrt(2)
    got = class_embeddings([np.array([[2.0, 0.0], [0.0, 3.0]]), np.array([0.0, -5.0])])
    # [2, 0] and [0, 3] normalise to [1, 0] and [0, 1]; their mean [.5, .5] re-normalises to
    # [r, r]. (Averaging raw prompts would give [1, 1.5], another direction.) A 1-D array is
    # one prompt: [0, -5] -> [0, -1].
    np.testing.assert_allclose(got, [[r, r], [0.0, -1.0]], rtol=1e-6)
    assert got.dtype == np.float32 and got.shape == (2, 2)


@pytest.mark.parametrize(("prompts", "match"), [
    ([], "no classes"),
    ([np.ones((1, 2)), np.zeros((0, 2))], r"class 1 has no prompt embeddings"),
    ([np.ones((2, 2)), np.ones((1, 3))], r"class 1 prompt embeddings have dimension 3, "
                                         r"class 0's have 2"),
    ([np.array([[1.0, 0.0], [0.0, 0.0]])], r"class 0 prompt 1 embedding is a zero vector"),
    ([np.array([[1.0, 0.0], [-2.0, 0.0]])], "cancel out to a zero vector"),
    ([np.array([[1.0, np.inf]])], "not all finite"),
])
def test_class_embeddings_errors(prompts: list[np.ndarray], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        class_embeddings(prompts)


def test_cosine_scores_on_hand_vectors() -> None:
    images = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    classes = np.array([[1.0, 0.0], [0.0, 2.0]])  # not unit: normalised inside
    r = 1 / math.sqrt(2)
    got = cosine_scores(images, classes)
    # [3, 4]/5 = [.6, .8]; the zero image scores 0; [-1, 0] is opposite class 0.
    np.testing.assert_allclose(got, [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0], [r, r]], rtol=1e-6)
    assert got.dtype == np.float32


@pytest.mark.parametrize(("images", "classes", "match"), [
    (np.ones(3), np.ones((2, 3)), "must be 2-D"),
    (np.ones((4, 3)), np.ones((2, 5)), "image embeddings have dimension 3, class embeddings 5"),
])
def test_cosine_scores_errors(images: np.ndarray, classes: np.ndarray, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        cosine_scores(images, classes)


# ------------------------------------------------------------------------- selection

# Rows of a bucket scored against 2 classes. best, gap (best - second):
HAND = np.array([
    [0.90, 0.10],  # 0: class 0, best .90, gap .80
    [0.80, 0.20],  # 1: class 0, best .80, gap .60
    [0.85, 0.75],  # 2: 2nd for class 0 AND 2nd for class 1, best .85, gap .10
    [0.10, 0.90],  # 3: class 1, best .90, gap .80
    [0.20, 0.30],  # 4: best .30, gap .10
    [0.05, 0.10],  # 5: best .10, gap .05
    [0.30, 0.00],  # 6: best .30, gap .30
])


def _check(sel: BucketSelection, indices: list[int], labels: list[int], scores: list[float],
           ambiguous: list[int]) -> None:
    assert sel.indices.tolist() == indices
    assert sel.labels.tolist() == labels
    np.testing.assert_allclose(sel.scores, scores, rtol=1e-6)
    assert sel.ambiguous.tolist() == ambiguous
    assert (sel.indices.dtype, sel.labels.dtype, sel.scores.dtype, sel.ambiguous.dtype) == (
        np.int64, np.int64, np.float32, np.int64)


def test_cross_class_duplicate_dropped_not_refilled() -> None:
    sel = select_bucket(HAND, per_class=2)
    # Top 2 of class 0: rows 0 (.90), 2 (.85). Top 2 of class 1: rows 3 (.90), 2 (.75).
    # Row 2 is in both: ambiguous. Class 0 is NOT refilled with row 1 (.80).
    # Background (default 2) from rows 1, 4, 5, 6 with best .80, .30, .10, .30: the lowest
    # are 5 (.10) and then 4 (.30, tied with 6; the lower row wins); listed by score
    # descending: 4, 5.
    _check(sel, [0, 3, 4, 5], [0, 1, 2, 2], [0.90, 0.90, 0.30, 0.10], [2])


def test_no_background_rows() -> None:
    _check(select_bucket(HAND, per_class=2, background=0), [0, 3], [0, 1], [0.9, 0.9], [2])


def test_margin_rule() -> None:
    sel = select_bucket(HAND, per_class=1, margin=0.2)
    # Gaps below .2: rows 2 (.10), 4 (.10), 5 (.05): ambiguous before ranking. Class 0's
    # top 1 is row 0, class 1's row 3. Background (1) from the rows in no top set (1, 2, 4,
    # 5, 6): row 5, the lowest best score (.10), ambiguous by margin but low for both
    # classes, so background and not reported ambiguous.
    _check(sel, [0, 3, 5], [0, 1, 2], [0.90, 0.90, 0.10], [2, 4])


def test_margin_keeps_a_row_out_of_every_top_set() -> None:
    # Row 2 is the only one close to class 1 besides row 3, so with margin 0 it would take
    # class 1's second place; with margin .2 it is ambiguous and row 1 (.20) comes second.
    sel = select_bucket(HAND, per_class=2, margin=0.2, background=0)
    # Class 0 top 2 among rows 0, 1, 3, 6: 0 (.90), 1 (.80). Class 1: 3 (.90), 1 (.20).
    # Row 1 is in both: ambiguous too.
    _check(sel, [0, 3], [0, 1], [0.9, 0.9], [1, 2, 4, 5])


def test_single_class_never_ambiguous_by_margin() -> None:
    sel = select_bucket(np.array([[0.1], [0.9], [0.5]]), per_class=1, margin=0.5)
    # No second best: no margin. Top 1: row 1; background (1) of rows 0, 2: row 0 (.1).
    _check(sel, [1, 0], [0, 1], [0.9, 0.1], [])


def test_ties_broken_by_lower_row() -> None:
    sel = select_bucket(np.full((5, 1), 0.5), per_class=2)
    # All equal: class 0 takes rows 0, 1; background (2) the lowest rows left: 2, 3.
    _check(sel, [0, 1, 2, 3], [0, 0, 1, 1], [0.5] * 4, [])
    # Two classes scoring every row alike (gap 0, not < margin 0): both classes' top 1 is
    # row 0, so row 0 is ambiguous and neither class keeps a row; background: row 1.
    _check(select_bucket(np.full((3, 2), 0.5), per_class=1), [1], [2], [0.5], [0])
    # Any positive margin makes equal scores ambiguous: no top sets; background row 0.
    _check(select_bucket(np.full((3, 2), 0.5), per_class=1, margin=1e-9), [0], [2], [0.5],
           [1, 2])


def test_fewer_images_than_per_class_and_empty_bucket() -> None:
    sel = select_bucket(np.array([[0.9, 0.1], [0.2, 0.7]]), per_class=5)
    # Class 0's top set is all (non-ambiguous) rows: 0 (.9), 1 (.2); class 1's: 1 (.7), 0
    # (.1). Both rows are in two top sets: all ambiguous, nothing kept.
    _check(sel, [], [], [], [0, 1])
    _check(select_bucket(np.zeros((0, 3)), per_class=2), [], [], [], [])


def _reference(scores: np.ndarray, per_class: int, margin: float,
               background: int) -> tuple[list[int], list[int], list[int]]:
    """The four rules written as plain loops, for comparison."""
    s = scores.tolist()
    n, c = scores.shape
    amb = set()
    for i in range(n):
        ranked = sorted(s[i], reverse=True)
        if c > 1 and ranked[0] - ranked[1] < margin:
            amb.add(i)
    tops = []
    for k in range(c):
        cand = sorted((i for i in range(n) if i not in amb), key=lambda i: (-s[i][k], i))
        tops.append(cand[:per_class])
    count = Counter(i for top in tops for i in top)
    dup = {i for i, m in count.items() if m > 1}
    indices, labels = [], []
    for k, top in enumerate(tops):
        kept = [i for i in top if i not in dup]
        indices += kept
        labels += [k] * len(kept)
    rest = [i for i in range(n) if i not in count]  # margin does not bar the background
    low = sorted(rest, key=lambda i: (max(s[i]), i))[:background]
    low.sort(key=lambda i: (-max(s[i]), i))
    return indices + low, labels + [c] * len(low), sorted((amb | dup) - set(low))


@pytest.mark.parametrize("seed", range(20))
def test_matches_loop_reference_and_is_deterministic(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 40)), int(rng.integers(1, 5))
    # Quarter steps: exact in floating point and full of ties.
    scores = rng.integers(0, 9, size=(n, c)) / 4
    per_class, background = int(rng.integers(1, 6)), int(rng.integers(0, 6))
    margin = float(rng.choice([0.0, 0.25, 0.5]))
    sel = select_bucket(scores, per_class, margin=margin, background=background)
    indices, labels, ambiguous = _reference(scores, per_class, margin, background)
    assert sel.indices.tolist() == indices
    assert sel.labels.tolist() == labels
    assert sel.ambiguous.tolist() == ambiguous
    again = select_bucket(scores.copy(), per_class, margin=margin, background=background)
    for name in ("indices", "labels", "scores", "ambiguous"):
        np.testing.assert_array_equal(getattr(sel, name), getattr(again, name))


@pytest.mark.parametrize(("scores", "kwargs", "match"), [
    (HAND, {"per_class": 0}, "per_class must be >= 1, got 0"),
    (HAND, {"per_class": 1.5}, "per_class must be an integer"),
    (HAND, {"per_class": 1, "background": -1}, "background must be >= 0, got -1"),
    (HAND, {"per_class": 1, "margin": -0.1}, r"margin must be a finite number >= 0, got -0.1"),
    (np.ones(3), {"per_class": 1}, r"scores must be 2-D .* got shape \(3,\)"),
    (np.ones((3, 0)), {"per_class": 1}, "at least one class"),
    (np.array([[0.1, 0.2], [np.nan, 0.3]]), {"per_class": 1},
     "scores of image 1 are not all finite"),
])
def test_select_bucket_errors(scores: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        select_bucket(scores, **kwargs)


def test_a_uniformly_low_row_is_background_despite_the_margin() -> None:
    # Row 1 scores .02 and .01 (gap .01 < .1): ambiguous by rule 1, so in no top set. Top 1:
    # class 0 row 0, class 1 row 3. Background (1) of the rows in no top set (1 and 2): the
    # lowest best score, row 1 (.02), which then is not reported ambiguous.
    scores = np.array([[0.9, 0.1], [0.02, 0.01], [0.4, 0.1], [0.1, 0.8]])
    _check(select_bucket(scores, per_class=1, margin=0.1), [0, 3, 1], [0, 1, 2],
           [0.9, 0.8, 0.02], [])
    # With no background the same row stays ambiguous.
    _check(select_bucket(scores, per_class=1, margin=0.1, background=0), [0, 3], [0, 1],
           [0.9, 0.8], [1])


# ------------------------------------------------------------------------- end to end


def test_synthetic_prototypes_noise_between_and_orthogonal() -> None:
    rng = np.random.default_rng(0)
    dim, n_per = 32, 10
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    protos, spare = basis.T[:3], basis.T[3:]  # orthonormal directions

    def noisy(centre: np.ndarray, sigma: float) -> np.ndarray:
        return centre + sigma * rng.normal(size=dim)

    truth: list[str] = []
    rows = []
    for c in range(3):  # noise norm ~.02 * sqrt(32) = .11: cosine ~.99 own, ~.02 others
        rows += [noisy(protos[c], 0.02) for _ in range(n_per)]
        truth += [f"class{c}"] * n_per
    for a, b, k in ((0, 1, 4), (1, 2, 2)):  # halfway: ~.707 for both, gap ~.01 << .1
        rows += [noisy((protos[a] + protos[b]) / math.sqrt(2), 0.005) for _ in range(k)]
        truth += ["between"] * k
    # Near-orthogonal (~75 degrees from class j): best ~.25, the others ~.01. The gap (~.24)
    # clears the margin; images scoring alike for every class would be ambiguous by rule 1.
    for j in range(3):
        rows += [noisy(math.sqrt(1 - 0.25**2) * spare[j] + 0.25 * protos[j], 0.005)]
        truth += ["orthogonal"]
    order = rng.permutation(len(rows))
    images = 3.0 * np.array(rows)[order]  # the scale must not matter
    truth_arr = np.array(truth)[order]

    # Prompts of very different lengths: normalisation makes them count alike.
    prompts = [np.stack([s * noisy(protos[c], 0.01) for s in (0.2, 1.0, 5.0)])
               for c in range(3)]
    scores = cosine_scores(images, class_embeddings(prompts))
    between = truth_arr == "between"
    np.testing.assert_allclose(np.sort(scores[between], axis=1)[:, 1:], 1 / math.sqrt(2),
                               atol=0.05)

    # 8 of 10 per class: the 2 left over of each class (best ~.99) compete with the
    # near-orthogonal ones (~.25) for the 3 background places, and lose.
    sel = select_bucket(scores, per_class=8, margin=0.1, background=3)
    for c in range(3):
        got = set(sel.indices[sel.labels == c].tolist())
        assert len(got) == 8 and got <= set(np.flatnonzero(truth_arr == f"class{c}").tolist())
    assert sel.ambiguous.tolist() == np.flatnonzero(between).tolist()
    assert set(sel.indices[sel.labels == 3].tolist()) == set(
        np.flatnonzero(truth_arr == "orthogonal").tolist())
    assert (sel.scores[sel.labels < 3] > 0.95).all()
    np.testing.assert_allclose(sel.scores[sel.labels == 3], 0.25, atol=0.05)
    # Within each label group, scores descend.
    for label in range(4):
        group = sel.scores[sel.labels == label]
        assert (np.diff(group) <= 0).all()
