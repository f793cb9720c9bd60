"""ViTDet's feature pyramids over a plain ViT's stride-16 map (Li et al. 2022, Fig. 2).

:class:`SimpleFeaturePyramid`: the paper's simple pyramid, parallel rescalings (4, 2, 1,
0.5) of the last map, each then 1x1 and 3x3 convs with channel LayerNorm, plus a
max-pooled p6 (one scale and no p6: the no-pyramid baseline). :class:`StageFPN`: its
ablation (a), the four stage outputs rescaled and fed to torchvision's FPN.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from raylab.errors import ConfigError

#: The simple pyramid's rescalings of the stride-16 map: strides 4, 8, 16, 32.
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)


def _conv_norm(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
                         LayerNorm2d(cout))


def _rescale(dim: int, scale: float, down: str = "maxpool") -> tuple[nn.Module, int]:
    """The module taking a stride-s map to stride s / scale, and its output channels."""
    if scale == 4.0:
        up = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2),
                           nn.GELU(), nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2))
        return up, dim // 4
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), dim // 2
    if scale == 1.0:
        return nn.Identity(), dim
    if scale == 0.5:
        return (nn.MaxPool2d(2, stride=2) if down == "maxpool"
                else nn.Conv2d(dim, dim, 2, stride=2)), dim
    raise ConfigError(f"pyramid scale {scale} is not one of 4, 2, 1, 0.5")


class SimpleFeaturePyramid(nn.Module):
    """Parallel rescalings of one map, each then 1x1 and 3x3 convs (no bias) with channel
    LayerNorm; plus ``p6 = max_pool(k=1, s=2)`` of the coarsest level when ``top_pool``.

    Args:
        dim: Channels of the input map.
        names: Output name of each scale.
        scales: Rescaling factors, a subset of (4, 2, 1, 0.5).
        out_channels: Channels of every output.
        top_pool: Add the max-pooled extra level (named ``extra_name``).
        extra_name: Name of that level.
    """

    def __init__(self, dim: int, names: Sequence[str], scales: Sequence[float],
                 out_channels: int = 256, top_pool: bool = True, extra_name: str = "p6") -> None:
        super().__init__()
        self.names = list(names)
        self.stages = nn.ModuleList()
        for scale in scales:
            rescale, width = _rescale(dim, float(scale))
            self.stages.append(nn.Sequential(rescale, _conv_norm(width, out_channels, 1),
                                             _conv_norm(out_channels, out_channels, 3)))
        self.extra_name = extra_name if top_pool else None

    def forward(self, x: torch.Tensor, stages: Sequence[torch.Tensor] = ()
                ) -> OrderedDict[str, torch.Tensor]:
        """The pyramid of ``x`` ``[B, C, H, W]`` (``stages`` is unused)."""
        out = OrderedDict((name, stage(x)) for name, stage in zip(self.names, self.stages))
        if self.extra_name:
            out[self.extra_name] = F.max_pool2d(out[self.names[-1]], kernel_size=1, stride=2)
        return out


class StageFPN(nn.Module):
    """The paper's ablation (a), "FPN, 4-stage": the four stage outputs rescaled by
    4, 2, 1, 0.5 (the downscaling by a 2x2 stride-2 conv), then torchvision's FPN with
    channel LayerNorm and a max-pooled extra level."""

    def __init__(self, dim: int, names: Sequence[str], out_channels: int = 256,
                 extra_name: str = "p6") -> None:
        super().__init__()
        self.names = list(names)
        pairs = [_rescale(dim, s, down="conv") for s in PYRAMID_SCALES]
        self.rescale = nn.ModuleList(m for m, _ in pairs)
        self.fpn = FeaturePyramidNetwork([c for _, c in pairs], out_channels,
                                         extra_blocks=LastLevelMaxPool(), norm_layer=LayerNorm2d)
        self.extra_name = extra_name

    def forward(self, x: torch.Tensor, stages: Sequence[torch.Tensor] = ()
                ) -> OrderedDict[str, torch.Tensor]:
        """The pyramid of the four stage outputs ``stages`` (``x`` is the last of them)."""
        feats = OrderedDict((n, m(s)) for n, m, s in zip(self.names, self.rescale, stages))
        out = self.fpn(feats)
        out[self.extra_name] = out.pop("pool")
        return out
