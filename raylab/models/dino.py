"""DINO's projection head, multi-crop wrapper, backbones and training/attention helpers.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021;
checked against facebookresearch/dino (``vision_transformer.py`` ``DINOHead``, ``utils.py``
``MultiCropWrapper``, ``clip_gradients``, ``cancel_gradients_last_layer``,
``visualize_attention.py``). Backbones are timm models built with ``num_classes=0``, so
that they return pooled features (the CLS token for a ViT); nothing is downloaded.
Pure torch + timm, no Ray import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from raylab.errors import ConfigError
from raylab.models.timm_names import check_timm_model
from raylab.optim.param_groups import unwrap_model

_VIT_PREFIXES = ("vit_", "deit_", "deit3_")


class DINOHead(nn.Module):
    """MLP projection head: MLP (GELU) -> bottleneck -> L2-normalise -> weight-normed linear.

    The last layer is ``weight_norm(Linear(bottleneck_dim, out_dim, bias=False))`` built
    with ``torch.nn.utils.parametrizations.weight_norm``: its weight is ``g * v / ||v||`` per
    output row, with the magnitude ``g`` (``last_layer.parametrizations.weight.original0``,
    ``[out_dim, 1]``) set to 1. With ``norm_last_layer`` the magnitude is frozen
    (``requires_grad=False``): it never gets a gradient, and
    :func:`raylab.optim.param_groups.param_groups` leaves frozen parameters out, so it gets
    no weight decay either; every output is then a cosine similarity with a unit prototype.
    Without it, ``g`` trains and, being 2-D, is weight-decayed like the reference does.

    The MLP's linear layers get a truncated-normal init (std 0.02) and zero biases, as in
    the reference; the last layer keeps PyTorch's default init of ``v``.

    Args:
        in_dim: Backbone feature dimension.
        out_dim: Output dimension ``K`` (65536).
        hidden_dim: Hidden width of the MLP (2048).
        bottleneck_dim: Bottleneck width before the L2 normalisation (256).
        nlayers: Linear layers in the MLP (3); 1 maps straight to the bottleneck.
        use_bn: BatchNorm1d after each hidden linear layer.
        norm_last_layer: Freeze the last layer's weight-norm magnitude at 1.

    Raises:
        ConfigError: A dimension or ``nlayers`` below 1.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3, use_bn: bool = False,
                 norm_last_layer: bool = True) -> None:
        super().__init__()
        dims = {"in_dim": in_dim, "out_dim": out_dim, "hidden_dim": hidden_dim,
                "bottleneck_dim": bottleneck_dim, "nlayers": nlayers}
        bad = {k: v for k, v in dims.items() if int(v) != v or v < 1}
        if bad:
            raise ConfigError(f"DINOHead sizes must be integers >= 1, got {bad}")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(nlayers - 1):
            layers.append(nn.Linear(width, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            width = hidden_dim
        layers.append(nn.Linear(width, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)
        self.norm_last_layer = norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, in_dim]`` features -> ``[N, out_dim]`` outputs (logits before the softmax)."""
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops of possibly different resolutions.

    Consecutive crops with the same shape are concatenated and go through the backbone in
    one pass (so 2 global + 6 local crops cost two backbone calls); the features of all
    crops, in crop-major order, then go through the head in one pass. A backbone that
    returns a tuple contributes its first element.

    Args:
        backbone: A feature extractor, e.g. :func:`build_backbone` (timm, ``num_classes=0``).
        head: The projection head, e.g. :class:`DINOHead`.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward_backbone(self, crops: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Backbone features ``[n_crops * B, D]`` of every crop, crop-major.

        Raises:
            ValueError: No crops, or crops with different batch sizes.
        """
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        crops = list(crops)
        if not crops:
            raise ValueError("MultiCropWrapper got an empty list of crops")
        batch = crops[0].shape[0]
        if any(c.shape[0] != batch for c in crops):
            raise ValueError(f"every crop must have the same batch size, got "
                             f"{[c.shape[0] for c in crops]}")
        features = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[1:] == crops[start].shape[1:]:
                end += 1
            out = self.backbone(torch.cat(crops[start:end]))
            features.append(out[0] if isinstance(out, tuple) else out)
            start = end
        return torch.cat(features)

    def forward(self, crops: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Head outputs ``[n_crops * B, K]`` of every crop, crop-major."""
        return self.head(self.forward_backbone(crops))


def _is_vit(name: str) -> bool:
    return name.startswith(_VIT_PREFIXES)


def build_backbone(name: str, img_size: int, patch_size: int | None = None,
                   drop_path_rate: float = 0.0, **model_kwargs: Any) -> nn.Module:
    """A timm backbone with ``num_classes=0`` (pooled features), randomly initialised.

    ViT / DeiT names (``vit_*``, ``deit_*``, ``deit3_*``) get ``img_size`` (the global crop
    size, which sizes the position embedding), ``patch_size`` when given (e.g. 4 for 32 px
    images) and ``dynamic_img_size=True``, so that local crops of another size are
    accepted (the position embedding is interpolated). Other models (ResNet, ConvNeXt,
    ...) are size-agnostic and ignore ``img_size``. ``pretrained=False`` always: nothing
    is downloaded.

    Args:
        name: timm model name, e.g. ``"vit_small_patch16_224"`` or ``"resnet50"``.
        img_size: Global crop size in pixels.
        patch_size: ViT patch size overriding the name's, or None.
        drop_path_rate: Stochastic depth (0.1 on the DINO student, 0 on the teacher).
        **model_kwargs: Further ``timm.create_model`` arguments (e.g. ``depth=4``).

    Raises:
        ConfigError: Unknown model, ``patch_size`` for a non-ViT, an image size that is
            not a multiple of the patch size, or arguments timm rejects.
    """
    arch = name.split(".")[0]
    check_timm_model(name, key=None)
    if int(img_size) != img_size or img_size < 1:
        raise ConfigError(f"img_size must be an integer >= 1, got {img_size!r}")
    kwargs: dict[str, Any] = dict(model_kwargs)
    kwargs.update(pretrained=False, num_classes=0, drop_path_rate=float(drop_path_rate))
    if _is_vit(arch):
        kwargs.update(img_size=int(img_size), dynamic_img_size=True)
        if patch_size is not None:
            if int(patch_size) != patch_size or patch_size < 1 or img_size % patch_size:
                raise ConfigError(f"patch_size must be an integer >= 1 dividing img_size "
                                  f"{img_size}, got {patch_size!r}")
            kwargs["patch_size"] = int(patch_size)
    elif patch_size is not None:
        raise ConfigError(f"patch_size applies to ViT/DeiT models only, not {name!r}")
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"timm cannot build {name!r} with {sorted(kwargs)}: {exc}") from None


def cancel_last_layer_grad(model: nn.Module, epoch: int, freeze_last_layer_epochs: int) -> None:
    """Drop the gradients of the head's last layer during the first epochs.

    DINO keeps the last layer fixed in epoch 0 (``freeze_last_layer=1``), which stabilises
    the start of training. Call between ``backward()`` and ``optimizer.step()``; a ``None``
    gradient makes the optimizer skip the parameter (no update, no weight decay).

    Args:
        model: The student (a :class:`MultiCropWrapper`, possibly DDP-wrapped); every
            parameter whose name contains ``last_layer`` is affected.
        epoch: Current epoch, 0-based.
        freeze_last_layer_epochs: Number of epochs to freeze for (0 disables).
    """
    if epoch >= freeze_last_layer_epochs:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> list[float]:
    """Clip each parameter's gradient norm to ``clip`` separately (DINO's clipping).

    Unlike ``torch.nn.utils.clip_grad_norm_`` (one global norm), every gradient ``g`` with
    ``||g|| > clip`` is scaled by ``clip / (||g|| + 1e-6)`` on its own. The norms are
    computed on the device and read back once.

    Args:
        model: Any module; parameters without a gradient are skipped.
        clip: Maximum norm per parameter (> 0; DINO uses 3.0).

    Returns:
        The gradient norm of each parameter that had a gradient, before clipping, in
        ``model.parameters()`` order.

    Raises:
        ValueError: ``clip`` <= 0.
    """
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip!r}")
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return []
    device = grads[0].device
    norms = torch.stack([g.norm(2).float().to(device) for g in grads])
    scale = (clip / (norms + 1e-6)).clamp(max=1.0)
    for g, s in zip(grads, scale):
        g.mul_(s.to(device=g.device, dtype=g.dtype))
    return norms.tolist()


class _Captured(Exception):
    """Stops a forward pass once the last block's attention input is captured."""


def _last_attention_module(vit: nn.Module) -> nn.Module:
    blocks = getattr(vit, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    needed = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")
    if attn is None or not all(hasattr(attn, a) for a in needed) or attn.qkv is None:
        raise ConfigError(f"{type(vit).__name__} is not a timm VisionTransformer with a fused "
                          f"qkv attention in blocks[-1].attn")
    return attn


@torch.no_grad()
def last_self_attention(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Self-attention probabilities of the last block of a timm VisionTransformer.

    Runs the model up to the last block's attention (a forward pre-hook on that one
    module captures its input and stops the pass; nothing is patched globally), then
    recomputes ``softmax(q k^T * scale)`` from the block's own ``qkv``, ``q_norm`` and
    ``k_norm``. Put the model in eval mode first so that dropout and stochastic depth are
    off. No gradient is recorded.

    Args:
        vit: A timm ``VisionTransformer`` (or a :class:`MultiCropWrapper` / DDP wrapper
            around one).
        x: Images ``[B, 3, H, W]``.

    Returns:
        ``[B, heads, N, N]`` with ``N`` = prefix tokens (CLS, registers) + patches; every
        row sums to 1.

    Raises:
        ConfigError: The model has no compatible attention block.
    """
    vit = unwrap_model(vit)
    if isinstance(vit, MultiCropWrapper):
        vit = unwrap_model(vit.backbone)
    attn = _last_attention_module(vit)
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0])
        raise _Captured

    handle = attn.register_forward_pre_hook(hook)
    try:
        vit.forward_features(x)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ConfigError(f"{type(vit).__name__}.forward_features never reached the last "
                          f"block's attention")
    tokens = captured[0]
    b, n, _ = tokens.shape
    qkv = attn.qkv(tokens).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)


@torch.no_grad()
def cls_attention_maps(vit: nn.Module, x: torch.Tensor,
                       patch_size: int | None = None) -> torch.Tensor:
    """How much the CLS token attends to each patch, per head of the last block.

    The CLS row of :func:`last_self_attention`, restricted to the patch tokens (the CLS
    and any register tokens are dropped), on the patch grid: DINO's Figure 1 maps.

    Args:
        vit: A timm ``VisionTransformer`` with a class token (or a wrapper around one).
        x: Images ``[B, 3, H, W]``.
        patch_size: Patch side in pixels; None reads it from ``vit.patch_embed``.

    Returns:
        ``[B, heads, H // patch_size, W // patch_size]``; each map sums to 1 minus the
        attention on prefix tokens.

    Raises:
        ConfigError: No class token, or a token count that does not match the patch grid.
    """
    model = unwrap_model(vit)
    if isinstance(model, MultiCropWrapper):
        model = unwrap_model(model.backbone)
    if getattr(model, "cls_token", None) is None:
        raise ConfigError(f"{type(model).__name__} has no class token to take attention from")
    if patch_size is None:
        patch_size = int(model.patch_embed.patch_size[0])
    attn = last_self_attention(model, x)
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    gh, gw = x.shape[-2] // patch_size, x.shape[-1] // patch_size
    cls_row = attn[:, :, 0, n_prefix:]
    if cls_row.shape[-1] != gh * gw:
        raise ConfigError(f"{cls_row.shape[-1]} patch tokens do not fill a {gh}x{gw} grid "
                          f"(image {tuple(x.shape[-2:])}, patch size {patch_size})")
    return cls_row.reshape(x.shape[0], attn.shape[1], gh, gw)
