"""Simple Copy-Paste (Ghiasi et al., CVPR 2021): objects of one image pasted onto another.

Both images arrive already scale-jittered and flipped, each on its own, at the same size
(:class:`raylab.transforms.detection.ScaleJitter`). :func:`copy_paste` pastes a random
subset of the source's objects (its size uniform in 0..n) onto the target:

- the pasted pixels replace the target's, through an alpha matte that is the union of the
  pasted masks, Gaussian-smoothed at its edges when ``blend`` (the masks stay binary);
- target masks lose the pasted pixels, and every box is recomputed from its mask
  (``x_min, y_min, x_max + 1, y_max + 1``);
- a target object is removed when its box moved by more than ``box_thr`` pixels on some
  side **and** at most ``area_thr`` pixels of its mask are left (the reference's 10 and
  300); one with no pixel left always goes, and so does a pasted one with none.

Pure numpy (and scipy's Gaussian filter): it runs in Ray Data tasks or a DataLoader alike.
``rng`` is the only source of randomness, so the same seed gives the same output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from raylab.transforms.detection import masks_to_boxes

#: The keys of a sample :func:`copy_paste` reads and returns (plus ``pasted`` out).
KEYS = ("image", "masks", "boxes", "labels")


def _check(sample: Mapping[str, Any], name: str) -> tuple[int, int]:
    """The sample's (H, W); ValueError naming the side and the field that is wrong."""
    missing = [k for k in KEYS if k not in sample]
    if missing:
        raise ValueError(f"copy_paste: {name} lacks {missing} (expected keys {list(KEYS)})")
    extra = sorted(set(sample) - set(KEYS) - {"pasted", "source"})
    if extra:
        raise ValueError(f"copy_paste: {name} has keys it cannot carry through: {extra}")
    image, masks = np.asarray(sample["image"]), np.asarray(sample["masks"])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"copy_paste: {name}['image'] must be HxWx3 uint8, got "
                         f"{image.dtype} {image.shape}")
    h, w = image.shape[:2]
    n = len(sample["labels"])
    if masks.dtype != bool or masks.shape != (n, h, w):
        raise ValueError(f"copy_paste: {name}['masks'] must be {n}x{h}x{w} bool (one per "
                         f"label), got {masks.dtype} {masks.shape}")
    if np.shape(sample["boxes"]) != (n, 4):
        raise ValueError(f"copy_paste: {name}['boxes'] must be {n}x4 xyxy, got "
                         f"{np.shape(sample['boxes'])}")
    return h, w


#: The blending Gaussian reaches this many sigmas (scipy's default, stated so that
#: :func:`paste_window` knows the filter's radius).
TRUNCATE = 4.0


def paste_alpha(union: np.ndarray, blend: bool, sigma: float) -> np.ndarray:
    """The paste's alpha matte (float32 in [0, 1]) from the union of the pasted masks:
    the binary union, or its Gaussian-smoothed version (soft edges, a thin halo)."""
    alpha = union.astype(np.float32)
    if blend and sigma > 0 and union.any():
        alpha = np.clip(gaussian_filter(alpha, sigma=float(sigma), truncate=TRUNCATE),
                        0.0, 1.0)
    return alpha


def paste_window(union: np.ndarray, blend: bool, sigma: float) -> tuple[slice, slice]:
    """The rows and columns a paste can change: the union's bounding box, widened when
    blending by the Gaussian's radius r (beyond it the alpha is 0 and the pixels stay
    the target's). Filtering only this crop gives exactly the whole image's alpha: the
    filter is separable, and where a window crosses the crop's edge it reflects the r
    pixels of margin, which are 0 after either pass, as the whole image has there (at
    the image's own border both reflect the same pixels). The union must have a
    pixel."""
    rows = np.flatnonzero(union.any(axis=1))
    cols = np.flatnonzero(union.any(axis=0))
    pad = int(TRUNCATE * float(sigma) + 0.5) if blend and sigma > 0 else 0
    return (slice(max(int(rows[0]) - pad, 0), int(rows[-1]) + 1 + pad),
            slice(max(int(cols[0]) - pad, 0), int(cols[-1]) + 1 + pad))


