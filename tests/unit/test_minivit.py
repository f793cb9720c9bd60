"""MiniViT weight multiplexing: parameter counts by hand, exact identity at initialisation,
summed gradients of shared tensors, checkpoints that store shared tensors once."""

from __future__ import annotations

import copy
import io

import pytest
import timm
import torch

from raylab.models import count_params
from raylab.models.minivit import MultiplexError, multiplex, parse_strategy


def tiny_vit(depth: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5,
                             img_size=32, patch_size=8, depth=depth).eval()


def tiny_swin() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5,
                             img_size=56, embed_dim=24, depths=(2, 2), num_heads=(1, 2),
                             window_size=7).eval()


def shared_layer_params(d: int, mlp_ratio: int = 4) -> int:
    """One ViT layer's attention + MLP, by hand: qkv d x 3d + 3d, proj d x d + d,
    fc1 d x rd + rd, fc2 rd x d + d (norms are per layer and not counted here)."""
    r = mlp_ratio
    return (3 * d * d + 3 * d) + (d * d + d) + (r * d * d + r * d) + (r * d * d + d)


# --------------------------------------------------------------------------- counts


def test_deit_b_counts_follow_from_the_blocks() -> None:
    with torch.device("meta"):  # 86M parameters, no memory
        deit_b = timm.create_model("deit_base_patch16_224", pretrained=False)
    assert count_params(deit_b) == 86_567_656
    layer = shared_layer_params(768)
    assert layer == 7_084_800
    mixing = 12 * 2 * 12 * 12  # 12 layers x (pre + post) x heads x heads
    every2 = count_params(multiplex(copy.deepcopy(deit_b), "every-2"))
    assert every2 == 86_567_656 - 6 * layer + mixing == 44_062_312  # the paper's "44M"
    shared_all = count_params(multiplex(copy.deepcopy(deit_b), "all"))
    assert shared_all == 86_567_656 - 11 * layer + mixing == 8_638_312  # "9M" with iRPE tables
    plain_shared = count_params(multiplex(copy.deepcopy(deit_b), "all", transform=False))
    assert plain_shared == shared_all - mixing


def test_swin_shares_per_stage_and_adds_depthwise_convs() -> None:
    swin = tiny_swin()
    plain = count_params(swin)
    shared = count_params(multiplex(copy.deepcopy(swin), "every-2", transform=False))
    stage_dims = (24, 48)
    assert plain - shared == sum(shared_layer_params(d) for d in stage_dims)
    mixed = count_params(multiplex(copy.deepcopy(swin), "every-2", transform=True))
    # per block: 7x7 depthwise (d x 49) + two heads x heads matrices
    assert mixed - shared == sum(2 * (d * 49 + 2 * h * h) for d, h in zip(stage_dims, (1, 2)))


# --------------------------------------------------------------------------- behaviour


def test_none_without_transform_is_the_input_model() -> None:
    model = tiny_vit()
    same = multiplex(copy.deepcopy(model), "none", transform=False)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(same(x), model(x))
    assert same.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("build,size", [(tiny_vit, 32), (tiny_swin, 56)])
def test_identity_transforms_change_nothing_at_start(build, size: int) -> None:
    x = torch.randn(2, 3, size, size)
    shared = multiplex(build(), "every-2", transform=False)
    mixed = multiplex(build(), "every-2", transform=True)
    torch.testing.assert_close(mixed(x), shared(x), atol=1e-5, rtol=1e-5)
    # and the transforms are live: perturbing one changes the output
    with torch.no_grad():
        mixed.get_submodule(_first_attn(mixed)).post_softmax.add_(0.3)
    assert not torch.allclose(mixed(x), shared(x), atol=1e-4)


def _first_attn(model: torch.nn.Module) -> str:
    return next(n for n, m in model.named_modules() if hasattr(m, "post_softmax"))


def test_layers_of_a_group_hold_one_tensor_and_keep_their_norms() -> None:
    model = multiplex(tiny_vit(), "every-2")
    b = model.blocks
    assert b[0].attn.qkv.weight is b[1].attn.qkv.weight
    assert b[0].mlp is b[1].mlp and b[1].mlp is not b[2].mlp
    assert b[0].norm1 is not b[1].norm1 and b[0].attn.pre_softmax is not b[1].attn.pre_softmax


