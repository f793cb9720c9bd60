"""Residual adapters beside the blocks of a frozen backbone (Rebuffi et al., NeurIPS 2017 /
CVPR 2018; reused frozen backbones as in Vasconcelos et al., CVPR 2022).

:func:`add_adapters` replaces every ``every``-th residual block of a timm ViT/DeiT, Swin,
ConvNeXt or ResNet (or raylab's :class:`~raylab.models.vitdet.ViTDet`) by an
:class:`AdaptedBlock` that computes ``block(x) + adapter(x)``: a small network in parallel
with the block, fed the block's input. The adapter's last layer starts at zero (weight and
bias), so it outputs exact zeros and a freshly adapted model computes bitwise what the model
computed before; training then moves the adapter only where the task needs it. Its first
layer has a normal random init, so the zero last layer gets a nonzero gradient at step one.

Adapters come in two layouts, chosen per block from its layers:

- :class:`ConvAdapter` for channels-first blocks (``[B, C, H, W]``: ConvNeXt, ResNet): one
  1x1 conv C -> C with ``dim == 0`` (Rebuffi's adapter), else a 1x1 conv bottleneck
  C -> dim -> C with GELU;
- :class:`MlpAdapter` for channels-last token blocks (``[B, N, C]`` ViT/ViTDet ...
  ``[B, H, W, C]`` Swin/ViTDet): timm's ``Mlp`` C -> dim -> C with GELU (``dim == 0``
  means ``C // 4`` here, as a token adapter needs a bottleneck).

Parameter names: the wrapped block's parameters move from ``<block>.*`` to
``<block>.block.*`` and the adapter's are ``<block>.adapter.*`` (e.g.
``blocks.3.block.attn.qkv.weight``, ``blocks.3.adapter.fc2.weight``). Load pretrained
weights *before* adding adapters; a checkpoint of an adapted model loads only into a model
given the same adapters (same ``every`` and ``dim``). :func:`is_adapter_parameter` is the
``trainable`` predicate for :func:`raylab.models.freeze.freeze_backbone`. Pure torch + timm,
no Ray import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import Mlp, trunc_normal_
from torch import nn

from raylab.errors import ConfigError

#: Names of the ResNet-style stage containers whose children are residual blocks.
_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


# --------------------------------------------------------------------------- adapters


class ConvAdapter(nn.Module):
    """Channels-first adapter ``[B, C, H, W]`` -> same shape; outputs zeros at init.

    Args:
        channels: C, the block's channels.
        dim: Bottleneck width: 0 gives a single 1x1 conv C -> C (Rebuffi's adapter),
            > 0 a 1x1 conv C -> dim, GELU, 1x1 conv dim -> C.
    """

    def __init__(self, channels: int, dim: int = 0) -> None:
        super().__init__()
        self.channels, self.dim = int(channels), int(dim)
        if self.dim > 0:
            self.fc1: nn.Conv2d | None = nn.Conv2d(channels, dim, 1)
            self.act: nn.Module = nn.GELU()
            # Normal init of the first layer: with it at zero too, the last layer's weight
            # would get no gradient (its input would be zero) and only its bias would train.
            nn.init.kaiming_normal_(self.fc1.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(self.fc1.bias)
        else:
            self.fc1, self.act = None, nn.Identity()
        self.fc2 = nn.Conv2d(dim if self.dim > 0 else channels, channels, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> same shape."""
        if self.fc1 is not None:
            x = self.act(self.fc1(x))
        return self.fc2(x)


class MlpAdapter(Mlp):
    """Channels-last adapter ``[..., C]`` -> same shape (timm's ``Mlp`` C -> dim -> C with
    GELU, parameters ``fc1.*``, ``fc2.*``); outputs zeros at init.

    Args:
        channels: C, the block's channels.
        dim: Bottleneck width; 0 means ``max(1, C // 4)``.
    """

    def __init__(self, channels: int, dim: int = 0) -> None:
        hidden = int(dim) if dim > 0 else max(1, int(channels) // 4)
        super().__init__(channels, hidden, channels, act_layer=nn.GELU)
        self.channels, self.dim = int(channels), hidden
        trunc_normal_(self.fc1.weight, std=0.02)  # timm's ViT init for Linear layers
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)


class AdaptedBlock(nn.Module):
    """A residual block with an adapter in parallel: ``block(x, ...) + adapter(x)``.

    The block keeps its own parameters under ``block.*``; the adapter's are under
    ``adapter.*``. There is no attribute passthrough: code that reads block attributes
    (``blocks[i].attn``, ``blocks[i].window_size``) must go through ``.block``.

    Args:
        block: The residual block (its output has its input's shape).
        adapter: A module mapping the block's input to a tensor of the same shape.
    """

    def __init__(self, block: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.adapter = adapter

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The block's output plus the adapter's on the same input; extra arguments go to
        the block only."""
        # The adapter runs first: a block that changed its input in place would otherwise
        # feed the adapter something else than the block saw.
        delta = self.adapter(x)
        return self.block(x, *args, **kwargs) + delta


# --------------------------------------------------------------------------- placement


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The residual blocks of ``model`` with their names, in ``named_modules`` order.

    A block is a child of an ``nn.ModuleList`` / ``nn.Sequential`` named ``blocks`` (timm
    ViT/DeiT ``blocks``, ConvNeXt ``stages.N.blocks``, Swin ``layers.N.blocks``, raylab
    ViTDet ``blocks``; ``stages_N.blocks`` in a ``features_only`` model) or of a ResNet
    stage ``layer1`` .. ``layer4``. Blocks nested inside a returned block are left out.
    """
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf != "blocks" and leaf not in _RESNET_STAGES:
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue  # e.g. a `blocks` list inside a block: the outer block is adapted
        found += [(f"{name}.{child}" if name else child, block)
                  for child, block in module.named_children()]
    return found


def _layers(block: nn.Module) -> list[nn.Module]:
    return [m for m in block.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _make_adapter(name: str, block: nn.Module, dim: int) -> nn.Module:
    """The adapter for ``block``: C from its last Linear/Conv2d, the layout from its first
    (a block whose first layer is a conv takes ``[B, C, H, W]``, else channels-last)."""
    layers = _layers(block)
    if not layers:
        raise ConfigError(f"block {name!r} ({type(block).__name__}) has no Linear or Conv2d "
                          f"layer to size an adapter from")
    last = layers[-1]
    channels = last.out_features if isinstance(last, nn.Linear) else last.out_channels
    # The first layer, not "has a C->C conv": ViTDet's conv-propagation blocks end with a
    # conv of C channels but take [B, H, W, C] tokens (their first layer is attn.qkv).
    if isinstance(layers[0], nn.Conv2d):
        adapter: nn.Module = ConvAdapter(channels, dim)
    else:
        adapter = MlpAdapter(channels, dim)
    return adapter.to(device=last.weight.device, dtype=last.weight.dtype)


def add_adapters(model: nn.Module, every: int, dim: int) -> list[str]:
    """Put a zero-initialised residual adapter beside every ``every``-th block, in place.

    Block ``i`` of :func:`find_blocks` (from 0) gets one when ``(i + 1) % every == 0``:
    ``every=1`` all blocks, ``every=2`` the 2nd, 4th, ... Blocks that change the tensor's
    shape (a ``downsample`` attribute that is not None: ResNet's first block of stages
    2-4) are skipped but still counted. Each chosen block is replaced in its container by
    an :class:`AdaptedBlock` (see the module docstring for the parameter names).

    Args:
        model: A timm ViT/DeiT, Swin, ConvNeXt or ResNet (also ``features_only``), or a
            raylab ViTDet.
        every: Adapter spacing; <= 0 adds none.
        dim: Bottleneck width (see :class:`ConvAdapter`, :class:`MlpAdapter`); >= 0.

    Returns:
        The names of the adapted blocks, in order (``[]`` when ``every <= 0``).

    Raises:
        ConfigError: ``dim`` < 0, a model without residual blocks, a model that has
            adapters already, or a block without a Linear/Conv2d layer.
    """
    if isinstance(dim, bool) or int(dim) != dim or dim < 0:
        raise ConfigError(f"adapter dim must be an integer >= 0, got {dim!r}")
    if isinstance(every, bool) or int(every) != every:
        raise ConfigError(f"adapter spacing `every` must be an integer, got {every!r}")
    if every <= 0:
        return []
    blocks = find_blocks(model)
    if not blocks:
        raise ConfigError(f"no residual blocks found in {type(model).__name__}; adapters "
                          f"support timm ViT/DeiT, Swin, ConvNeXt, ResNet and raylab ViTDet")
    if any(isinstance(block, AdaptedBlock) for _, block in blocks):
        raise ConfigError(f"{type(model).__name__} has adapters already; add them once, "
                          f"to the plain model")
    adapted = []
    for i, (name, block) in enumerate(blocks):
        if (i + 1) % every or getattr(block, "downsample", None) is not None:
            continue
        wrapper = AdaptedBlock(block, _make_adapter(name, block, int(dim)))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, wrapper)
        adapted.append(name)
    return adapted


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name (of the model or a DDP / compile wrapper) is an adapter's:
    it contains ``.adapter.``; the ``trainable`` predicate for ``freeze_backbone``."""
    return ".adapter." in f".{name}"


def adapter_parameter_names(model: nn.Module) -> set[str]:
    """Names of the adapter parameters of ``model``."""
    return {n for n, _ in model.named_parameters() if is_adapter_parameter(n)}


@dataclass
class AdapterConfig:
    """Where and how wide the adapters are (config keys ``adapters.every``,
    ``adapters.dim``)."""

    #: An adapter beside every N-th block (1: all, 2: the 2nd, 4th, ...); 0: no adapters.
    every: int = 0
    #: Bottleneck width: CNN blocks 0 = one 1x1 conv C -> C (Rebuffi), ViT blocks 0 = C / 4.
    dim: int = 64

    def validate(self) -> None:
        for key in ("every", "dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"config key 'adapters.{key}': expected an integer >= 0, "
                                  f"got {value!r}")
