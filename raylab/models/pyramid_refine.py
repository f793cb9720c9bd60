"""Extra pyramid capacity on top of a detector's feature pyramid.

Vasconcelos et al. (CVPR 2022) find that a frozen classification backbone matches a
fine-tuned one only when the detector above it is big enough: they grow the feature
pyramid (NAS-FPN cells repeated several times instead of one FPN) and the heads. raylab's
knob for the pyramid is ``fpn_layers``: that many :class:`PyramidCell` s stacked on the
backbone's pyramid, each a top-down then a bottom-up pass of 3x3 conv + LayerNorm + ReLU
per level (PANet's path aggregation, a fixed stand-in for a searched NAS-FPN cell), added
to its input as a residual, so the pyramid's levels, channels and strides stay as they are.
Pure torch + timm, no Ray import.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn


def _conv_norm_act(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                         LayerNorm2d(channels), nn.ReLU(inplace=True))


class PyramidCell(nn.Module):
    """One top-down + bottom-up pass over ``levels`` maps of ``channels`` channels,
    ordered fine to coarse (p2, p3, ...); each level keeps its size.

    Top-down: ``t_L = p_L``, ``t_i = conv(p_i + up(t_{i+1}))``; bottom-up: ``b_1 = t_1``,
    ``b_{i+1} = conv(t_{i+1} + down(b_i))``; out ``p_i + b_i``. ``up`` is nearest
    resizing and ``down`` max pooling to the next level's size (levels of odd sizes
    included).
    """

    def __init__(self, channels: int, levels: int) -> None:
        super().__init__()
        self.top_down = nn.ModuleList(_conv_norm_act(channels) for _ in range(levels - 1))
        self.bottom_up = nn.ModuleList(_conv_norm_act(channels) for _ in range(levels - 1))

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        n = len(maps)
        top = [maps[-1]]
        for i in range(n - 2, -1, -1):
            up = F.interpolate(top[0], size=maps[i].shape[-2:], mode="nearest")
            top.insert(0, self.top_down[i](maps[i] + up))
        out = [top[0]]
        for i in range(1, n):
            down = F.adaptive_max_pool2d(out[-1], top[i].shape[-2:])
            out.append(self.bottom_up[i - 1](top[i] + down))
        return [p + b for p, b in zip(maps, out, strict=True)]


class PyramidRefinement(nn.Module):
    """``layers`` :class:`PyramidCell` s applied to an ``OrderedDict`` of pyramid maps
    (names and order kept)."""

    def __init__(self, channels: int, levels: int, layers: int) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"a pyramid refinement needs at least 2 levels, got {levels}")
        self.cells = nn.ModuleList(PyramidCell(channels, levels) for _ in range(layers))

    def forward(self, features: OrderedDict[str, torch.Tensor]
                ) -> OrderedDict[str, torch.Tensor]:
        names, maps = list(features), list(features.values())
        for cell in self.cells:
            maps = cell(maps)
        return OrderedDict(zip(names, maps, strict=True))
