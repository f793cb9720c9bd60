"""Frozen-backbone modes: trainable counts of ResNet-18 worked out by hand, BatchNorm
statistics frozen or updating, no gradients for frozen parameters, the optimizer's groups."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from raylab.errors import ConfigError
from raylab.models.freeze import (
    FREEZE_MODES,
    FreezeSummary,
    FrozenBatchNorm,
    freeze_backbone,
    freeze_summary,
    is_norm_layer,
    trainable_parameter_count,
)
from raylab.optim.param_groups import build_optimizer

#: ResNet-18 with a 10-class head, by hand: torchvision's 1000-class count 11,689,512 less
#: its fc (512 x 1000 + 1000 = 513,000) plus a 10-class fc (512 x 10 + 10 = 5,130).
RESNET18_10 = 11_689_512 - 513_000 + 5_130
FC = 512 * 10 + 10
#: BatchNorm channels of ResNet-18: the stem's 64; layer1: 2 blocks x 2 BN x 64; layers
#: 2-4: 2 blocks x 2 BN + 1 downsample BN = 5 BN of 128, 256, 512 channels.
BN_CHANNELS = 64 + 4 * 64 + 5 * 128 + 5 * 256 + 5 * 512
BN_AFFINE = 2 * BN_CHANNELS  # a weight and a bias per channel


def is_head(name: str) -> bool:
    return name.startswith("fc.")


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=10)


def _step(model: nn.Module) -> None:
    """One training-mode forward, backward and SGD step over the trainable parameters."""
    model.train()
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_resnet18_counts_by_hand() -> None:
    assert BN_CHANNELS == 4800 and BN_AFFINE == 9600
    model = resnet18()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1 + 4 + 5 + 5 + 5
    assert sum(2 * m.num_features for m in bns) == BN_AFFINE

    assert freeze_summary(freeze_backbone(model, "none", is_head)) == FreezeSummary(
        RESNET18_10, RESNET18_10, 0)

    model = freeze_backbone(resnet18(), "backbone", is_head)
    assert trainable_parameter_count(model) == FC + BN_AFFINE
    assert freeze_summary(model) == FreezeSummary(RESNET18_10, FC + BN_AFFINE,
                                                  RESNET18_10 - FC - BN_AFFINE)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())

    # backbone+norms: the BN affine terms become buffers of FrozenBatchNorm2d, so they
    # leave the parameter count as well as the trainable one.
    model = freeze_backbone(resnet18(), "backbone+norms", is_head)
    assert freeze_summary(model) == FreezeSummary(RESNET18_10 - BN_AFFINE, FC,
                                                  RESNET18_10 - BN_AFFINE - FC)
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_batch_norm_statistics_frozen_only_with_norms() -> None:
    frozen = freeze_backbone(resnet18(), "backbone+norms", is_head)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    _step(frozen)
    after = frozen.state_dict()
    for key in ("bn1.running_mean", "bn1.running_var", "layer2.0.downsample.1.running_var",
                "layer4.1.bn2.running_mean", "bn1.weight", "layer3.0.bn1.bias"):
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["fc.weight"], before["fc.weight"])

    model = freeze_backbone(resnet18(), "backbone", is_head)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model)
    after = model.state_dict()
    assert not torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])
    assert not torch.equal(after["layer4.1.bn2.running_var"], before["layer4.1.bn2.running_var"])
    assert not torch.equal(after["bn1.weight"], before["bn1.weight"])  # BN affine trains
    assert torch.equal(after["conv1.weight"], before["conv1.weight"])


def test_frozen_parameters_get_no_gradient() -> None:
    model = freeze_backbone(resnet18(), "backbone", is_head)
    model.train()
    nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2])).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert model.conv1.weight.grad is None and model.layer1[0].conv2.weight.grad is None
    assert model.bn1.weight.grad is not None and model.fc.weight.grad is not None


def test_build_optimizer_takes_trainable_parameters_only() -> None:
    model = freeze_backbone(resnet18(), "backbone", is_head)
    optimizer = build_optimizer(model, "sgd", lr=0.1, weight_decay=1e-4)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert all(p.requires_grad for p in params)
    assert sum(p.numel() for p in params) == FC + BN_AFFINE


def test_norm_layers_kept_in_backbone_mode() -> None:
    norms = (nn.BatchNorm1d(4), nn.GroupNorm(2, 4), nn.LayerNorm(4), LayerNorm2d(4))
    assert all(is_norm_layer(m) for m in norms)
    assert not is_norm_layer(nn.Linear(4, 4)) and not is_norm_layer(nn.Conv2d(4, 4, 1))
    model = nn.Sequential(nn.Conv2d(3, 4, 1), LayerNorm2d(4), nn.GroupNorm(2, 4),
                          nn.Flatten(), nn.Linear(4, 2))
    freeze_backbone(model, "backbone", lambda n: n.startswith("4."))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "1.weight", "1.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    freeze_backbone(model, "backbone+norms", lambda n: n.startswith("4."))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["4.weight", "4.bias"]


def test_batch_norm_in_trainable_part_and_other_ranks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4),  # backbone
                          nn.Linear(4, 4), nn.BatchNorm1d(4))  # head: "2.*", "3.*"
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
    model = freeze_backbone(model, "backbone+norms", lambda n: n[0] in "23")
    assert isinstance(model[1], FrozenBatchNorm) and isinstance(model[3], nn.BatchNorm1d)
    model.train()
    x = torch.randn(8, 3)
    model(x).sum().backward()
    assert torch.equal(model[1].running_mean, torch.full((4,), 0.5))
    assert not torch.equal(model[3].running_mean, torch.zeros(4))  # the head's BN updates
    # The frozen BN computes what the eval-mode BN computed.
    bn = nn.BatchNorm1d(4).eval()
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        torch.testing.assert_close(model[1](x[:, :1].expand(8, 4)), bn(x[:, :1].expand(8, 4)))
    # Its state dict loads a BatchNorm's (whose step counter it drops).
    model[1].load_state_dict(bn.state_dict())

    root = freeze_backbone(nn.BatchNorm2d(3), "backbone+norms", lambda n: False)
    assert isinstance(root, FrozenBatchNorm2d)


def test_unknown_mode() -> None:
    assert FREEZE_MODES == ("none", "backbone", "backbone+norms")
    with pytest.raises(ConfigError, match=r"unknown freeze mode 'head'; expected one of "
                                          r"\['none', 'backbone', 'backbone\+norms'\]"):
        freeze_backbone(resnet18(), "head", is_head)