def copy_paste(dst: Mapping[str, Any], src: Mapping[str, Any], rng: np.random.Generator, *,
               blend: bool = True, sigma: float = 1.0, box_thr: float = 10,
               area_thr: int = 300) -> dict[str, np.ndarray]:
    """Paste a random subset of ``src``'s objects onto ``dst`` (see the module's text).

    Args:
        dst, src: ``{"image": HxWx3 uint8, "masks": NxHxW bool, "boxes": Nx4 xyxy,
            "labels": N int64}`` of the same image size.
        rng: The only source of randomness (which objects, how many).
        blend: Smooth the alpha matte with a Gaussian of ``sigma`` pixels.
        box_thr, area_thr: The occlusion rule's thresholds (pixels, pixels of area).

    Returns:
        The four keys for the pasted image (surviving target objects first, in their
        order, then the pasted ones), ``"pasted"``: an N-long bool array marking the
        pasted objects, and ``"source"``: each object's int64 index in its own input
        (``dst`` for the survivors, ``src`` for the pasted), so that per-object columns
        the function does not carry (crowd flags, annotation ids) follow their objects.

    Raises:
        ValueError: A missing or malformed field, or images of different sizes.
    """
    size_dst, size_src = _check(dst, "dst"), _check(src, "src")
    if size_dst != size_src:
        raise ValueError(f"copy_paste: dst is {size_dst[0]}x{size_dst[1]} and src "
                         f"{size_src[0]}x{size_src[1]}; jitter both to the same size first")
    n_src = len(src["labels"])
    count = int(rng.integers(0, n_src + 1))
    chosen = np.sort(rng.choice(n_src, size=count, replace=False)) if count else \
        np.zeros(0, np.int64)
    src_masks = np.asarray(src["masks"])[chosen]
    src_boxes, src_nonempty = masks_to_boxes(src_masks)
    chosen, src_masks, src_boxes = chosen[src_nonempty], src_masks[src_nonempty], \
        src_boxes[src_nonempty]
    union = src_masks.any(axis=0) if len(chosen) else np.zeros(size_dst, bool)

    dst_image = np.asarray(dst["image"])
    image = dst_image.copy()
    if union.any():
        # Only the crop the paste can change is filtered and mixed: on coco128 at 512 px
        # it averages a third of the image, and the filter and the mix were ~15 % of an
        # image's decode + jitter + paste (BENCHMARKS.md, "Ingest with copy-paste").
        window = paste_window(union, blend, sigma)
        alpha = paste_alpha(union[window], blend, sigma)[..., None]
        mixed = dst_image[window] * (1.0 - alpha) + np.asarray(src["image"])[window] * alpha
        image[window] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)

    dst_masks = np.asarray(dst["masks"]) & ~union
    dst_boxes, _ = masks_to_boxes(dst_masks)
    moved = (np.abs(dst_boxes - np.asarray(dst["boxes"], np.float32)) > box_thr).any(axis=1)
    area = dst_masks.sum(axis=(1, 2))
    keep = ~((moved & (area <= area_thr)) | (area == 0))

    labels = np.concatenate([np.asarray(dst["labels"], np.int64)[keep],
                             np.asarray(src["labels"], np.int64)[chosen]])
    return {
        "image": image,
        "masks": np.concatenate([dst_masks[keep], src_masks]),
        "boxes": np.concatenate([dst_boxes[keep], src_boxes]).astype(np.float32),
        "labels": labels,
        "pasted": np.concatenate([np.zeros(int(keep.sum()), bool), np.ones(len(chosen), bool)]),
        "source": np.concatenate([np.flatnonzero(keep), chosen]).astype(np.int64),
    }
