"""Residual adapters: exact identity at init on every supported backbone, placement,
parameter counts worked out by hand, and training moving the zero-initialised layer."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from raylab.errors import ConfigError
from raylab.models.adapters import (
    AdaptedBlock,
    ConvAdapter,
    MlpAdapter,
    adapter_parameter_names,
    add_adapters,
    find_blocks,
    is_adapter_parameter,
)
from raylab.models.freeze import freeze_backbone, trainable_parameter_count
from raylab.models.vitdet import ViTDet


def tiny_vit(depth: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                             img_size=32, patch_size=8, embed_dim=32, depth=depth,
                             num_heads=2).eval()


def tiny_swin() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10,
                             img_size=32, patch_size=2, window_size=4, embed_dim=16,
                             depths=(1, 1), num_heads=(1, 1)).eval()


def timm_model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def tiny_vitdet() -> nn.Module:
    """A 2-block ViTDet at 64 px: a 4x4 token grid of 2x2 windows, block 1 followed by a
    conv propagation block (a C->C conv inside a channels-last block)."""
    torch.manual_seed(0)
    return ViTDet("vit_tiny_patch16_224", img_size=64, window_size=2, global_blocks=(1,),
                  propagation="conv", pyramid="simple", drop_path=0.0, out_channels=16,
                  pretrain_img_size=64, depth=2, embed_dim=32, num_heads=2).eval()


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    if isinstance(out, dict):
        return list(out.values())
    return list(out) if isinstance(out, (list, tuple)) else [out]


CASES = {
    "vit": (tiny_vit, 32, 8),
    "swin": (tiny_swin, 32, 0),
    "convnext": (lambda: timm_model("convnext_atto", num_classes=10), 32, 0),
    "convnext_features": (lambda: timm_model("convnext_atto", features_only=True), 32, 8),
    "resnet18": (lambda: timm_model("resnet18", num_classes=10), 32, 16),
    "vitdet": (tiny_vitdet, 64, 8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_adapted_output_equals_plain_output_bitwise_at_init(case: str) -> None:
    build, size, dim = CASES[case]
    plain = build()
    adapted = copy.deepcopy(plain)
    names = add_adapters(adapted, every=1, dim=dim)
    assert names and all(isinstance(adapted.get_submodule(n), AdaptedBlock) for n in names)
    x = torch.randn(2, 3, size, size)
    expected, got = _outputs(plain, x), _outputs(adapted, x)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_layout_follows_the_block() -> None:
    vit, swin = tiny_vit(), tiny_swin()
    convnext = timm_model("convnext_atto", num_classes=10)
    add_adapters(vit, 1, 8)
    add_adapters(swin, 1, 0)
    add_adapters(convnext, 1, 0)
    assert isinstance(vit.blocks[0].adapter, MlpAdapter)
    # Swin's stages are 16 and 32 wide; dim 0 means C // 4 for token adapters.
    assert [(b.adapter.channels, b.adapter.dim) for b in
            (swin.layers[0].blocks[0], swin.layers[1].blocks[0])] == [(16, 4), (32, 8)]
    assert isinstance(convnext.stages[3].blocks[1].adapter, ConvAdapter)
    assert convnext.stages[3].blocks[1].adapter.channels == 320
    vitdet = tiny_vitdet()
    add_adapters(vitdet, 1, 8)
    # Block 1 ends with a 32-channel conv but takes [B, H, W, C] tokens.
    assert isinstance(vitdet.blocks[1].adapter, MlpAdapter)
    assert vitdet.blocks[1].adapter.channels == 32


def test_find_blocks_in_forward_order() -> None:
    resnet = timm_model("resnet18", num_classes=10)
    assert [n for n, _ in find_blocks(resnet)] == [
        "layer1.0", "layer1.1", "layer2.0", "layer2.1",
        "layer3.0", "layer3.1", "layer4.0", "layer4.1"]
    features = timm_model("convnext_atto", features_only=True)
    names = [n for n, _ in find_blocks(features)]
    # convnext_atto: depths (2, 2, 6, 2); features_only renames stages.N to stages_N.
    assert len(names) == 12
    assert names[:3] == ["stages_0.blocks.0", "stages_0.blocks.1", "stages_1.blocks.0"]
    assert names[-1] == "stages_3.blocks.1"
    assert [n for n, _ in find_blocks(tiny_swin())] == ["layers.0.blocks.0", "layers.1.blocks.0"]
    assert [n for n, _ in find_blocks(tiny_vitdet())] == ["blocks.0", "blocks.1"]

    # A `blocks` list inside a block belongs to that block.
    inner = nn.Module()
    inner.blocks = nn.ModuleList([nn.Linear(4, 4)])
    outer = nn.Module()
    outer.blocks = nn.Sequential(inner, nn.Linear(4, 4))
    assert [n for n, _ in find_blocks(outer)] == ["blocks.0", "blocks.1"]


def test_placement_every_k() -> None:
    for every, expected in ((1, [f"blocks.{i}" for i in range(6)]),
                            (2, ["blocks.1", "blocks.3", "blocks.5"]),
                            (3, ["blocks.2", "blocks.5"]),
                            (7, []), (0, []), (-1, [])):
        vit = tiny_vit(depth=6)
        assert add_adapters(vit, every, 8) == expected
        assert [n for n, m in vit.named_modules() if isinstance(m, AdaptedBlock)] == expected

    # ResNet-18's blocks 2, 4, 6 (layer2.0, layer3.0, layer4.0) downsample: skipped.
    for every, expected in ((1, ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]),
                            (2, ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]),
                            (3, ["layer3.1"])):  # indices 2 (layer2.0, skipped) and 5
        resnet = timm_model("resnet18", num_classes=10)
        assert add_adapters(resnet, every, 0) == expected


def test_parameter_names_and_counts_by_hand() -> None:
    vit = tiny_vit()
    plain = sum(p.numel() for p in vit.parameters())
    add_adapters(vit, 1, 8)
    names = adapter_parameter_names(vit)
    assert names == {f"blocks.{i}.adapter.{layer}.{kind}" for i in range(2)
                     for layer in ("fc1", "fc2") for kind in ("weight", "bias")}
    assert "blocks.0.block.attn.qkv.weight" in dict(vit.named_parameters())
    # Per adapter: fc1 32 x 8 + 8, fc2 8 x 32 + 32 = 552; two blocks.
    assert sum(p.numel() for n, p in vit.named_parameters() if n in names) == 2 * 552
    assert sum(p.numel() for p in vit.parameters()) == plain + 2 * 552

    # ResNet-18, dim 16, adapters beside layer1.0, layer1.1 (64), layer2.1 (128), layer3.1
    # (256), layer4.1 (512): C x 16 + 16 + 16 x C + C = 33 C + 16 each.
    resnet = timm_model("resnet18", num_classes=10)
    add_adapters(resnet, 1, 16)
    expected = 33 * (64 + 64 + 128 + 256 + 512) + 5 * 16
    assert expected == 33_872
    assert sum(p.numel() for n, p in resnet.named_parameters() if is_adapter_parameter(n)) \
        == expected

    # convnext_atto, dim 0 (one 1x1 conv C -> C: C^2 + C), depths (2, 2, 6, 2) at widths
    # (40, 80, 160, 320): 2 * 1640 + 2 * 6480 + 6 * 25760 + 2 * 102720.
    convnext = timm_model("convnext_atto", num_classes=10)
    add_adapters(convnext, 1, 0)
    assert sum(p.numel() for n, p in convnext.named_parameters()
               if is_adapter_parameter(n)) == 376_240

    # Swin, dim 0 -> C // 4: stage 16 wide (16*4 + 4 + 4*16 + 16 = 148), stage 32 wide
    # (32*8 + 8 + 8*32 + 32 = 552).
    swin = tiny_swin()
    add_adapters(swin, 1, 0)
    assert sum(p.numel() for n, p in swin.named_parameters() if is_adapter_parameter(n)) == 700

    assert is_adapter_parameter("module.blocks.3.adapter.fc2.weight")  # DDP wrapper
    assert not is_adapter_parameter("blocks.3.block.attn.qkv.weight")


def test_a_training_step_moves_the_zero_layer() -> None:
    vit = tiny_vit()
    add_adapters(vit, 1, 8)
    vit = freeze_backbone(vit, "backbone+norms",
                          lambda n: is_adapter_parameter(n) or n.startswith("head."))
    assert trainable_parameter_count(vit) == 2 * 552 + 32 * 10 + 10
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    optimizer = torch.optim.SGD([p for p in vit.parameters() if p.requires_grad], lr=0.5)
    vit.train()
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    nn.functional.cross_entropy(vit(x), y).backward()
    for n, p in vit.named_parameters():
        assert (p.grad is None) == (not p.requires_grad), n
    optimizer.step()
    adapter = vit.blocks[1].adapter
    # The last layer's weight (not only its bias) trains: its input, GELU of the randomly
    # initialised first layer, is nonzero.
    assert torch.count_nonzero(adapter.fc2.weight) > 0
    assert torch.count_nonzero(adapter.fc2.bias) > 0
    with torch.no_grad():
        assert torch.count_nonzero(adapter(torch.randn(2, 5, 32))) > 0
    for n, p in vit.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[n]), n

    # Rebuffi's single 1x1 conv (dim 0) trains too: its input is the block's input.
    resnet = timm_model("resnet18", num_classes=10)
    add_adapters(resnet, 2, 0)
    conv = resnet.layer4[1].adapter
    resnet.train()
    nn.functional.cross_entropy(resnet(x), y).backward()
    assert torch.count_nonzero(conv.fc2.weight.grad) > 0


def test_errors() -> None:
    with pytest.raises(ConfigError, match=r"no residual blocks found in Sequential; adapters "
                                          r"support timm ViT/DeiT, Swin, ConvNeXt, ResNet"):
        add_adapters(nn.Sequential(nn.Linear(4, 4)), 1, 8)
    with pytest.raises(ConfigError, match="dim must be an integer >= 0"):
        add_adapters(tiny_vit(), 1, -1)
    vit = tiny_vit()
    add_adapters(vit, 2, 8)
    with pytest.raises(ConfigError, match="has adapters already"):
        add_adapters(vit, 1, 8)
