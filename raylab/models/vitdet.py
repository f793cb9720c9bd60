"""ViTDet: a plain timm ViT adapted at fine-tuning time into a detection backbone.

Li, Mao, Girshick, He, "Exploring Plain Vision Transformer Backbones for Object Detection",
ECCV 2022; checked against detectron2 (``modeling/backbone/vit.py``, ``utils.py``,
``projects/ViTDet``). The ViT is any timm ``VisionTransformer`` (``vit_*``, ``deit_*``, built
with ``pretrained=False``): its patch embedding, position embedding and blocks' weights
(norm1, attn.qkv/proj, norm2, mlp, layer scale, drop path) are reused with the same names,
but attention runs here, so that

- every block attends inside non-overlapping windows (``window_size``, the token grid
  zero-padded to a multiple of it, as the reference: padded tokens are keys, unmasked),
  except the propagation blocks (``propagation="global"``: global attention there;
  ``"conv"``: window attention everywhere plus a zero-initialised residual bottleneck conv
  block after each; ``"none"``: window attention only);
- attention adds decomposed relative position biases (a zero-initialised h and a w table
  per block, sized for the window or for the global grid at ``img_size``; linearly
  interpolated when the grid differs), computed from the unscaled query as the reference;
- the absolute position embedding (prefix-token entries dropped) is bicubically
  interpolated to the input's token grid.

The pyramid (``pyramid``): ``"simple"`` is the paper's simple feature pyramid from the last
stride-16 map (scales 4, 2, 1, 0.5, each then 1x1 and 3x3 convs with channel LayerNorm,
plus a max-pooled p6); ``"none"`` is the paper's no-pyramid baseline, one stride-16 level
(the 1x1 and 3x3 convs only); ``"fpn"`` is the paper's ablation (a), "FPN, 4-stage": the
outputs of the blocks ending four equal stages (ViT-B: 2, 5, 8, 11) resampled to strides
4, 8, 16, 32 (deconv-LN-GELU-deconv / deconv / identity / 2x2 stride-2 conv), then
torchvision's ``FeaturePyramidNetwork`` (channel LayerNorm) with a max-pooled p6.
The pyramids live in :mod:`raylab.models.vitdet_pyramid`. Pure torch + timm + torchvision, no
Ray import.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.layers.attention import Attention as TimmAttention
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from raylab.errors import CheckpointError, ConfigError
from raylab.models.backbones import pretrained_weights
from raylab.models.timm_names import check_timm_model
from raylab.models.vitdet_pyramid import PYRAMID_SCALES, SimpleFeaturePyramid, StageFPN

PROPAGATIONS = ("global", "none", "conv")
PYRAMIDS = ("simple", "none", "fpn")
#: Parameter names (relative to the backbone) that belong to the pretrained ViT trunk.
# A block's own names, or ``blocks.N.block.*`` once an adapter sits beside it
# (:mod:`raylab.models.adapters`); relative positions, conv propagation and adapters are new.
_TRUNK = re.compile(r"^(patch_embed|pos_embed|norm_pre)(\.|$)|^blocks\.\d+\."
                    r"(?:block\.(?!rel_pos_|residual)|(?!rel_pos_|residual|adapter\.|block\.))")


def default_global_blocks(depth: int, count: int = 4) -> tuple[int, ...]:
    """``count`` evenly spaced block indices, each ending one of ``count`` equal stages:
    depth 12 -> (2, 5, 8, 11), 24 -> (5, 11, 17, 23), 32 -> (7, 15, 23, 31).

    Raises:
        ConfigError: ``count`` outside [0, depth].
    """
    if not 0 <= count <= depth:
        raise ConfigError(f"the number of global blocks must be in [0, depth={depth}], "
                          f"got {count!r}")
    return tuple((i + 1) * depth // count - 1 for i in range(count))


def resample_pos_embed(pos: torch.Tensor, src_grid: Sequence[int],
                       dst_grid: Sequence[int]) -> torch.Tensor:
    """Bicubic resampling of a patch-grid position embedding ``[1, h*w, C]`` (no prefix
    tokens) from ``src_grid`` (h, w) to ``dst_grid``; returned unchanged at the same grid."""
    (sh, sw), (dh, dw) = tuple(src_grid), tuple(dst_grid)
    if (sh, sw) == (dh, dw):
        return pos
    grid = pos.reshape(1, sh, sw, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(dh, dw), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, dh * dw, -1).to(pos.dtype)


def _relative_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """``[size, size, d]``: the table's entry for each (query, key) offset along one axis,
    the table (``[2 * n - 1, d]``) linearly interpolated first when ``n != size``."""
    length = 2 * size - 1
    if table.shape[0] != length:
        table = F.interpolate(table.t()[None].float(), size=length, mode="linear",
                              align_corners=False)[0].t().to(table.dtype)
    coords = torch.arange(size, device=table.device)
    return table[coords[:, None] - coords[None, :] + size - 1]


def decomposed_rel_pos_bias(q: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                            grid: tuple[int, int]) -> torch.Tensor:
    """Attention bias ``[B, heads, h*w, h*w]`` from queries ``[B, heads, h*w, d]`` on an
    (h, w) grid: ``bias[(i, j), (k, l)] = q_ij . Rh[i - k] + q_ij . Rw[j - l]`` (MViTv2)."""
    h, w = grid
    b, heads, n, d = q.shape
    r_q = q.reshape(b, heads, h, w, d)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, _relative_table(rel_h, h))
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, _relative_table(rel_w, w))
    return (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, heads, n, n)


def window_partition(x: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``[B, H, W, C]`` -> windows ``[B * nW, size, size, C]`` (zero-padded bottom/right)
    and the padded grid (Hp, Wp)."""
    b, h, w, c = x.shape
    x = F.pad(x, (0, 0, 0, (-w) % size, 0, (-h) % size))
    hp, wp = x.shape[1], x.shape[2]
    x = x.view(b, hp // size, size, wp // size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size, size, c), (hp, wp)


def window_unpartition(windows: torch.Tensor, size: int, padded: tuple[int, int],
                       grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``[B, H, W, C]`` with the padding removed."""
    hp, wp = padded
    b = windows.shape[0] // (hp // size * wp // size)
    x = windows.view(b, hp // size, wp // size, size, size, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, -1)[:, :grid[0], :grid[1]]


class ConvPropagation(nn.Module):
    """Residual bottleneck block (1x1 -> 3x3 -> 1x1 convs, channel LayerNorm, GELU; width
    ``dim // 2``); its last norm is zero-initialised, so it starts as the identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        mid = dim // 2
        self.conv1 = nn.Conv2d(dim, mid, 1, bias=False)
        self.norm1 = LayerNorm2d(mid)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.norm2 = LayerNorm2d(mid)
        self.act2 = nn.GELU()
        self.conv3 = nn.Conv2d(mid, dim, 1, bias=False)
        self.norm3 = LayerNorm2d(dim)
        for conv in (self.conv1, self.conv2, self.conv3):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.norm3.weight)
        nn.init.zeros_(self.norm3.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> same shape."""
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.act2(self.norm2(self.conv2(out)))
        return x + self.norm3(self.conv3(out))


class ViTDetBlock(nn.Module):
    """A timm ViT block's weights run with window or global attention and decomposed
    relative positions, optionally followed by a :class:`ConvPropagation` block.

    Args:
        block: A timm ``vision_transformer.Block`` with a fused-qkv ``Attention``; its
            modules are adopted (same parameter names).
        window_size: Window side in tokens; 0 for global attention.
        rel_pos_grid: The (h, w) grid the relative-position tables are sized for.
        residual: Add a conv propagation block after the MLP.
    """

    def __init__(self, block: nn.Module, window_size: int, rel_pos_grid: tuple[int, int],
                 residual: bool = False) -> None:
        super().__init__()
        attn = getattr(block, "attn", None)
        if not isinstance(block, TimmBlock) or not isinstance(attn, TimmAttention):
            raise ConfigError(f"ViTDet needs timm ViT blocks (vision_transformer.Block with "
                              f"a fused-qkv Attention), got {type(block).__name__}")
        self.norm1, self.attn, self.ls1 = block.norm1, attn, block.ls1
        self.drop_path1, self.norm2, self.mlp = block.drop_path1, block.norm2, block.mlp
        self.ls2, self.drop_path2 = block.ls2, block.drop_path2
        self.window_size = int(window_size)
        head_dim = attn.head_dim
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_grid[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_grid[1] - 1, head_dim))
        self.residual = ConvPropagation(self.norm1.weight.shape[0]) if residual else None

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention within each ``[B, h, w, C]`` grid."""
        attn = self.attn
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        gate = attn.gate(tokens).sigmoid() if getattr(attn, "gate", None) is not None else None
        qkv = attn.qkv(tokens).reshape(b, h * w, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype),
            dropout_p=attn.attn_drop.p if self.training else 0.0)
        out = attn.norm(out.transpose(1, 2).reshape(b, h * w, -1))
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out)).reshape(b, h, w, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, C]`` tokens -> same shape."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            grid = (x.shape[1], x.shape[2])
            windows, padded = window_partition(x, self.window_size)
            x = window_unpartition(self._attention(windows), self.window_size, padded, grid)
        else:
            x = self._attention(x)
        x = shortcut + self.drop_path1(self.ls1(x))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if self.residual is not None:
            x = self.residual(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x


def _level_name(stride: int) -> str:
    level = math.log2(stride)
    if level != int(level):
        raise ConfigError(f"pyramid strides must be powers of two, got {stride}")
    return f"p{int(level)}"


class ViTDet(nn.Module):
    """A timm ViT as ViTDet's backbone; ``forward`` returns the feature pyramid.

    Args:
        model_name: Any timm ``VisionTransformer`` name (``vit_base_patch16_224``, ...).
        img_size: Detector input size (1024); sizes the global blocks' relative positions.
        window_size: Window side in tokens (14); 0 makes every block global.
        global_blocks: Propagation block indices, or a count of evenly spaced ones (4:
            ViT-B 2, 5, 8, 11); global attention there with ``propagation="global"``, a conv
            block after them with ``"conv"``, ignored with ``"none"``.
        propagation: ``"global"``, ``"none"`` or ``"conv"``.
        pyramid: ``"simple"``, ``"none"`` or ``"fpn"`` (see the module docstring).
        drop_path: Stochastic depth rate of the last block (timm's linear rule; 0.1).
        out_channels: Channels of every pyramid level (256).
        pretrain_img_size: Image size of the ViT's position embedding; None keeps the
            timm name's (224 for ``*_224``).
        **model_kwargs: Further ``timm.create_model`` arguments (``depth``,
            ``embed_dim``, ``num_heads``, ``patch_size``, ``init_values``, ...).

    Attributes:
        out_channels: 256, as torchvision's detectors expect.
        strides: Output name -> stride, e.g. ``{"p2": 4, ..., "p6": 64}``.
        depth, embed_dim, patch_size, grid: Depth, width, patch side, pretrain grid.

    Raises:
        ConfigError: An unknown name or a non-ViT model, a bad knob value, or global block
            indices outside the depth.
    """

    def __init__(self, model_name: str = "vit_base_patch16_224", img_size: int = 1024,
                 window_size: int = 14, global_blocks: int | Sequence[int] = 4,
                 propagation: str = "global", pyramid: str = "simple", drop_path: float = 0.1,
                 out_channels: int = 256, pretrain_img_size: int | None = None,
                 **model_kwargs: Any) -> None:
        super().__init__()
        if propagation not in PROPAGATIONS:
            raise ConfigError(f"propagation must be one of {list(PROPAGATIONS)}, "
                              f"got {propagation!r}")
        if pyramid not in PYRAMIDS:
            raise ConfigError(f"pyramid must be one of {list(PYRAMIDS)}, got {pyramid!r}")
        if int(window_size) != window_size or window_size < 0:
            raise ConfigError(f"window_size must be an integer >= 0, got {window_size!r}")
        vit = _create_vit(model_name, drop_path, pretrain_img_size, model_kwargs)
        self.depth = len(vit.blocks)
        self.embed_dim = int(vit.embed_dim)
        self.patch_size = int(vit.patch_embed.patch_size[0])
        if img_size % self.patch_size or vit.patch_embed.patch_size[1] != self.patch_size:
            raise ConfigError(f"img_size {img_size} must be a multiple of the square patch "
                              f"size {tuple(vit.patch_embed.patch_size)}")
        self.grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        self.img_size, self.window_size = int(img_size), int(window_size)
        self.propagation, self.pyramid_kind = propagation, pyramid
        self.global_blocks = self._resolve_blocks(global_blocks)

        self.patch_embed = vit.patch_embed
        prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        self.pos_embed = (None if vit.pos_embed is None else
                          nn.Parameter(vit.pos_embed.detach()[:, prefix:].clone()))
        self.norm_pre = vit.norm_pre
        full = (self.img_size // self.patch_size,) * 2
        window = (self.window_size,) * 2
        blocks = []
        for i, block in enumerate(vit.blocks):
            is_global = self.window_size == 0 or (propagation == "global"
                                                   and i in self.global_blocks)
            blocks.append(ViTDetBlock(block, 0 if is_global else self.window_size,
                                      full if is_global else window,
                                      residual=propagation == "conv" and i in self.global_blocks))
        self.blocks = nn.ModuleList(blocks)
        self.grad_checkpointing = False
        self.out_channels = int(out_channels)
        self.stage_ends = default_global_blocks(self.depth, 4) if pyramid == "fpn" else ()
        strides = ([self.patch_size] if pyramid == "none" else
                   [int(self.patch_size / s) for s in PYRAMID_SCALES] + [4 * self.patch_size])
        self.strides = {_level_name(s): s for s in strides}
        self.pyramid = self._build_pyramid(pyramid, list(self.strides))
        #: Extra pyramid capacity (:class:`~raylab.models.pyramid_refine.PyramidRefinement`).
        self.refine: nn.Module | None = None

    def _resolve_blocks(self, blocks: int | Sequence[int]) -> tuple[int, ...]:
        if isinstance(blocks, int):
            return default_global_blocks(self.depth, blocks)
        out = tuple(sorted({int(i) for i in blocks}))
        if any(not 0 <= i < self.depth for i in out):
            raise ConfigError(f"global_blocks {list(blocks)} must be block indices in "
                              f"[0, {self.depth})")
        return out

    def _build_pyramid(self, kind: str, names: list[str]) -> nn.Module:
        if kind == "none":
            return SimpleFeaturePyramid(self.embed_dim, names, [1.0], self.out_channels,
                                        top_pool=False)
        if kind == "fpn":
            return StageFPN(self.embed_dim, names[:4], self.out_channels, names[4])
        return SimpleFeaturePyramid(self.embed_dim, names[:4], PYRAMID_SCALES,
                                    self.out_channels, extra_name=names[4])

    @property
    def featmap_names(self) -> list[str]:
        """Names of the levels RoI pooling reads (all but the max-pooled extra level)."""
        names = list(self.strides)
        return names if len(names) == 1 else names[:-1]

    def forward_features(self, x: torch.Tensor, stage_ends: Sequence[int] = ()
                         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images ``[B, 3, H, W]`` (H, W multiples of the patch size) -> the last block's
        map ``[B, C, H/p, W/p]`` and the maps after the blocks in ``stage_ends``."""
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the "
                             f"patch size {self.patch_size}")
        x = self.patch_embed(x)  # [B, H, W, C] (timm's dynamic_img_size output)
        if self.pos_embed is not None:
            pos = resample_pos_embed(self.pos_embed, self.grid, x.shape[1:3])
            x = x + pos.reshape(1, x.shape[1], x.shape[2], -1)
        x = self.norm_pre(x)
        stages = []
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in stage_ends:
                stages.append(x.permute(0, 3, 1, 2))
        return x.permute(0, 3, 1, 2), stages

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Images ``[B, 3, H, W]`` -> ``OrderedDict`` of ``[B, 256, H/s, W/s]`` maps, one per
        name of :attr:`strides` (simple / fpn: p2..p6, strides 4..64)."""
        last, stages = self.forward_features(x, self.stage_ends)
        out = self.pyramid(last, stages)
        return out if self.refine is None else self.refine(out)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (saves activation memory)."""
        self.grad_checkpointing = bool(enable)

    def no_weight_decay(self) -> set[str]:
        """The absolute and relative position embeddings."""
        names = {n for n, _ in self.named_parameters() if ".rel_pos_" in n}
        return names | ({"pos_embed"} if self.pos_embed is not None else set())

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """timm's layer-decay hook: each parameter's :func:`layer_id`, so that
        :func:`raylab.optim.param_groups.param_groups` with ``layer_decay=0.7`` gives the
        paper's ``0.7 ** (depth + 1 - layer_id)``."""
        return lambda name: layer_id(name, self.depth)

    def trunk_parameter_names(self) -> list[str]:
        """Names of the parameters that come from the pretrained ViT (patch/position
        embedding, the blocks' timm weights): those :meth:`load_vit_weights` sets."""
        return [n for n, _ in self.named_parameters() if _TRUNK.match(n)]

    @torch.no_grad()
    def load_vit_weights(self, source: nn.Module | Mapping[str, torch.Tensor],
                         num_prefix_tokens: int | None = None) -> list[str]:
        """Copy a timm ViT's weights (a model or its state dict) into the trunk.

        The position embedding's prefix-token entries are dropped and the rest bicubically
        resampled to this model's pretrain grid when the grids differ. A state dict's prefix
        count is ``num_prefix_tokens`` or inferred from a square grid (197 -> 1).

        Returns:
            The source's names not used (``cls_token``, ``norm.*``, ``head.*``, ...).

        Raises:
            CheckpointError: A trunk weight missing from the source, or of another shape.
        """
        if isinstance(source, nn.Module):
            if num_prefix_tokens is None and hasattr(source, "num_prefix_tokens"):
                num_prefix_tokens = (0 if getattr(source, "no_embed_class", False)
                                     else int(source.num_prefix_tokens))
            source = source.state_dict()
        own = self.state_dict()
        wanted = set(self.trunk_parameter_names())
        update, unused = {}, []
        for name, value in source.items():
            if name == "pos_embed" and self.pos_embed is not None:
                update[name] = self._fit_pos_embed(value, num_prefix_tokens)
            elif name in wanted:
                if own[name].shape != value.shape:
                    raise CheckpointError(f"ViT weight {name!r} has shape {tuple(value.shape)}, "
                                          f"the ViTDet trunk needs {tuple(own[name].shape)}")
                update[name] = value
            else:
                unused.append(name)
        missing = sorted(wanted - set(update))
        if missing:
            raise CheckpointError(f"the ViT weights lack {len(missing)} trunk tensors of "
                                  f"this ViTDet, e.g. {missing[:3]}")
        for name, value in update.items():
            own[name].copy_(value)
        return unused

    def _fit_pos_embed(self, pos: torch.Tensor, prefix: int | None) -> torch.Tensor:
        n = pos.shape[1]
        if prefix is None:
            prefix = n - math.isqrt(n) ** 2
        side = math.isqrt(n - prefix)
        if side * side != n - prefix or pos.shape[-1] != self.embed_dim:
            raise CheckpointError(f"pos_embed of shape {tuple(pos.shape)} with {prefix} prefix "
                                  f"tokens is not a square grid of width {self.embed_dim}")
        return resample_pos_embed(pos[:, prefix:], (side, side), self.grid)


def _create_vit(name: str, drop_path: float, pretrain_img_size: int | None,
                model_kwargs: dict[str, Any]) -> VisionTransformer:
    check_timm_model(name, key=None)
    kwargs = dict(model_kwargs)
    kwargs.update(pretrained=False, num_classes=0, drop_path_rate=float(drop_path),
                  dynamic_img_size=True)
    if pretrain_img_size is not None:
        kwargs["img_size"] = int(pretrain_img_size)
    try:
        vit = timm.create_model(name, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"timm cannot build {name!r} as a ViT with {sorted(kwargs)}: "
                          f"{exc}") from None
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(f"ViTDet needs a timm VisionTransformer, {name!r} builds a "
                          f"{type(vit).__name__}")
    return vit


def layer_id(name: str, depth: int) -> int:
    """Layer id for layer-wise lr decay: patch/position embedding (and ``norm_pre``) 0,
    block i (its relative positions and conv propagation included) i + 1, everything
    else (pyramid, detector heads) ``depth + 1``. A leading ``backbone.`` is ignored."""
    name = name.removeprefix("backbone.")
    if re.match(r"(patch_embed|pos_embed|norm_pre)(\.|$)", name):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) + 1 if match else depth + 1


def load_vitdet_weights(backbone: ViTDet, checkpoint_dir: str | Path,
                        which: str = "auto") -> list[str]:
    """Load the ViT of a raylab DINO or classifier checkpoint
    (:func:`raylab.models.backbones.pretrained_weights`) into ``backbone``'s trunk; see
    :meth:`ViTDet.load_vit_weights`.

    Raises:
        CheckpointError: No backbone in the checkpoint, or a ViT that does not fit.
    """
    weights = pretrained_weights(checkpoint_dir, which)
    transformed = sorted(k for k in weights.state
                         if k.endswith((".pre_softmax", ".post_softmax", ".mlp_conv.weight")))
    if transformed:
        # MiniViT's head mixing around the softmax has no counterpart in a plain trunk;
        # dropping it would silently change what every block computes.
        raise CheckpointError(
            f"{checkpoint_dir} ({weights.method} {weights.arch}): a MiniViT run with weight "
            f"transformation ({transformed[0]}, ...) cannot become a plain ViTDet trunk; "
            f"use a run with transform=false (its shared weights load as per-block copies)")
    try:
        return backbone.load_vit_weights(weights.state)
    except CheckpointError as exc:
        raise CheckpointError(f"{checkpoint_dir} ({weights.method} {weights.arch}): "
                              f"{exc}") from None
