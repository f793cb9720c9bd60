"""Augmentation of a whole batch of decoded images on the device (pure torch).

For data a worker already holds decoded in memory (the CLEAR stream's buckets), where a
per-image PIL pipeline would cost more than the small network it feeds. The classic CIFAR
recipe: zero-pad by ``padding`` pixels, take a random ``H x W`` crop, flip horizontally
with probability 1/2; each image draws its own offsets and flip from ``generator``, so a
seeded generator makes the epoch reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_crop_flip(x: torch.Tensor, padding: int = 4, flip: bool = True,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Random-crop (after zero padding) and horizontally flip every image of ``x``.

    Args:
        x: ``[B, C, H, W]`` images (any dtype).
        padding: Pixels of zero padding on each side (0: no crop).
        flip: Flip each image with probability 1/2.
        generator: The source of randomness (a CPU generator); None uses the global one.

    Returns:
        A new ``[B, C, H, W]`` tensor of ``x``'s dtype and device.
    """
    if x.dim() != 4:
        raise ValueError(f"expected a [B, C, H, W] batch, got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    b, _, h, w = x.shape
    out = x
    if padding:
        padded = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        rows = (dy.view(b, 1) + torch.arange(h)).to(x.device)  # [B, H]
        cols = (dx.view(b, 1) + torch.arange(w)).to(x.device)  # [B, W]
        batch = torch.arange(b, device=x.device).view(b, 1, 1)
        # Advanced indexing over (batch, row, col) picks each image's own window.
        out = padded.permute(0, 2, 3, 1)[batch, rows.view(b, h, 1), cols.view(b, 1, w)]
        out = out.permute(0, 3, 1, 2).contiguous()
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        out = torch.where(mask.view(b, 1, 1, 1), out.flip(3), out)
    return out


__all__ = ["pad_crop_flip"]
