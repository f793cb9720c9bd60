"""Cross-validation folds over trial names: LOSO, LOUO and a seeded hold-out split.

LOSO ("leave one supertrial out") tests trial ``k`` of every subject in fold ``k``; LOUO
("leave one user out") tests every trial of one subject per fold; both are the standard
JIGSAWS protocols. All outputs are sorted, so folds do not depend on input order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from raylab.errors import ConfigError, DataError

CV_SCHEMES = ("loso", "louo", "holdout")


@dataclass
class Fold:
    """One train/test split.

    Attributes:
        name: E.g. ``supertrial1``, ``userB`` or ``holdout``.
        train: Training trial names.
        test: Test trial names.
    """

    name: str
    train: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)


def make_folds(trials: Sequence[tuple[str, str, int]], cv: str, holdout_fraction: float = 0.25,
               seed: int = 0) -> list[Fold]:
    """Split trials into folds.

    Args:
        trials: ``(name, subject, trial number)`` per trial; names must be unique.
        cv: ``"loso"`` (one fold per trial number, named ``supertrial<k>``), ``"louo"``
            (one fold per subject, named ``user<S>``) or ``"holdout"`` (one seeded random
            trial-level split named ``holdout``).
        holdout_fraction: Test fraction for ``"holdout"``, in (0, 1).
        seed: Seed for ``"holdout"``.

    Returns:
        Folds with non-empty test sets.

    Raises:
        ConfigError: Unknown ``cv`` or bad ``holdout_fraction``.
        DataError: No trials, or a repeated name.
    """
    if cv not in CV_SCHEMES:
        raise ConfigError(f"cv: expected one of {', '.join(CV_SCHEMES)}, got {cv!r}")
    names = [name for name, _, _ in trials]
    if not names:
        raise DataError("no trials to split; expected at least one labelled trial")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"repeated trial name(s) {', '.join(dup)}; expected unique names")
    if cv == "holdout":
        return [_holdout(names, holdout_fraction, seed)]
    key = 2 if cv == "loso" else 1
    prefix = "supertrial" if cv == "loso" else "user"
    groups = sorted({t[key] for t in trials})
    folds = [_fold(f"{prefix}{g}", trials, lambda t, g=g: t[key] == g) for g in groups]
    return [f for f in folds if f.test]


def _fold(name: str, trials: Sequence[tuple[str, str, int]],
          is_test: Callable[[tuple[str, str, int]], bool]) -> Fold:
    """Fold whose test set holds the trials for which ``is_test`` is true."""
    test = sorted(t[0] for t in trials if is_test(t))
    train = sorted(t[0] for t in trials if not is_test(t))
    return Fold(name=name, train=train, test=test)


def _holdout(names: list[str], fraction: float, seed: int) -> Fold:
    """Seeded random trial-level split."""
    if not 0 < fraction < 1:
        raise ConfigError(f"holdout_fraction: expected a number in (0, 1), got {fraction!r}")
    train, test = _seeded_split(names, fraction, seed)
    return Fold(name="holdout", train=train, test=test)


def _seeded_split(names: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Move ``round(fraction * n)`` names (at least 1, at most n - 1) to the second list."""
    pool = sorted(names)
    if fraction <= 0 or len(pool) < 2:
        return pool, []
    n_out = min(len(pool) - 1, max(1, round(fraction * len(pool))))
    picked = set(random.Random(seed).sample(pool, n_out))
    return [n for n in pool if n not in picked], [n for n in pool if n in picked]


def validation_split(train: Sequence[str], fraction: float,
                     seed: int) -> tuple[list[str], list[str]]:
    """Split training trials into train and validation trials.

    Args:
        train: Training trial names.
        fraction: Validation fraction in [0, 1); 0 gives no validation set.
        seed: Random seed.

    Returns:
        ``(train, val)``, both sorted; ``val`` has at least one trial when
        ``fraction > 0`` and there are at least two trials, and ``train`` keeps at least one.

    Raises:
        ConfigError: ``fraction`` outside [0, 1).
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"val_fraction: expected a number in [0, 1), got {fraction!r}")
    return _seeded_split(list(train), fraction, seed)
