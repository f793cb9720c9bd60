"""ViTDet backbone: window/global blocks, relative and absolute positions, propagation and
pyramid ablations, ViT-B's parameter count worked out by hand, layer decay, weight loading."""

from __future__ import annotations

import pytest
import timm
import torch

from raylab import config as cfglib
from raylab.engine.checkpoint import save_checkpoint
from raylab.errors import CheckpointError, ConfigError
from raylab.methods.dino.config import DINOConfig
from raylab.models import count_params
from raylab.models.dino import build_backbone
from raylab.models.vitdet import (
    ConvPropagation,
    ViTDet,
    ViTDetBlock,
    decomposed_rel_pos_bias,
    default_global_blocks,
    layer_id,
    load_vitdet_weights,
    resample_pos_embed,
)
from raylab.optim.param_groups import param_groups

#: A 4-block, 64-wide ViT at 128 px: an 8x8 token grid of four 4x4 windows.
TINY = dict(model_name="vit_tiny_patch16_224", depth=4, embed_dim=64, num_heads=2,
            pretrain_img_size=64, img_size=128, window_size=4, drop_path=0.0)


@pytest.fixture(autouse=True)
def _no_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN builds a kernel per new convolution shape (~25 ms each on a small CPU); the
    plain kernels are far faster for these tiny models."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)


def tiny(**kwargs) -> ViTDet:
    torch.manual_seed(0)
    return ViTDet(**{**TINY, **kwargs}).eval()


def _last_map(model: ViTDet, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(x)[0]


def test_default_global_blocks() -> None:
    assert default_global_blocks(12) == (2, 5, 8, 11)
    assert default_global_blocks(24) == (5, 11, 17, 23)
    assert default_global_blocks(32) == (7, 15, 23, 31)
    assert default_global_blocks(12, 2) == (5, 11)
    assert default_global_blocks(4, 0) == ()
    with pytest.raises(ConfigError, match="global blocks"):
        default_global_blocks(4, 5)


def test_window_and_global_blocks_as_configured() -> None:
    model = tiny(global_blocks=(1, 3))
    assert [b.window_size for b in model.blocks] == [4, 0, 4, 0]
    head_dim = 64 // 2
    # Tables sized for the 4x4 window, or for the 128 / 16 = 8 global grid.
    assert [tuple(b.rel_pos_h.shape) for b in model.blocks] == [
        (7, head_dim), (15, head_dim), (7, head_dim), (15, head_dim)]
    assert all(b.residual is None for b in model.blocks)
    assert ViTDet(**{**TINY, "global_blocks": 2}).global_blocks == (1, 3)

    none = tiny(propagation="none")
    assert [b.window_size for b in none.blocks] == [4] * 4
    conv = tiny(propagation="conv", global_blocks=(1, 3))
    assert [b.window_size for b in conv.blocks] == [4] * 4
    assert [b.residual is not None for b in conv.blocks] == [False, True, False, True]
    assert [b.window_size for b in tiny(window_size=0).blocks] == [0] * 4
    for bad, match in (({"propagation": "shifted"}, "propagation"),
                       ({"pyramid": "bifpn"}, "pyramid"),
                       ({"global_blocks": (4,)}, "block indices"),
                       ({"model_name": "resnet18"}, "as a ViT"),
                       ({"model_name": "eva02_tiny_patch14_224"}, "VisionTransformer")):
        with pytest.raises(ConfigError, match=match):
            ViTDet(**{**TINY, **bad})


def _perturb_window0(x: torch.Tensor) -> torch.Tensor:
    """The same images with the pixels of window 0 (tokens 0..3 x 0..3) changed."""
    y = x.clone()
    y[..., :64, :64] += torch.randn_like(y[..., :64, :64])
    return y


def test_windows_are_independent_without_propagation() -> None:
    x = torch.randn(1, 3, 128, 128)
    y = _perturb_window0(x)
    base = tiny(propagation="none")
    a, b = _last_map(base, x), _last_map(base, y)
    assert not torch.allclose(a[..., :4, :4], b[..., :4, :4])
    for rows, cols in ((slice(4, 8), slice(4, 8)), (slice(0, 4), slice(4, 8)),
                       (slice(4, 8), slice(0, 4))):
        torch.testing.assert_close(a[..., rows, cols], b[..., rows, cols])

    # One global block carries window 0's change to the far window.
    glob = tiny(propagation="global", global_blocks=(1,))
    a, b = _last_map(glob, x), _last_map(glob, y)
    assert (a[..., 4:, 4:] - b[..., 4:, 4:]).abs().max() > 1e-3

    # A conv block starts as the identity (same output as no propagation)...
    conv = tiny(propagation="conv", global_blocks=(1,))
    conv.load_state_dict(base.state_dict(), strict=False)
    torch.testing.assert_close(_last_map(conv, x), _last_map(base, x))
    # ...and once its last norm is trained, its 3x3 conv crosses window borders.
    with torch.no_grad():
        conv.blocks[1].residual.norm3.weight.fill_(1.0)
    a, b = _last_map(conv, x), _last_map(conv, y)
    assert (a[..., 4:, 4:] - b[..., 4:, 4:]).abs().max() > 1e-3


def test_block_attention_matches_timm_without_relative_positions() -> None:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1,
                            embed_dim=64, num_heads=2, qk_norm=True, init_values=0.1).eval()
    block = vit.blocks[0]
    x = torch.randn(2, 4, 5, 64)
    with torch.no_grad():
        expected = block(x.reshape(2, 20, 64)).reshape(2, 4, 5, 64)
        glob = ViTDetBlock(block, window_size=0, rel_pos_grid=(4, 5)).eval()
        torch.testing.assert_close(glob(x), expected, rtol=1e-5, atol=1e-5)
        # One window covering the whole 4x4 grid is global attention; smaller ones are not.
        square = x[:, :, :4]
        full = ViTDetBlock(block, window_size=4, rel_pos_grid=(4, 4)).eval()
        expected = block(square.reshape(2, 16, 64)).reshape(2, 4, 4, 64)
        torch.testing.assert_close(full(square), expected, rtol=1e-5, atol=1e-5)
        small = ViTDetBlock(block, window_size=2, rel_pos_grid=(2, 2)).eval()
        assert not torch.allclose(small(square), expected, atol=1e-4)


