"""count_params / count_macs on timm ConvNeXt against the paper's and timm's figures."""

from __future__ import annotations

import pytest
import timm

from raylab.models import count_macs, count_params


@pytest.mark.parametrize("name, params", [("convnext_tiny", 28_589_128),
                                          ("convnext_atto", 3_695_520)])
def test_convnext_parameter_counts(name: str, params: int) -> None:
    assert count_params(timm.create_model(name, pretrained=False)) == params


def test_convnext_tiny_macs_at_224() -> None:
    """ConvNeXt-T: 4.5 GFLOPs in the paper (multiply-accumulates), 4.47e9 counted."""
    macs = count_macs(timm.create_model("convnext_tiny", pretrained=False), (3, 224, 224))
    assert macs == pytest.approx(4.47e9, rel=0.01)


def test_macs_scale_with_resolution() -> None:
    """A convolutional net's MACs grow with the pixel count (32 px = 1/49 of 224 px)."""
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    small, large = count_macs(model, (3, 32, 32)), count_macs(model, (3, 224, 224))
    assert large / small == pytest.approx(49, rel=0.05)
