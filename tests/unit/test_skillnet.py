"""SkillNet shapes, layer order, gradients, and the parameter/MAC counters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raylab.errors import ConfigError, DataError
from raylab.models import SkillNet, count_macs, count_params

TINY = dict(in_channels=4, window=8, num_classes=3, channels=(2, 3, 5), kernel_size=3, pool=2,
            fc_dim=6)


@pytest.mark.parametrize("window", [30, 60, 90])
def test_output_shapes(window):
    model = SkillNet(window=window).eval()
    x = torch.randn(4, window, 76)
    # Lengths: window // 2 // 2 // 2 (odd kernel keeps the length): 30 -> 3, 60 -> 7, 90 -> 11.
    length = window // 8
    assert model.num_features == 256 * length
    assert model.forward_features(x).shape == (4, 256 * length)
    assert model(x).shape == (4, 3)
    feats = model.forward_features(x)
    assert model.forward_head(feats, pre_logits=True).shape == (4, 128)


def test_every_parameter_gets_a_finite_gradient():
    torch.manual_seed(0)
    model = SkillNet(window=60).train()
    logits = model(torch.randn(8, 60, 76))
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_layer_order_and_dropouts():
    model = SkillNet()
    leaves = [m for m in model.modules() if not list(m.children())]
    kinds = [type(m).__name__ for m in leaves]
    block = ["Conv1d", "ReLU", "MaxPool1d", "Dropout"]
    assert kinds == block * 3 + ["Flatten", "Linear", "ReLU", "Dropout", "Linear"]
    drops = [m.p for m in leaves if isinstance(m, nn.Dropout)]
    assert drops == [0.2, 0.2, 0.2, 0.5]
    convs = [m for m in leaves if isinstance(m, nn.Conv1d)]
    assert [c.out_channels for c in convs] == [64, 128, 256]
    assert all(c.padding == (2,) for c in convs)


def test_count_params_matches_hand_formula():
    model = SkillNet(**TINY)
    # Lengths 8 -> 4 -> 2 -> 1, so num_features = 5 * 1.
    conv = (4 * 2 * 3 + 2) + (2 * 3 * 3 + 3) + (3 * 5 * 3 + 5)  # 26 + 21 + 50
    fc = (5 * 6 + 6) + (6 * 3 + 3)  # 36 + 21
    assert count_params(model) == conv + fc == 154
    model.fc.weight.requires_grad_(False)
    assert count_params(model, trainable_only=True) == 154 - 18


def test_count_macs_known_answers():
    assert count_macs(nn.Linear(10, 5), (10,)) == 50
    # Conv1d 4 -> 2, kernel 3, 'same' padding over length 8: 2 x 8 outputs x (4 x 3) MACs.
    assert count_macs(nn.Conv1d(4, 2, 3, padding=1), (4, 8)) == 192
    # TINY: convs 2*8*12 + 3*4*6 + 5*2*9 = 192 + 72 + 90; FCs 5*6 + 6*3 = 48.
    model = SkillNet(**TINY).train()
    assert count_macs(model, (8, 4)) == 402
    assert model.training  # mode restored


def test_reset_classifier_and_no_classifier():
    model = SkillNet(**TINY)
    model.reset_classifier(5)
    assert model.num_classes == 5
    assert model(torch.randn(2, 8, 4)).shape == (2, 5)
    model.reset_classifier(0)
    assert model(torch.randn(2, 8, 4)).shape == (2, 6)
    assert isinstance(model.get_classifier(), nn.Identity)


def test_config_and_input_errors():
    with pytest.raises(ConfigError, match="too short"):
        SkillNet(window=4)  # 4 -> 2 -> 1 -> 0 after three pools of 2
    with pytest.raises(ConfigError, match="dropout_fc"):
        SkillNet(dropout_fc=1.0)
    with pytest.raises(ConfigError, match="kernel_size"):
        SkillNet(kernel_size=0)
    assert SkillNet(window=8).feature_length == 1  # the shortest window that works
    with pytest.raises(DataError, match=r"\[B, 60, 76\]"):
        SkillNet()(torch.randn(2, 76, 60))