def test_relative_positions_zero_at_init_and_trained() -> None:
    model = tiny(global_blocks=(1,))
    for block in model.blocks:
        assert torch.count_nonzero(block.rel_pos_h) == 0
        assert torch.count_nonzero(block.rel_pos_w) == 0
    model.train()
    model.forward_features(torch.randn(1, 3, 128, 128))[0].square().sum().backward()
    assert all(b.rel_pos_h.grad is not None and b.rel_pos_h.grad.abs().sum() > 0
               for b in model.blocks)


def _reference_bias(q, rel_h, rel_w, h, w):
    """The paper's decomposed bias, one (query, key) pair at a time."""
    b, heads, n, _ = q.shape
    out = torch.zeros(b, heads, n, n)
    for i in range(h):
        for j in range(w):
            qij = q[:, :, i * w + j]
            for k in range(h):
                for m in range(w):
                    out[:, :, i * w + j, k * w + m] = ((qij * rel_h[i - k + h - 1]).sum(-1)
                                                       + (qij * rel_w[j - m + w - 1]).sum(-1))
    return out


def test_decomposed_rel_pos_bias_matches_loop() -> None:
    torch.manual_seed(0)
    h, w, d = 3, 4, 5
    q = torch.randn(2, 3, h * w, d)
    rel_h, rel_w = torch.randn(2 * h - 1, d), torch.randn(2 * w - 1, d)
    bias = decomposed_rel_pos_bias(q, rel_h, rel_w, (h, w))
    torch.testing.assert_close(bias, _reference_bias(q, rel_h, rel_w, h, w))
    # Tables sized for another grid are interpolated to this one (a constant stays one).
    const = torch.ones(2 * 7 - 1, d)
    torch.testing.assert_close(decomposed_rel_pos_bias(q, const, const, (h, w)),
                               _reference_bias(q, torch.ones(2 * h - 1, d),
                                               torch.ones(2 * w - 1, d), h, w))