def test_shared_gradient_is_the_sum_over_its_layers() -> None:
    """The shared model against an unshared one whose layers 0 and 1 hold copies of the same
    weights: the shared tensor's gradient is the sum of the two copies' gradients."""
    unshared = tiny_vit(depth=2)
    for name in ("attn.qkv", "attn.proj", "mlp"):
        unshared.blocks[1].get_submodule(name).load_state_dict(
            unshared.blocks[0].get_submodule(name).state_dict())
    shared = multiplex(copy.deepcopy(unshared), "all", transform=False)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(shared(x), unshared(x))
    shared(x).square().sum().backward()
    unshared(x).square().sum().backward()
    for name in ("attn.qkv.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc2.bias"):
        expected = sum(blk.get_parameter(name).grad for blk in unshared.blocks)
        torch.testing.assert_close(shared.blocks[0].get_parameter(name).grad, expected)
    # a per-layer norm keeps its own gradient
    torch.testing.assert_close(shared.blocks[1].norm1.weight.grad,
                               unshared.blocks[1].norm1.weight.grad)


def test_mean_init_averages_the_group() -> None:
    model = tiny_vit()
    w = [blk.attn.proj.weight.detach().clone() for blk in model.blocks]
    multiplex(model, "every-2", init="mean")
    torch.testing.assert_close(model.blocks[1].attn.proj.weight, (w[0] + w[1]) / 2)
    torch.testing.assert_close(model.blocks[3].attn.proj.weight, (w[2] + w[3]) / 2)
    first = multiplex(tiny_vit(), "every-2", init="first")
    torch.testing.assert_close(first.blocks[1].attn.proj.weight, w[0])


def test_checkpoint_stores_shared_tensors_once_and_loads_back() -> None:
    def saved_bytes(model: torch.nn.Module) -> int:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        return buffer.tell()

    plain, shared = tiny_vit(), multiplex(tiny_vit(), "all")
    ratio = saved_bytes(shared) / saved_bytes(plain)
    assert ratio == pytest.approx(count_params(shared) / count_params(plain), abs=0.02)
    buffer = io.BytesIO()
    torch.save(shared.state_dict(), buffer)
    buffer.seek(0)
    fresh = multiplex(tiny_vit(), "all")
    torch.manual_seed(1)
    for p in fresh.parameters():
        p.data.normal_()
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh(x), shared(x))
    assert fresh.blocks[0].attn.qkv.weight is fresh.blocks[3].attn.qkv.weight


def test_deepcopy_keeps_the_sharing() -> None:  # what the EMA copy does
    ema = copy.deepcopy(multiplex(tiny_vit(), "every-2"))
    assert ema.blocks[0].attn.qkv is ema.blocks[1].attn.qkv
    assert count_params(ema) == count_params(multiplex(tiny_vit(), "every-2"))


# --------------------------------------------------------------------------- strategies


def test_strategy_grammar() -> None:
    assert parse_strategy("none", 3) == [[0], [1], [2]]
    assert parse_strategy("every-2", 5) == [[0, 1], [2, 3], [4]]
    assert parse_strategy("all", 3) == [[0, 1, 2]]
    assert parse_strategy("[[0,1,2],[3]]", 4) == [[0, 1, 2], [3]]
    assert parse_strategy([[0], [1, 2]], 3) == [[0], [1, 2]]


@pytest.mark.parametrize("strategy,message", [
    ("every-0", "k >= 1"),
    ("pairs", "unknown strategy 'pairs'"),
    ("[[0,1],[3]]", "once each, in order"),
    ("[[1,0],[2,3]]", "once each, in order"),
    ("[[0,1],[]]", "non-empty"),
    ("[[0,1]", "not a JSON list"),
])
def test_bad_strategies_are_named(strategy: str, message: str) -> None:
    with pytest.raises(MultiplexError, match=message):
        multiplex(tiny_vit(), strategy)


def test_swin_groups_may_not_cross_stages() -> None:
    with pytest.raises(MultiplexError, match=r"group \[1, 2\] crosses a stage"):
        multiplex(tiny_swin(), [[0], [1, 2], [3]])
    ok = multiplex(tiny_swin(), [[0, 1], [2], [3]], transform=False)
    assert ok.layers[0].blocks[0].mlp is ok.layers[0].blocks[1].mlp
    assert ok.layers[1].blocks[0].mlp is not ok.layers[1].blocks[1].mlp


def test_a_cnn_is_refused() -> None:
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=3)
    with pytest.raises(MultiplexError, match="neither a timm ViT/DeiT nor a Swin"):
        multiplex(resnet, "every-2")
    with pytest.raises(MultiplexError, match="sharing init"):
        multiplex(tiny_vit(), "every-2", init="last")
