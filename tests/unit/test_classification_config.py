"""The classification recipe's config: the short-schedule warning and the crop options."""

from __future__ import annotations

import pytest

from raylab import config as cfglib
from raylab.errors import ConfigError
from raylab.methods.convnext.config import ConvNeXtConfig
from raylab.tasks.classification.config import SHORT_SCHEDULE_EPOCHS, AugConfig


def test_paper_regularisers_are_named_when_on() -> None:
    assert AugConfig().regularisers() == ["Mixup", "CutMix", "RandAugment", "random erasing"]
    off = AugConfig(mixup=0.0, cutmix=0.0, auto_augment="", re_prob=0.0)
    assert off.regularisers() == []
    assert AugConfig(mixup_prob=0.0, auto_augment="").regularisers() == ["random erasing"]


def test_short_schedule_with_the_paper_regularisers_warns() -> None:
    cfg = cfglib.apply_overrides(ConvNeXtConfig(), {"optim.epochs": 15, "optim.warmup_epochs": 1})
    warning = cfg.short_schedule_warning()
    assert warning is not None
    assert "15-epoch" in warning and "Mixup" in warning and "cifar_cpu.yaml" in warning


def test_no_warning_for_the_papers_schedule_or_without_regularisers() -> None:
    assert ConvNeXtConfig().short_schedule_warning() is None  # 300 epochs
    long_enough = cfglib.apply_overrides(ConvNeXtConfig(),
                                         {"optim.epochs": SHORT_SCHEDULE_EPOCHS})
    assert long_enough.short_schedule_warning() is None
    plain = cfglib.apply_overrides(ConvNeXtConfig(), {
        "optim.epochs": 15, "optim.warmup_epochs": 1, "aug.mixup": 0, "aug.cutmix": 0,
        "aug.auto_augment": "", "aug.re_prob": 0})
    assert plain.short_schedule_warning() is None


@pytest.mark.parametrize("overrides, key", [({"aug.crop": "centre"}, "aug.crop"),
                                            ({"aug.padding": -2}, "aug.padding")])
def test_crop_options_are_checked(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfglib.apply_overrides(ConvNeXtConfig(), overrides).validate()


def test_pad_crop_reaches_the_transform() -> None:
    kwargs = cfglib.apply_overrides(ConvNeXtConfig(), {"aug.crop": "pad", "aug.padding": 2}
                                    ).aug.transform_kwargs()
    assert kwargs["crop"] == "pad" and kwargs["padding"] == 2


def test_classification_methods_report_the_warning() -> None:
    """Method.warnings, printed by train after describe: ConvNeXt and the methods built
    on it (MiniViT, reuse) inherit it; other methods have none."""
    from raylab.methods.convnext import ConvNeXtMethod
    from raylab.methods.minivit.method import MiniViTMethod
    from raylab.methods.reuse.method import ReuseMethod
    from raylab.methods.skill.method import SkillMethod

    cfg = cfglib.apply_overrides(ConvNeXtConfig(), {"optim.epochs": 15, "optim.warmup_epochs": 1})
    for method in (ConvNeXtMethod, MiniViTMethod, ReuseMethod):
        assert method().warnings(cfg) == [cfg.short_schedule_warning()]
    assert ConvNeXtMethod().warnings(ConvNeXtConfig()) == []
    assert SkillMethod().warnings(None) == []