def test_absolute_position_embedding_interpolation() -> None:
    torch.manual_seed(0)
    pos = torch.randn(1, 16, 8)
    assert resample_pos_embed(pos, (4, 4), (4, 4)) is pos
    up = resample_pos_embed(pos, (4, 4), (8, 6))
    assert up.shape == (1, 48, 8)
    const = torch.full((1, 16, 8), 0.5)
    torch.testing.assert_close(resample_pos_embed(const, (4, 4), (7, 9)),
                               torch.full((1, 63, 8), 0.5))

    model = tiny()
    # The class token's entry is dropped: the 64 px pretrain grid is 4x4.
    assert model.pos_embed.shape == (1, 16, 64) and model.grid == (4, 4)
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.update(x=args[0]))
    image = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        model.forward_features(image)
        patches = model.patch_embed(image)
    expected = patches + resample_pos_embed(model.pos_embed, (4, 4), (8, 12)).reshape(1, 8, 12, 64)
    torch.testing.assert_close(seen["x"], expected)


@pytest.mark.parametrize(("size", "sides"), [((128, 128), (32, 16, 8, 4, 2)),
                                             ((256, 192), (64, 32, 16, 8, 4))])
def test_simple_pyramid_strides(size, sides) -> None:
    model = tiny()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert model.out_channels == 256
    assert model.strides == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert model.featmap_names == ["p2", "p3", "p4", "p5"]
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    for (name, feat), side in zip(out.items(), sides):
        stride = model.strides[name]
        assert feat.shape == (1, 256, size[0] // stride, size[1] // stride), name
        assert feat.shape[-2] == side, name


def test_pyramid_ablations() -> None:
    x = torch.randn(1, 3, 128, 128)
    none = tiny(pyramid="none")
    with torch.no_grad():
        out = none(x)
    assert none.strides == {"p4": 16} and none.featmap_names == ["p4"]
    assert {k: tuple(v.shape) for k, v in out.items()} == {"p4": (1, 256, 8, 8)}

    fpn = tiny(pyramid="fpn").train()
    assert fpn.stage_ends == (0, 1, 2, 3)
    out = fpn(x)
    assert {k: v.shape[-1] for k, v in out.items()} == {"p2": 32, "p3": 16, "p4": 8, "p5": 4,
                                                          "p6": 2}
    sum(v.sum() for v in out.values()).backward()
    # Every stage feeds the pyramid: the first block's weights get a gradient.
    assert fpn.blocks[0].mlp.fc2.weight.grad.abs().sum() > 0


def test_conv_propagation_block_is_identity_at_init() -> None:
    torch.manual_seed(0)
    block = ConvPropagation(16)
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(block(x), x)
    assert [type(m).__name__ for m in (block.conv1, block.conv2, block.conv3)] == ["Conv2d"] * 3
    assert block.conv2.kernel_size == (3, 3) and block.conv1.out_channels == 8


def test_vit_base_simple_pyramid_parameter_count_by_hand() -> None:
    with torch.device("meta"):  # built without initialising 91 M weights
        model = ViTDet("vit_base_patch16_224", img_size=1024)
    d, mlp, head_dim = 768, 3072, 64
    patch_embed = 3 * 16 * 16 * d + d                        # 590_592
    pos_embed = 14 * 14 * d                                  # 224 / 16 = 14, no cls: 150_528
    block = (2 * d                                           # norm1
             + d * 3 * d + 3 * d                             # qkv
             + d * d + d                                     # proj
             + 2 * d                                         # norm2
             + d * mlp + mlp + mlp * d + d)                  # mlp fc1, fc2 -> 7_087_872
    window_rel = 2 * (2 * 14 - 1) * head_dim                 # 3_456 (8 window blocks)
    global_rel = 2 * (2 * 64 - 1) * head_dim                 # 16_256 (4 global blocks)
    vit = patch_embed + pos_embed + 12 * block + 8 * window_rel + 4 * global_rel

    ln = 2 * 256                                             # channel LayerNorm
    convs = lambda c: c * 256 + ln + 256 * 256 * 9 + ln      # noqa: E731 1x1 + 3x3, no bias
    scale4 = (d * d // 2 * 4 + d // 2 + 2 * (d // 2)         # deconv 768->384, LN
              + d // 2 * d // 4 * 4 + d // 4 + convs(d // 4))  # deconv 384->192
    scale2 = d * d // 2 * 4 + d // 2 + convs(d // 2)          # deconv 768->384
    scale1 = convs(d)
    scale_half = convs(d)                                    # max-pool: no weights
    pyramid = scale4 + scale2 + scale1 + scale_half          # 5_560_000
    assert (pyramid, vit) == (5_560_000, 85_888_256)
    assert count_params(model) == vit + pyramid == 91_448_256


def test_layer_ids_and_layer_decay_groups() -> None:
    depth = 12
    assert layer_id("patch_embed.proj.weight", depth) == 0
    assert layer_id("backbone.pos_embed", depth) == 0
    assert layer_id("blocks.0.attn.qkv.weight", depth) == 1
    assert layer_id("backbone.blocks.11.rel_pos_h", depth) == 12
    assert layer_id("blocks.5.residual.conv1.weight", depth) == 6
    assert layer_id("pyramid.stages.0.1.0.weight", depth) == 13
    assert layer_id("roi_heads.box_predictor.cls_score.weight", depth) == 13

    model = tiny(propagation="conv", global_blocks=(1,))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.1, layer_decay=0.7)
    seen = set()
    for group in groups:
        for p in group["params"]:
            name = names[id(p)]
            seen.add(name)
            assert group["lr_scale"] == pytest.approx(0.7 ** (4 + 1 - layer_id(name, 4))), name
            no_decay = p.ndim <= 1 or name == "pos_embed" or ".rel_pos_" in name
            assert group["weight_decay"] == (0.0 if no_decay else 0.1), name
    assert seen == set(names.values())


def test_load_vit_weights_copies_trunk_and_interpolates_pos_embed() -> None:
    model = tiny()
    torch.manual_seed(1)
    source = build_backbone("vit_tiny_patch16_224", 64, depth=4, embed_dim=64, num_heads=2)
    unused = model.load_vit_weights(source.state_dict())
    assert {"cls_token", "norm.weight", "norm.bias"} <= set(unused)
    src, own = source.state_dict(), model.state_dict()
    for name in model.trunk_parameter_names():
        if name != "pos_embed":
            torch.testing.assert_close(own[name], src[name], rtol=0, atol=0)
    torch.testing.assert_close(own["pos_embed"], src["pos_embed"][:, 1:])
    assert "blocks.0.attn.qkv.weight" in model.trunk_parameter_names()
    assert not any("rel_pos" in n or "pyramid" in n for n in model.trunk_parameter_names())

    # A ViT pretrained at 32 px (2x2 grid): its position embedding is resampled to 4x4.
    small = build_backbone("vit_tiny_patch16_224", 32, depth=4, embed_dim=64, num_heads=2)
    model.load_vit_weights(small)
    torch.testing.assert_close(model.pos_embed.detach(),
                               resample_pos_embed(small.pos_embed.detach()[:, 1:], (2, 2),
                                                  (4, 4)))
    wide = build_backbone("vit_tiny_patch16_224", 64, depth=4, embed_dim=96, num_heads=2)
    with pytest.raises(CheckpointError, match="shape"):
        model.load_vit_weights(wide)
    shallow = build_backbone("vit_tiny_patch16_224", 64, depth=2, embed_dim=64, num_heads=2)
    with pytest.raises(CheckpointError, match="lack"):
        model.load_vit_weights(shallow)


def test_load_vitdet_weights_from_a_dino_checkpoint(tmp_path) -> None:
    from raylab.methods.dino.task import build_student_teacher

    cfg = DINOConfig(arch="vit_tiny_patch16_224", img_size=32, depth=4, out_dim=16,
                     hidden_dim=16, bottleneck_dim=8)
    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfg)
    save_checkpoint(tmp_path, model=student, ema=teacher, epoch=0,
                    meta={"method": "dino", "config": cfglib.to_dict(cfg)})
    model = ViTDet(**{**TINY, "embed_dim": 192, "num_heads": 3})
    load_vitdet_weights(model, tmp_path, which="teacher")
    vit = teacher.backbone
    torch.testing.assert_close(model.blocks[3].mlp.fc1.weight, vit.blocks[3].mlp.fc1.weight)
    torch.testing.assert_close(model.patch_embed.proj.weight, vit.patch_embed.proj.weight)
    torch.testing.assert_close(model.pos_embed, resample_pos_embed(vit.pos_embed[:, 1:], (2, 2),
                                                                   (4, 4)))
    assert model.blocks[0].rel_pos_h.requires_grad  # the loaded backbone stays trainable


