"""DINO head, multi-crop wrapper, backbones, gradient helpers and attention maps (tiny ViT)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from raylab.errors import ConfigError
from raylab.models.dino import (
    DINOHead,
    MultiCropWrapper,
    build_backbone,
    cancel_last_layer_grad,
    clip_gradients,
    cls_attention_maps,
    last_self_attention,
)
from raylab.optim.param_groups import param_groups


def _tiny_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2,
                          **kwargs).eval()


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return _tiny_vit()


def _magnitude(head: DINOHead) -> torch.Tensor:
    return head.last_layer.parametrizations.weight.original0


@pytest.mark.parametrize(("nlayers", "use_bn"), [(3, False), (3, True), (1, False)])
def test_head_shapes_and_normalised_bottleneck(nlayers: int, use_bn: bool) -> None:
    head = DINOHead(24, out_dim=32, hidden_dim=16, bottleneck_dim=8, nlayers=nlayers,
                    use_bn=use_bn)
    seen = []
    head.last_layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    out = head(torch.randn(5, 24))
    assert out.shape == (5, 32)
    assert seen[0].shape == (5, 8)
    torch.testing.assert_close(seen[0].norm(dim=1), torch.ones(5))
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert len(linears) == nlayers
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    assert linears[0].weight.std().item() == pytest.approx(0.02, rel=0.25)


def test_frozen_last_layer_magnitude() -> None:
    head = DINOHead(24, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    g = _magnitude(head)
    assert g.shape == (32, 1) and not g.requires_grad
    torch.testing.assert_close(g, torch.ones(32, 1))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(32))

    opt = torch.optim.SGD(head.parameters(), lr=1.0, weight_decay=0.1)
    head(torch.randn(5, 24)).square().sum().backward()
    assert g.grad is None
    assert head.last_layer.parametrizations.weight.original1.grad is not None
    opt.step()
    torch.testing.assert_close(g, torch.ones(32, 1))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(32))

    # Frozen, so no optimizer group (hence no weight decay) holds it.
    grouped = [p for group in param_groups(head, 0.04) for p in group["params"]]
    assert not any(p is g for p in grouped)
    assert sum(p.numel() for p in grouped) == sum(
        p.numel() for p in head.parameters() if p.requires_grad)


def test_trainable_last_layer_magnitude() -> None:
    head = DINOHead(24, out_dim=32, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False)
    head(torch.randn(5, 24)).square().sum().backward()
    assert _magnitude(head).requires_grad and _magnitude(head).grad is not None


def test_head_copies_and_reloads_like_a_teacher() -> None:
    student = DINOHead(24, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    teacher = copy.deepcopy(student)
    teacher.load_state_dict(student.state_dict())
    x = torch.randn(4, 24)
    torch.testing.assert_close(teacher(x), student(x))
    assert "last_layer.parametrizations.weight.original0" in student.state_dict()


def test_head_rejects_bad_sizes() -> None:
    with pytest.raises(ConfigError, match="nlayers"):
        DINOHead(24, nlayers=0)


def test_multicrop_wrapper_groups_resolutions(vit: nn.Module) -> None:
    torch.manual_seed(1)
    model = MultiCropWrapper(vit, DINOHead(vit.num_features, 32, 16, 8)).eval()
    batch = 3
    crops = [torch.randn(batch, 3, 32, 32) for _ in range(2)]
    crops += [torch.randn(batch, 3, 16, 16) for _ in range(4)]
    calls = []
    handle = vit.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape))
    with torch.no_grad():
        out = model(crops)
        one_by_one = torch.cat([model([c]) for c in crops])
    handle.remove()
    assert out.shape == (6 * batch, 32)
    assert calls[:2] == [(2 * batch, 3, 32, 32), (4 * batch, 3, 16, 16)]
    torch.testing.assert_close(out, one_by_one, rtol=1e-4, atol=1e-5)
    # Crop-major: rows B..2B-1 are crop 1 of every image.
    with torch.no_grad():
        torch.testing.assert_close(out[batch:2 * batch], model(crops[1]), rtol=1e-4, atol=1e-5)


def test_multicrop_wrapper_checks_batches(vit: nn.Module) -> None:
    model = MultiCropWrapper(vit, nn.Identity())
    with pytest.raises(ValueError, match="same batch size"):
        model([torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)])
    with pytest.raises(ValueError, match="empty"):
        model([])


def test_build_backbone_variants() -> None:
    torch.manual_seed(0)
    resnet = build_backbone("resnet18", img_size=32)
    assert resnet(torch.randn(2, 3, 32, 32)).shape == (2, resnet.num_features)
    vit = _tiny_vit(drop_path_rate=0.1)
    assert vit.patch_embed.patch_size == (4, 4) and vit.num_classes == 0
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, vit.num_features)
    with pytest.raises(ConfigError, match="is not a timm model"):
        build_backbone("vit_no_such_model", 32)
    # A misspelt name gets the closest names by spelling, the intended one first.
    with pytest.raises(ConfigError, match=r"'resnt18' is not a timm model; did you mean "
                                          r"resnet18, "):
        build_backbone("resnt18", 32)
    with pytest.raises(ConfigError, match="ViT/DeiT"):
        build_backbone("resnet18", 32, patch_size=4)
    with pytest.raises(ConfigError, match="dividing"):
        build_backbone("vit_tiny_patch16_224", 30, patch_size=4)


def _head_model() -> MultiCropWrapper:
    torch.manual_seed(0)
    return MultiCropWrapper(nn.Linear(6, 5), DINOHead(5, 12, 8, 4))


def test_cancel_last_layer_grad() -> None:
    model = _head_model()
    model([torch.randn(4, 6)]).sum().backward()
    cancel_last_layer_grad(model, epoch=1, freeze_last_layer_epochs=1)
    assert model.head.last_layer.parametrizations.weight.original1.grad is not None
    cancel_last_layer_grad(model, epoch=0, freeze_last_layer_epochs=1)
    for name, p in model.named_parameters():
        if "last_layer" in name:
            assert p.grad is None, name
        elif p.requires_grad:
            assert p.grad is not None, name


def test_clip_gradients_per_parameter() -> None:
    model = nn.Linear(3, 2)
    model.weight.grad = torch.full((2, 3), 2.0)  # norm sqrt(24) = 4.899
    model.bias.grad = torch.tensor([0.6, 0.8])  # norm 1
    expected_weight = model.weight.grad * 3.0 / (24 ** 0.5 + 1e-6)
    norms = clip_gradients(model, 3.0)
    assert norms == pytest.approx([24 ** 0.5, 1.0])
    torch.testing.assert_close(model.weight.grad, expected_weight)
    torch.testing.assert_close(model.bias.grad, torch.tensor([0.6, 0.8]))  # untouched
    assert float(model.weight.grad.norm()) == pytest.approx(3.0, rel=1e-5)

    model.bias.grad = None
    assert clip_gradients(model, 10.0) == pytest.approx([3.0], rel=1e-5)
    with pytest.raises(ValueError, match="clip"):
        clip_gradients(model, 0.0)


def test_last_self_attention_matches_timm_forward(vit: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    attn = last_self_attention(vit, x)
    n = 1 + 8 * 8
    assert attn.shape == (2, vit.blocks[-1].attn.num_heads, n, n)
    torch.testing.assert_close(attn.sum(dim=-1), torch.ones(attn.shape[:-1]))

    # Recombine the probabilities with the values: must give timm's own attention output.
    module = vit.blocks[-1].attn
    seen = {}
    h1 = module.register_forward_pre_hook(lambda _m, args: seen.update(inp=args[0]))
    h2 = module.register_forward_hook(lambda _m, _a, out: seen.update(out=out))
    with torch.no_grad():
        vit(x)
    h1.remove()
    h2.remove()
    b, n, d = seen["inp"].shape
    qkv = module.qkv(seen["inp"]).reshape(b, n, 3, module.num_heads, module.head_dim)
    v = qkv.permute(2, 0, 3, 1, 4)[2]
    with torch.no_grad():
        mixed = module.proj((attn @ v).transpose(1, 2).reshape(b, n, d))
    torch.testing.assert_close(mixed, seen["out"], rtol=1e-4, atol=1e-5)


def test_cls_attention_maps_shapes(vit: nn.Module) -> None:
    maps = cls_attention_maps(vit, torch.randn(2, 3, 32, 32), patch_size=4)
    heads = vit.blocks[-1].attn.num_heads
    assert maps.shape == (2, heads, 8, 8)
    assert bool((maps.sum(dim=(2, 3)) <= 1.0 + 1e-5).all())
    wrapped = MultiCropWrapper(vit, nn.Identity())
    assert cls_attention_maps(wrapped, torch.randn(1, 3, 16, 16)).shape == (1, heads, 4, 4)

    regs = _tiny_vit(reg_tokens=2)
    x = torch.randn(1, 3, 32, 32)
    maps = cls_attention_maps(regs, x)
    cls_row = last_self_attention(regs, x)[:, :, 0]
    assert maps.shape == (1, heads, 8, 8) and cls_row.shape[-1] == 3 + 64
    torch.testing.assert_close(maps.flatten(2), cls_row[:, :, 3:])


def test_attention_needs_a_vit() -> None:
    with pytest.raises(ConfigError, match="VisionTransformer"):
        last_self_attention(nn.Linear(2, 2), torch.randn(1, 2))


def test_attention_maps_plot(vit: nn.Module, tmp_path) -> None:
    import numpy as np

    from raylab.errors import DataError
    from raylab.plots import plot_attention_maps

    x = torch.rand(1, 3, 32, 32)
    maps = cls_attention_maps(vit, x)[0].numpy()
    image = (x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    path = plot_attention_maps(image, maps, tmp_path / "attn" / "maps.png", title="last block")
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in path.parent.iterdir()] == ["maps.png"]  # no temporary left
    with pytest.raises(DataError, match="uint8"):
        plot_attention_maps(image.astype(np.float32), maps, tmp_path / "bad.png")
    with pytest.raises(DataError, match="heads, h, w"):
        plot_attention_maps(image, maps[0], tmp_path / "bad.png")
