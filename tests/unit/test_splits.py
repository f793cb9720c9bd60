"""Tests of raylab.data.splits: LOSO, LOUO and hold-out folds."""

from __future__ import annotations

import pytest

from raylab.data.splits import Fold, make_folds, validation_split
from raylab.errors import ConfigError, DataError

SUBJECTS = "BCDEFGHI"


def _trials(subjects: str = SUBJECTS, trials: range = range(1, 6),
            missing: tuple[str, ...] = ()) -> list[tuple[str, str, int]]:
    out = [(f"Suturing_{s}{k:03d}", s, k) for s in subjects for k in trials]
    return [t for t in out if t[0] not in missing]


def _check_partition(fold: Fold, trials: list[tuple[str, str, int]]) -> None:
    assert not set(fold.train) & set(fold.test)
    assert sorted(fold.train + fold.test) == sorted(t[0] for t in trials)
    assert fold.train == sorted(fold.train) and fold.test == sorted(fold.test)


def test_loso() -> None:
    trials = _trials(missing=("Suturing_G001",))
    folds = make_folds(trials, "loso")
    assert [f.name for f in folds] == [f"supertrial{k}" for k in range(1, 6)]
    number = {name: k for name, _, k in trials}
    for k, fold in enumerate(folds, start=1):
        _check_partition(fold, trials)
        assert {number[n] for n in fold.test} == {k}
        assert k not in {number[n] for n in fold.train}
    assert len(folds[0].test) == 7 and len(folds[1].test) == 8


def test_loso_skips_empty_folds() -> None:
    trials = _trials(trials=range(1, 4))
    assert [f.name for f in make_folds(trials, "loso")] == ["supertrial1", "supertrial2",
                                                           "supertrial3"]


def test_louo() -> None:
    trials = _trials(subjects="BCDFHI")
    folds = make_folds(trials, "louo")
    assert [f.name for f in folds] == [f"user{s}" for s in "BCDFHI"]
    subject = {name: s for name, s, _ in trials}
    for fold in folds:
        _check_partition(fold, trials)
        assert {subject[n] for n in fold.test} == {fold.name.removeprefix("user")}
        assert len(fold.test) == 5


def test_holdout_is_seeded() -> None:
    trials = _trials()
    (a,) = make_folds(trials, "holdout", holdout_fraction=0.25, seed=1)
    (b,) = make_folds(list(reversed(trials)), "holdout", holdout_fraction=0.25, seed=1)
    (c,) = make_folds(trials, "holdout", holdout_fraction=0.25, seed=2)
    assert a == b and a.name == "holdout"
    assert a.test != c.test
    assert len(a.test) == 10
    _check_partition(a, trials)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="cv: expected one of loso, louo, holdout"):
        make_folds(_trials(), "kfold")
    with pytest.raises(ConfigError, match="holdout_fraction"):
        make_folds(_trials(), "holdout", holdout_fraction=1.0)
    with pytest.raises(DataError, match="no trials"):
        make_folds([], "loso")
    with pytest.raises(DataError, match="repeated trial name"):
        make_folds(_trials() + _trials(subjects="B"), "loso")


def test_validation_split() -> None:
    names = [t[0] for t in _trials()]
    train, val = validation_split(names, 0.1, seed=0)
    assert len(val) == 4 and sorted(train + val) == sorted(names)
    assert not set(train) & set(val)
    assert validation_split(names, 0.1, seed=0) == (train, val)
    assert validation_split(names, 0.1, seed=5) != (train, val)
    assert validation_split(names[:2], 0.01, seed=0)[1] != []
    assert validation_split(names[:2], 0.9, seed=0)[0] != []
    assert validation_split(names[:1], 0.5, seed=0) == (names[:1], [])
    assert validation_split(names, 0.0, seed=0) == (sorted(names), [])
    with pytest.raises(ConfigError, match="val_fraction"):
        validation_split(names, 1.0, seed=0)