def test_load_vitdet_weights_from_a_classifier_checkpoint(tmp_path) -> None:
    """A ViT trained by ``raylab train convnext --set model=vit_...`` (224 px, 14x14 grid)
    initialises the trunk; its head and final norm stay unused."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=5, depth=4, embed_dim=64,
                            num_heads=2)
    save_checkpoint(tmp_path, model=vit, epoch=0,
                    meta={"method": "convnext", "config": {"model": "vit_tiny_patch16_224"}})
    model = tiny()
    unused = load_vitdet_weights(model, tmp_path)
    assert {"cls_token", "head.weight", "norm.weight"} <= set(unused)
    torch.testing.assert_close(model.blocks[2].attn.qkv.weight, vit.blocks[2].attn.qkv.weight)
    torch.testing.assert_close(model.pos_embed, resample_pos_embed(vit.pos_embed[:, 1:],
                                                                   (14, 14), (4, 4)))
    wider = timm.create_model("vit_tiny_patch16_224", depth=4, embed_dim=96, num_heads=2)
    save_checkpoint(tmp_path / "wide", model=wider, epoch=0,
                    meta={"method": "convnext", "config": {"model": "vit_tiny_patch16_224"}})
    with pytest.raises(CheckpointError, match=r"wide \(convnext vit_tiny_patch16_224\).*shape"):
        load_vitdet_weights(tiny(), tmp_path / "wide")


def test_grad_checkpointing_gives_the_same_output() -> None:
    model = tiny(global_blocks=(1,)).train()
    x = torch.randn(1, 3, 128, 128)
    plain = model(x)["p4"]
    model.set_grad_checkpointing()
    checked = model(x)["p4"]
    torch.testing.assert_close(checked, plain)
    checked.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_load_vitdet_weights_from_a_minivit_run(tmp_path) -> None:
    """A multiplexed run's shared weights become per-block copies in the trunk; a run with
    weight transformation is refused by name (its head mixing has no place there)."""
    from raylab.models.minivit import multiplex

    torch.manual_seed(0)
    for transform in (False, True):
        vit = multiplex(timm.create_model("vit_tiny_patch16_224", num_classes=5, depth=4,
                                          embed_dim=64, num_heads=2), "every-2",
                        transform=transform)
        save_checkpoint(tmp_path / str(transform), model=vit, epoch=0,
                        meta={"method": "minivit", "config": {"model": "vit_tiny_patch16_224"}})
    model = tiny()
    load_vitdet_weights(model, tmp_path / "False")
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    assert model.blocks[1].attn.qkv.weight is not model.blocks[0].attn.qkv.weight
    with pytest.raises(CheckpointError, match="weight transformation.*transform=false"):
        load_vitdet_weights(tiny(), tmp_path / "True")
