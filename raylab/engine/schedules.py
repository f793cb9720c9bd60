"""Per-iteration schedules (learning rate, weight decay, EMA momentum) and their setters.

Pure numpy/torch, no Ray import. :func:`cosine_schedule` is the DINO reference's
``cosine_scheduler`` (facebookresearch/dino ``utils.py``): a precomputed array indexed by
the global iteration, used for the lr (ConvNeXt, DINO), DINO's weight decay 0.04 -> 0.4 and
its teacher momentum 0.996 -> 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

import numpy as np
import torch


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def cosine_schedule(
    base: float,
    final: float,
    epochs: int,
    iters_per_epoch: int,
    warmup_epochs: int = 0,
    start_warmup: float = 0.0,
) -> np.ndarray:
    """One value per training iteration: linear warm-up, then a cosine from ``base`` to
    ``final``.

    With ``W = warmup_epochs * iters_per_epoch`` and ``n = epochs * iters_per_epoch - W``:
    values ``0..W-1`` are ``np.linspace(start_warmup, base, W)`` (the last warm-up value
    is ``base``), and value ``W + i`` is
    ``final + 0.5 * (base - final) * (1 + cos(pi * i / n))`` for ``i`` in ``0..n-1``. As
    in DINO, the cosine starts at ``base`` and its last value is one step short of
    ``final``.

    Args:
        base: Value at the end of warm-up / start of the cosine.
        final: Value the cosine decays (or rises, e.g. EMA momentum) towards.
        epochs: Training epochs (>= 1).
        iters_per_epoch: Iterations (optimizer steps) per epoch (>= 1).
        warmup_epochs: Warm-up epochs (>= 0, at most ``epochs``).
        start_warmup: First warm-up value.

    Returns:
        float64 array of length ``epochs * iters_per_epoch``.

    Raises:
        ValueError: A count is not a non-negative/positive integer, the warm-up is longer
            than the run, or a value is not finite.
    """
    _check_count("epochs", epochs, 1)
    _check_count("iters_per_epoch", iters_per_epoch, 1)
    _check_count("warmup_epochs", warmup_epochs, 0)
    if warmup_epochs > epochs:
        raise ValueError(f"warmup_epochs ({warmup_epochs}) is longer than the run ({epochs} "
                         f"epochs)")
    for name, value in (("base", base), ("final", final), ("start_warmup", start_warmup)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    total = int(epochs) * int(iters_per_epoch)
    warmup_iters = int(warmup_epochs) * int(iters_per_epoch)
    warmup = np.linspace(start_warmup, base, warmup_iters)
    n = total - warmup_iters
    steps = np.arange(n, dtype=np.float64)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * steps / max(n, 1)))
    return np.concatenate((warmup, cosine)).astype(np.float64)


def step_schedule(
    base: float,
    epochs: int,
    iters_per_epoch: int,
    milestones: Sequence[float] = (0.889, 0.963),
    gamma: float = 0.1,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
) -> np.ndarray:
    """One value per training iteration: linear warm-up, then ``base`` multiplied by
    ``gamma`` at each milestone (the detection recipes' schedule; ViTDet decays at 88.9 %
    and 96.3 % of its 100 epochs).

    Value ``i`` is ``base * gamma ** (number of milestones <= i / total)``, times
    ``warmup_factor + (1 - warmup_factor) * i / warmup_iters`` while ``i < warmup_iters``.

    Args:
        base: The value after warm-up.
        epochs, iters_per_epoch: The run's length (each >= 1).
        milestones: Fractions of the run in (0, 1], increasing.
        gamma: The factor at each milestone, in (0, 1].
        warmup_iters: Warm-up iterations (capped at the run's length).
        warmup_factor: The first warm-up value as a fraction of ``base``.

    Raises:
        ValueError: A bad count, milestone or factor.
    """
    _check_count("epochs", epochs, 1)
    _check_count("iters_per_epoch", iters_per_epoch, 1)
    _check_count("warmup_iters", warmup_iters, 0)
    if list(milestones) != sorted(milestones) or any(not 0 < m <= 1 for m in milestones):
        raise ValueError(f"milestones must be increasing fractions in (0, 1], got "
                         f"{list(milestones)}")
    if not 0 < gamma <= 1 or not 0 <= warmup_factor <= 1 or not math.isfinite(base):
        raise ValueError(f"need 0 < gamma <= 1, 0 <= warmup_factor <= 1 and a finite base; "
                         f"got {gamma!r}, {warmup_factor!r}, {base!r}")
    total = int(epochs) * int(iters_per_epoch)
    progress = np.arange(total, dtype=np.float64) / total
    decays = (progress[:, None] >= np.asarray(milestones, dtype=np.float64)[None, :]).sum(1)
    values = base * gamma ** decays.astype(np.float64)
    warm = min(int(warmup_iters), total)
    if warm:
        ramp = np.arange(warm, dtype=np.float64) / warm
        values[:warm] *= warmup_factor + (1.0 - warmup_factor) * ramp
    return values


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's ``lr`` to ``lr * group.get("lr_scale", 1.0)`` (layer decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def set_weight_decay(optimizer: torch.optim.Optimizer, wd: float) -> None:
    """Set ``weight_decay`` to ``wd`` on the groups that have weight decay.

    A group counts as decayed when its ``weight_decay`` is > 0 at the first call; that is
    remembered in its ``wd_scheduled`` key, so a schedule passing through 0 does not lose
    it. Groups without decay (norms, biases, position embeddings) keep 0. Build the
    optimizer with a weight decay > 0 (e.g. the schedule's first value).
    """
    for group in optimizer.param_groups:
        if group.setdefault("wd_scheduled", group.get("weight_decay", 0.0) > 0):
            group["weight_decay"] = wd

