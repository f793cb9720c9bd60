"""Per-iteration cosine schedules and the optimizer setters (pure numpy/torch, no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from raylab.engine.schedules import cosine_schedule, set_lr, set_weight_decay, step_schedule


def test_cosine_without_warmup_by_hand():
    s = cosine_schedule(1.0, 0.0, epochs=2, iters_per_epoch=4)
    assert s.shape == (8,) and s.dtype == np.float64
    # value i = 0.5 * (1 + cos(pi * i / 8)); i = 4 is the midpoint, 0.5 exactly.
    assert s[0] == 1.0
    assert s[4] == pytest.approx(0.5)
    assert s[2] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))  # 0.853553...
    assert s[-1] == pytest.approx(0.5 * (1 + math.cos(7 * math.pi / 8)))  # one step short
    assert np.all(np.diff(s) < 0)


def test_cosine_with_warmup_by_hand():
    # ConvNeXt-like: 2 warm-up epochs of 5 iterations from 0 to 4e-3, then cosine to 1e-6.
    base, final = 4e-3, 1e-6
    s = cosine_schedule(base, final, epochs=10, iters_per_epoch=5, warmup_epochs=2)
    assert len(s) == 50
    # linspace(0, base, 10): step base / 9.
    np.testing.assert_allclose(s[:10], [base * i / 9 for i in range(10)], rtol=1e-12)
    assert s[0] == 0.0 and s[9] == pytest.approx(base)
    # Cosine over n = 40 iterations: s[10 + i] = final + (base - final)/2 (1 + cos(pi i/40)).
    assert s[10] == pytest.approx(base)
    assert s[30] == pytest.approx((base + final) / 2)  # midpoint, i = 20
    assert s[49] == pytest.approx(final + (base - final) / 2 * (1 + math.cos(math.pi * 39 / 40)))
    assert s[49] > final


def test_cosine_rising_start_warmup_and_full_warmup():
    # DINO teacher momentum 0.996 -> 1 rises; start_warmup is the first value.
    m = cosine_schedule(0.996, 1.0, epochs=3, iters_per_epoch=10)
    assert m[0] == pytest.approx(0.996) and np.all(np.diff(m) > 0) and m[-1] < 1.0
    w = cosine_schedule(0.1, 0.0, epochs=2, iters_per_epoch=3, warmup_epochs=1,
                        start_warmup=0.04)
    np.testing.assert_allclose(w[:3], [0.04, 0.07, 0.1])
    only = cosine_schedule(1.0, 0.0, epochs=2, iters_per_epoch=2, warmup_epochs=2)
    np.testing.assert_allclose(only, [0.0, 1 / 3, 2 / 3, 1.0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0, iters_per_epoch=5), "epochs"),
    (dict(epochs=3, iters_per_epoch=0), "iters_per_epoch"),
    (dict(epochs=3, iters_per_epoch=5, warmup_epochs=4), "longer than the run"),
    (dict(epochs=3, iters_per_epoch=5, warmup_epochs=-1), "warmup_epochs"),
    (dict(epochs=2.5, iters_per_epoch=5), "epochs"),
])
def test_cosine_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cosine_schedule(1.0, 0.0, **kwargs)
    with pytest.raises(ValueError, match="finite"):
        cosine_schedule(float("nan"), 0.0, 1, 1)


def _optimizer() -> torch.optim.Optimizer:
    a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    return torch.optim.AdamW([
        {"params": [a], "lr_scale": 0.25, "weight_decay": 0.05},
        {"params": [b], "lr_scale": 1.0, "weight_decay": 0.0},
        {"params": [c], "weight_decay": 0.05},  # no lr_scale key: scale 1
    ], lr=1.0)


def test_set_lr_applies_lr_scale():
    opt = _optimizer()
    set_lr(opt, 2e-3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 2e-3, 2e-3])


def test_set_weight_decay_only_on_decayed_groups():
    opt = _optimizer()
    set_weight_decay(opt, 0.4)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.4, 0.0, 0.4]
    set_weight_decay(opt, 0.0)  # a schedule passing through 0 ...
    set_weight_decay(opt, 0.1)  # ... does not lose the decayed groups
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.1]


def test_step_schedule_decays_at_the_milestones_by_hand() -> None:
    # 10 epochs x 10 iterations: decays at iterations 50 (0.5) and 80 (0.8).
    values = step_schedule(1.0, 10, 10, milestones=(0.5, 0.8), gamma=0.1)
    assert len(values) == 100
    assert values[0] == values[49] == 1.0
    assert values[50] == values[79] == pytest.approx(0.1)
    assert values[80] == values[99] == pytest.approx(0.01)


def test_step_schedule_warm_up_ramps_linearly_from_the_factor() -> None:
    values = step_schedule(2.0, 1, 100, milestones=(), warmup_iters=10, warmup_factor=0.001)
    assert values[0] == pytest.approx(0.002)  # 2.0 * 0.001
    assert values[5] == pytest.approx(2.0 * (0.001 + 0.999 * 0.5))
    assert values[10] == values[99] == 2.0


@pytest.mark.parametrize("kwargs", [{"milestones": (0.8, 0.5)}, {"milestones": (1.5,)},
                                    {"gamma": 0.0}, {"warmup_factor": 2.0}])
def test_step_schedule_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        step_schedule(1.0, 2, 3, **kwargs)
