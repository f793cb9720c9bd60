"""Parameter groups, optimizers, lr scaling and the weight EMA (timm models, no Ray)."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from torch import nn

from raylab.engine.checkpoint import load_checkpoint, restore_checkpoint, save_checkpoint
from raylab.errors import ConfigError
from raylab.optim import ModelEma, build_optimizer, param_groups, scale_lr, unwrap_model

WD = 0.05


@pytest.fixture(scope="module")
def convnext():
    return timm.create_model("convnext_atto", num_classes=10)


@pytest.fixture(scope="module")
def vit():
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4)


def _by_name(model: nn.Module, groups: list[dict]) -> dict[str, dict]:
    """Parameter name -> its group; asserts every param is in exactly one group."""
    owner = {}
    for g in groups:
        assert set(g) >= {"params", "weight_decay", "lr_scale"}
        for p in g["params"]:
            assert id(p) not in owner, "a parameter is in two groups"
            owner[id(p)] = g
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assert set(owner) == set(names), "groups and trainable parameters differ"
    return {names[i]: g for i, g in owner.items()}


def _is_norm(model: nn.Module, name: str) -> bool:
    module = model.get_submodule(name.rsplit(".", 1)[0])
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)) \
        or "Norm" in type(module).__name__


@pytest.mark.parametrize("layer_decay", [None, 0.8])
def test_convnext_norms_and_biases_have_no_decay(convnext, layer_decay):
    groups = _by_name(convnext, param_groups(convnext, WD, layer_decay=layer_decay))
    n_norm = n_bias = n_weight = 0
    for name, g in groups.items():
        p = convnext.get_parameter(name)
        if name.endswith(".bias") or _is_norm(convnext, name) or name.endswith(".gamma"):
            assert g["weight_decay"] == 0.0, name
            n_norm += _is_norm(convnext, name) and name.endswith(".weight")
            n_bias += name.endswith(".bias")
        else:  # conv and linear weights
            assert p.ndim in (2, 4), name
            assert g["weight_decay"] == WD, name
            n_weight += 1
    # convnext_atto: 12 blocks (1 dw conv + 2 linear each), stem conv, 3 downsample convs,
    # head fc -> 41 decayed weights; every one of the 41 layers has a bias.
    assert n_weight == 12 * 3 + 1 + 3 + 1
    assert n_bias >= n_weight and n_norm > 12


def test_vit_pos_embed_and_cls_token_have_no_decay(vit):
    groups = _by_name(vit, param_groups(vit, WD))
    assert groups["pos_embed"]["weight_decay"] == 0.0
    assert groups["cls_token"]["weight_decay"] == 0.0
    assert groups["blocks.0.attn.qkv.weight"]["weight_decay"] == WD
    assert groups["patch_embed.proj.weight"]["weight_decay"] == WD
    assert groups["head.weight"]["weight_decay"] == WD
    assert groups["blocks.3.norm1.weight"]["weight_decay"] == 0.0
    assert groups["head.bias"]["weight_decay"] == 0.0
    assert all(g["lr_scale"] == 1.0 for g in groups.values())


def test_dino_reference_decays_tokens_too(vit):
    """The DINO reference exempts only biases and 1-D parameters from weight decay."""
    groups = _by_name(vit, param_groups(vit, WD, exempt_tokens=False))
    assert groups["pos_embed"]["weight_decay"] == WD
    assert groups["cls_token"]["weight_decay"] == WD
    assert groups["blocks.3.norm1.weight"]["weight_decay"] == 0.0
    assert groups["head.bias"]["weight_decay"] == 0.0


def test_extra_patterns_nested_models_and_frozen_params(vit):
    class Wrapper(nn.Module):  # a DINO-like wrapper: backbone + own head, no no_weight_decay
        def __init__(self) -> None:
            super().__init__()
            self.backbone = vit
            self.proj = nn.Linear(192, 8)

    model = Wrapper()
    groups = _by_name(model, param_groups(model, WD, no_weight_decay=["proj.*"]))
    assert groups["backbone.pos_embed"]["weight_decay"] == 0.0
    assert groups["backbone.cls_token"]["weight_decay"] == 0.0
    assert groups["proj.weight"]["weight_decay"] == 0.0
    assert groups["backbone.head.weight"]["weight_decay"] == WD

    lin = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    lin[0].requires_grad_(False)
    groups = _by_name(lin, param_groups(lin, WD))  # checks the frozen ones are absent
    assert sorted(groups) == ["1.bias", "1.weight"]


def _scale_of(groups: dict[str, dict], pattern: str) -> float:
    scales = {g["lr_scale"] for n, g in groups.items() if re.fullmatch(pattern, n)}
    assert len(scales) == 1, (pattern, scales)
    return scales.pop()


def test_vit_layer_decay_scales(vit):
    ld = 0.75
    groups = _by_name(vit, param_groups(vit, WD, layer_decay=ld))
    # timm's ViT grouping: stem (patch_embed, pos_embed, cls_token) = 0, block i = i + 1
    # (the final norm joins block 11), head = 13 -> lr_scale = 0.75 ** (13 - id).
    assert _scale_of(groups, r"head\..*") == 1.0
    assert _scale_of(groups, r"pos_embed|cls_token|patch_embed\..*") == pytest.approx(ld ** 13)
    blocks = [_scale_of(groups, rf"blocks\.{i}\..*") for i in range(12)]
    for i, s in enumerate(blocks):
        assert s == pytest.approx(ld ** (12 - i))
    assert groups["pos_embed"]["weight_decay"] == 0.0
    assert groups["blocks.0.attn.qkv.weight"]["weight_decay"] == WD


def test_convnext_layer_decay_is_monotone(convnext):
    groups = _by_name(convnext, param_groups(convnext, WD, layer_decay=0.7))
    assert _scale_of(groups, r"head\..*") == 1.0
    order = [r"stem\..*"] + [rf"stages\.{s}\.blocks\.{b}\..*"
                             for s, n in enumerate((2, 2, 6, 2)) for b in range(n)]
    scales = [_scale_of(groups, p) for p in order]
    assert all(a <= b for a, b in zip(scales, scales[1:]))
    assert scales[0] < scales[-1] < 1.0
    assert scales[0] == pytest.approx(0.7 ** 13)  # 14 layer ids: stem 0 ... head 13


def test_build_optimizer(vit):
    opt = build_optimizer(vit, "AdamW", lr=1e-3, weight_decay=WD, layer_decay=0.5)
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
    sgd = build_optimizer(nn.Linear(2, 2), "sgd", lr=0.1, weight_decay=1e-4, momentum=0.8)
    assert isinstance(sgd, torch.optim.SGD)
    assert {g["weight_decay"] for g in sgd.param_groups} == {0.0, 1e-4}
    assert all(g["momentum"] == 0.8 for g in sgd.param_groups)
    with pytest.raises(ConfigError, match="unknown optimizer 'lamb'"):
        build_optimizer(vit, "lamb", lr=1e-3, weight_decay=WD)
    with pytest.raises(ConfigError, match="learning rate"):
        build_optimizer(vit, lr=0.0, weight_decay=WD)
    with pytest.raises(ConfigError, match="layer_decay"):
        param_groups(vit, WD, layer_decay=1.5)


def test_scale_lr():
    assert scale_lr(4e-3, 1024, 4096) == pytest.approx(1e-3)
    assert scale_lr(5e-4, 64, 256) == pytest.approx(1.25e-4)
    with pytest.raises(ConfigError):
        scale_lr(1e-3, 0, 256)


# ---- EMA -------------------------------------------------------------------------------

class DDPLike(nn.Module):
    """What DistributedDataParallel looks like from outside: the model under ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _linear(w: list[float], b: float) -> nn.Linear:
    lin = nn.Linear(len(w), 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([w]))
        lin.bias.fill_(b)
    return lin


