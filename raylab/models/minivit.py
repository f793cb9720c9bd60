"""MiniViT weight multiplexing (Zhang et al., CVPR 2022) for timm ViT/DeiT and Swin models.

:func:`multiplex` makes consecutive transformer blocks share their attention (``qkv``,
``proj``) and MLP weights, one set per group of layers, while each layer keeps its own
LayerNorms, LayerScale, drop-path and (Swin) relative-position table. Sharing is by module:
every layer of a group holds the *same* ``nn.Linear`` / MLP objects, so autograd sums the
gradients of all the layers using a tensor, ``model.parameters()`` yields it once, and
``torch.save`` stores its storage once (the checkpoint shrinks with the parameter count).

Weight transformation restores per-layer diversity: two heads x heads matrices per layer mix
the attention heads before and after the softmax (1x1 convolutions over the head axis in the
paper), and for Swin a 7x7 depthwise convolution before the MLP. Both start as the identity,
so a freshly multiplexed model computes exactly what the shared model without them computes.

The blocks keep timm's class and parameter names (a transformed attention module is a
subclass of timm's with two extra parameters), so timm's ``forward_features``,
``forward_intermediates`` and hooks on ``blocks[i].attn.qkv`` keep working.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import torch
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Attention, Block
from torch import nn

#: Sharing strategies by name; an explicit grouping ``[[0, 1], [2, 3], ...]`` also works.
STRATEGIES = ("none", "every-2", "every-3", "every-4", "every-6", "all")
#: How a group's shared weights start from the layers it replaces.
INITS = ("first", "mean")


class MultiplexError(ValueError):
    """A model or sharing strategy :func:`multiplex` cannot apply."""


# --------------------------------------------------------------------------- strategies


def parse_strategy(strategy: str | Sequence[Sequence[int]], depth: int) -> list[list[int]]:
    """Groups of consecutive layer indices, covering ``range(depth)`` once, in order.

    ``"none"``: one layer per group; ``"every-k"``: groups of k (the last one shorter when k
    does not divide ``depth``); ``"all"``: one group; a list of lists (or its JSON text, as
    given on the command line) is checked and used as it is.
    """
    if isinstance(strategy, str):
        text = strategy.strip()
        if text.startswith("["):
            try:
                strategy = json.loads(text)
            except json.JSONDecodeError as e:
                raise MultiplexError(f"sharing: {text!r} is not a JSON list of lists "
                                     f"({e.msg})") from None
        elif text == "none":
            return [[i] for i in range(depth)]
        elif text == "all":
            return [list(range(depth))]
        elif m := re.fullmatch(r"every-(\d+)", text):
            k = int(m.group(1))
            if k < 1:
                raise MultiplexError(f"sharing: every-{k} needs k >= 1")
            return [list(range(i, min(i + k, depth))) for i in range(0, depth, k)]
        else:
            raise MultiplexError(f"sharing: unknown strategy {text!r}; expected none, every-K "
                                 f"(e.g. every-2), all, or a grouping like [[0,1],[2,3]]")
    groups = [list(g) for g in strategy]
    flat = [i for g in groups for i in g]
    if any(not isinstance(i, int) for i in flat) or any(not g for g in groups):
        raise MultiplexError(f"sharing: {groups} must be non-empty lists of layer indices")
    if flat != list(range(depth)):
        raise MultiplexError(
            f"sharing: {groups} must list the {depth} layers 0..{depth - 1} once each, in "
            f"order, in groups of consecutive layers")
    return groups


# --------------------------------------------------------------------------- transformed attention


def _identity_mix(heads: int, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.eye(heads, dtype=like.dtype, device=like.device))


def _mix_heads(weight: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """``out[:, g] = sum_h weight[g, h] * attn[:, h]``: a 1x1 convolution over heads."""
    return torch.einsum("gh,bhnm->bgnm", weight.to(attn.dtype), attn)


def _add_head_mixing(attn: nn.Module, cls: type[nn.Module]) -> None:
    """Turn ``attn`` (timm's attention, in place) into ``cls``, its subclass with
    head-mixing matrices before and after the softmax (identity: same output)."""
    weight = attn.qkv.weight
    attn.__class__ = cls
    attn.pre_softmax = _identity_mix(attn.num_heads, weight)
    attn.post_softmax = _identity_mix(attn.num_heads, weight)


class HeadMixedAttention(Attention):
    """timm's ViT attention with MiniViT's head transforms around the softmax (the
    fused kernel cannot take them, so the product is written out)."""

    pre_softmax: nn.Parameter
    post_softmax: nn.Parameter

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if is_causal:
            raise NotImplementedError("head-mixed attention has no causal mode")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if attn_mask is not None:
            attn = attn + attn_mask
        attn = _mix_heads(self.post_softmax, _mix_heads(self.pre_softmax, attn)
                          .softmax(dim=-1))
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class HeadMixedWindowAttention(WindowAttention):
    """timm's Swin window attention with MiniViT's head transforms around the softmax;
    the relative-position bias and the shifted-window mask are added before them."""

    pre_softmax: nn.Parameter
    post_softmax: nn.Parameter

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self._get_rel_pos_bias()
        if mask is not None:
            windows = mask.shape[0]
            attn = attn.view(-1, windows, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = _mix_heads(self.post_softmax, _mix_heads(self.pre_softmax, attn)
                          .softmax(dim=-1))
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


class DepthwiseMlpSwinBlock(SwinTransformerBlock):
    """timm's Swin block with MiniViT's MLP transform: a 7x7 depthwise convolution on the
    normalised (B, H, W, C) map before the shared MLP (identity at initialisation)."""

    mlp_conv: nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        y = self.mlp_conv(self.norm2(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = self.mlp(y.reshape(B, -1, C)).reshape(B, H, W, C)
        return x + self.drop_path2(y)


def _identity_depthwise(dim: int, like: torch.Tensor, kernel: int = 7) -> nn.Conv2d:
    conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=False,
                     device=like.device, dtype=like.dtype)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, 0, kernel // 2, kernel // 2] = 1.0
    return conv


# --------------------------------------------------------------------------- sharing


def _share(blocks: list[nn.Module], names: tuple[str, ...], init: str) -> None:
    """Make every block hold the first block's modules ``names`` (dotted), whose weights
    become the group's first layer's or the mean of the group's layers'."""
    def get(block: nn.Module, name: str) -> nn.Module:
        return block.get_submodule(name)

    def put(block: nn.Module, name: str, module: nn.Module) -> None:
        parent, _, leaf = name.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, leaf, module)

    for name in names:
        shared = get(blocks[0], name)
        if init == "mean" and len(blocks) > 1:
            with torch.no_grad():
                for pname, param in shared.named_parameters():
                    others = [get(b, name).get_parameter(pname) for b in blocks]
                    if any(o.shape != param.shape for o in others):
                        raise MultiplexError(f"sharing: layers of a group differ in {name}."
                                             f"{pname}'s shape; cannot share it")
                    param.copy_(torch.stack([o.detach() for o in others]).mean(0))
        for block in blocks[1:]:
            own = get(block, name)
            if any(a.shape != b.shape for a, b in zip(own.parameters(), shared.parameters())):
                raise MultiplexError(f"sharing: layers of a group differ in {name}'s shape")
            put(block, name, shared)


#: The modules one layer of a group takes from the group (norms, LayerScale, drop-path and
#: relative-position tables stay per layer).
SHARED_MODULES = ("attn.qkv", "attn.proj", "mlp")


def _blocks_and_stages(model: nn.Module) -> tuple[list[list[nn.Module]], str]:
    """The model's transformer blocks per stage (one stage for a ViT) and its kind."""
    if isinstance(model, SwinTransformer):
        stages = [list(layer.blocks) for layer in model.layers]
        for block in (b for s in stages for b in s):
            if type(block) is not SwinTransformerBlock or type(block.attn) is not WindowAttention:
                raise MultiplexError(f"sharing: unsupported Swin block {type(block).__name__}")
        return stages, "swin"
    blocks = getattr(model, "blocks", None)
    if blocks is None or not len(blocks):
        raise MultiplexError(f"sharing: {type(model).__name__} is neither a timm ViT/DeiT nor a "
                             f"Swin transformer (no .blocks of transformer blocks)")
    for i, block in enumerate(blocks):
        if not isinstance(block, Block) or type(block.attn) is not Attention:
            raise MultiplexError(
                f"sharing: block {i} of {type(model).__name__} is {type(block).__name__} with "
                f"{type(getattr(block, 'attn', None)).__name__}; expected timm's ViT Block with "
                f"its Attention")
    return [list(blocks)], "vit"


def multiplex(model: nn.Module, strategy: str | Sequence[Sequence[int]] = "every-2",
              transform: bool = True, init: str = "first") -> nn.Module:
    """MiniViT's weight multiplexing, applied to ``model`` in place (and returned).

    Args:
        model: A timm ``VisionTransformer`` (ViT, DeiT) or ``SwinTransformer``.
        strategy: ``"none"``, ``"every-K"``, ``"all"`` or explicit groups of consecutive
            layer indices. A ViT's indices run over its blocks; a Swin model's over the
            blocks of all stages in order (``every-K`` and ``all`` apply per stage), and a
            group may not cross a stage.
        transform: Add the per-layer weight transformations (head mixing around the softmax;
            a 7x7 depthwise convolution before a Swin MLP), initialised to the identity.
        init: A group's shared weights: its ``"first"`` layer's, or the ``"mean"`` of its
            layers' (when starting from an uncompressed model's trained weights).

    ``strategy="none", transform=False`` leaves the model as it was.
    """
    if init not in INITS:
        raise MultiplexError(f"sharing init: {init!r}; expected one of {', '.join(INITS)}")
    stages, kind = _blocks_and_stages(model)
    named = isinstance(strategy, str) and not strategy.strip().startswith("[")
    if not named:  # explicit groups index the blocks of all stages in order
        depth = sum(len(s) for s in stages)
        groups = parse_strategy(strategy, depth)
        flat_blocks = [b for s in stages for b in s]
        stage_of = [i for i, s in enumerate(stages) for _ in s]
        for g in groups:
            if len({stage_of[i] for i in g}) > 1:
                raise MultiplexError(f"sharing: group {g} crosses a stage boundary")
        block_groups = [[flat_blocks[i] for i in g] for g in groups]
    else:
        block_groups = [[s[i] for i in g] for s in stages
                        for g in parse_strategy(strategy, len(s))]
    for group in block_groups:
        _share(group, SHARED_MODULES, init)
    if transform:
        attention_cls = HeadMixedWindowAttention if kind == "swin" else HeadMixedAttention
        block_cls = DepthwiseMlpSwinBlock if kind == "swin" else None
        for block in (b for g in block_groups for b in g):
            _add_head_mixing(block.attn, attention_cls)
            if block_cls is not None:
                block.__class__ = block_cls
                block.mlp_conv = _identity_depthwise(block.norm2.normalized_shape[0],
                                                     block.attn.qkv.weight)
    model.multiplexed = {"strategy": strategy if isinstance(strategy, str) else
                         [list(g) for g in strategy], "transform": transform, "init": init,
                         "groups": [len(g) for g in block_groups]}
    return model


def sharing_summary(model: nn.Module) -> dict[str, Any]:
    """The sharing a multiplexed model carries (``{}`` for a plain one)."""
    return dict(getattr(model, "multiplexed", {}))
