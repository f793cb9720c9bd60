"""Training-criterion choice and top-k counts against hand-made examples."""

from __future__ import annotations

import math

import pytest
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from raylab.errors import ConfigError
from raylab.losses import topk_correct, train_criterion


def test_criterion_choice():
    assert isinstance(train_criterion(True, 0.1), SoftTargetCrossEntropy)
    assert isinstance(train_criterion(True, 0.0), SoftTargetCrossEntropy)
    ls = train_criterion(False, 0.1)
    assert isinstance(ls, LabelSmoothingCrossEntropy) and ls.smoothing == pytest.approx(0.1)
    assert type(train_criterion(False, 0.0)) is nn.CrossEntropyLoss
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="smoothing"):
            train_criterion(False, bad)


def test_criterion_values_by_hand():
    logits = torch.tensor([[math.log(2.0), 0.0, 0.0]])  # softmax = [1/2, 1/4, 1/4]
    logp = [math.log(0.5), math.log(0.25), math.log(0.25)]
    # Soft targets [0.6, 0.4, 0]: -(0.6 log 1/2 + 0.4 log 1/4).
    soft = train_criterion(True, 0.1)(logits, torch.tensor([[0.6, 0.4, 0.0]]))
    assert float(soft) == pytest.approx(-(0.6 * logp[0] + 0.4 * logp[1]))
    # Smoothing 0.3 on class 0: 0.7 * NLL + 0.3 * mean over classes of -log p.
    smooth = train_criterion(False, 0.3)(logits, torch.tensor([0]))
    assert float(smooth) == pytest.approx(0.7 * -logp[0] + 0.3 * -sum(logp) / 3)
    assert float(train_criterion(False, 0.0)(logits, torch.tensor([1]))) == pytest.approx(
        -logp[1])


def test_topk_correct_hand_made():
    logits = torch.tensor([
        [0.1, 0.5, 0.2, 0.9, 0.0, 0.3],  # order 3, 1, 5, 2, 0, 4
        [0.9, 0.1, 0.2, 0.3, 0.4, 0.5],  # order 0, 5, 4, 3, 2, 1
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # order 5, 4, 3, 2, 1, 0
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # order 0, 1, 2, 3, 4, 5
    ])
    target = torch.tensor([3, 4, 0, 4])
    # Ranks of the targets: 1, 3, 6, 5 -> top-1: 1, top-2: 1, top-3: 2, top-5: 3, top-6: 4.
    assert topk_correct(logits, target, ks=(1, 2, 3, 5, 6)) == {1: 1, 2: 1, 3: 2, 5: 3, 6: 4}
    assert topk_correct(logits, target) == {1: 1, 5: 3}
    # Soft targets use their argmax.
    soft = torch.nn.functional.one_hot(target, 6).float() * 0.9 + 0.1 / 6
    assert topk_correct(logits, soft, ks=(1, 5)) == {1: 1, 5: 3}


def test_topk_caps_k_at_the_class_count():
    logits = torch.tensor([[0.2, 0.5, 0.3], [0.9, 0.0, 0.1]])
    target = torch.tensor([0, 1])
    # 3 classes: top-5 means top-3, every sample is correct.
    assert topk_correct(logits, target, ks=(1, 5)) == {1: 0, 5: 2}
    assert topk_correct(logits[:0], target[:0]) == {1: 0, 5: 0}


def test_topk_errors():
    with pytest.raises(ValueError, match="target"):
        topk_correct(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=">= 1"):
        topk_correct(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), ks=(0,))
    with pytest.raises(ValueError, match="logits"):
        topk_correct(torch.zeros(3), torch.zeros(3, dtype=torch.long))