@pytest.mark.parametrize("wrap", [False, True])
def test_ema_one_update_by_hand(wrap):
    model = _linear([1.0, 2.0], 0.5)
    ema = ModelEma(DDPLike(model) if wrap else model, decay=0.9)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert list(ema.state_dict()) == ["weight", "bias"]  # the bare model's keys
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, -2.0]]))
        model.bias.fill_(1.5)
    ema.update(DDPLike(model) if wrap else model, step=1)
    # 0.9 * [1, 2] + 0.1 * [3, -2] = [1.2, 1.6]; 0.9 * 0.5 + 0.1 * 1.5 = 0.6
    torch.testing.assert_close(ema.module.weight, torch.tensor([[1.2, 1.6]]))
    torch.testing.assert_close(ema.module.bias, torch.tensor([0.6]))
    # An explicit decay (e.g. DINO's momentum schedule): 0.5 * 1.2 + 0.5 * 3 = 2.1.
    ema.update(model, step=2, decay=0.5)
    torch.testing.assert_close(ema.module.weight, torch.tensor([[2.1, -0.2]]))


def test_ema_buffers_and_warmup():
    model = nn.BatchNorm1d(2)
    ema = ModelEma(model, decay=0.99, warmup=True)
    assert ema.decay_at(0) == 0.0 and ema.decay_at(1) == 0.0
    assert ema.decay_at(9) == pytest.approx(1 - 9 ** (-2 / 3))
    assert ema.decay_at(10**9) == 0.99
    with torch.no_grad():
        model.running_mean.fill_(4.0)
    model.num_batches_tracked.fill_(7)
    ema.update(model, step=1)  # warm-up step 1: decay 0, a plain copy
    torch.testing.assert_close(ema.module.running_mean, torch.tensor([4.0, 4.0]))
    assert int(ema.module.num_batches_tracked) == 7
    assert ModelEma(model, decay=0.99).decay_at(0) == 0.99  # no warm-up: constant


def test_ema_state_round_trip(tmp_path):
    model = _linear([1.0, 2.0], 0.5)
    ema = ModelEma(model, decay=0.9)
    with torch.no_grad():
        model.weight.mul_(3.0)
    ema.update(model, step=5)
    other = ModelEma(_linear([0.0, 0.0], 0.0), decay=0.9)
    other.load_state_dict(ema.state_dict())
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v)
    # Through the house checkpoint functions (they read ``.module``).
    save_checkpoint(tmp_path / "ckpt", model=model, ema=ema)
    fresh = ModelEma(_linear([0.0, 0.0], 0.0), decay=0.9)
    restore_checkpoint(load_checkpoint(tmp_path / "ckpt"), model=_linear([0.0, 0.0], 0.0),
                       ema=fresh, restore_rng=False)
    torch.testing.assert_close(fresh.module.weight, torch.tensor([[1.2, 2.4]]))
    with pytest.raises(ConfigError, match="decay"):
        ModelEma(model, decay=1.0)


def test_unwrap_model_leaves_ordinary_models_alone():
    inner = nn.Linear(2, 2)
    assert unwrap_model(DDPLike(DDPLike(inner))) is inner

    class HasModuleChild(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)
            self.other = nn.Linear(2, 2)

    m = HasModuleChild()
    assert unwrap_model(m) is m
