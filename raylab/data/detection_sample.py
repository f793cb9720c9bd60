"""A small SYNTHETIC COCO-format detection/instance-segmentation set (``data sample detection``).

Layout (as COCO distributes it; convert a split with :func:`raylab.data.coco.convert_coco`)::

    <dst>/images/<split>/<image id:06d>.png     splits train and val
    <dst>/annotations/instances_<split>.json
    <dst>/README.txt                            starts with "SYNTHETIC DETECTION"

Each image holds 1-4 flat-coloured shapes (one shape and colour family per class, 16-64 px)
over a textured grey background, some overlapping. Masks are exact: the pixels of an
instance's mask are exactly its colour in the (lossless PNG) image, and no other pixel is.
An occluded instance's mask excludes its occluder's pixels and its box is that of the
visible mask; an instance left with fewer than ``MIN_VISIBLE`` pixels is not drawn at all.
Unoccluded polygonal shapes are stored as polygons (their pycocotools rasterisation is what
is drawn), rings and occluded instances as compressed or uncompressed RLE, so that every
path of the converter is used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from raylab.data.coco import compressed_counts, convert_coco
from raylab.data.shards import sample_folder
from raylab.errors import ConfigError

SAMPLE_CLASSES = ("circle", "square", "triangle", "ring", "cross")
#: Saturated base colour of each class; the background is nearly grey (see _background).
CLASS_COLOURS = {"circle": (215, 45, 45), "square": (40, 185, 65), "triangle": (50, 85, 225),
                 "ring": (230, 195, 35), "cross": (185, 55, 205)}
SPLITS = ("train", "val")
MARKER = "SYNTHETIC DETECTION"
MIN_VISIBLE = 20
#: A new shape is placed only where every earlier one keeps this share of its pixels.
_KEEP_VISIBLE = 0.4
_SIZE_RANGE = (16, 64)

_README = """SYNTHETIC DETECTION sample (COCO instances format)
Written by raylab (raylab.data.detection_sample.write_detection_sample).

These are NOT real photographs: flat-coloured shapes (one shape and colour family per
class: {classes}) on a textured grey background, with exact instance masks.
Layout: images/<split>/<id>.png and annotations/instances_<split>.json, splits train, val.
Convert a split: raylab data convert coco images/train annotations/instances_train.json SHARDS
Parameters: {params}
"""


def _polygon(shape: str, cx: float, cy: float, d: float, angle: float) -> list[float]:
    """The outline of ``shape`` (diameter ``d``, rotated by ``angle``) as ``[x0, y0, ...]``."""
    if shape in ("circle", "ring"):
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        u, v = np.cos(t) * d / 2, np.sin(t) * d / 2
    elif shape == "square":
        s = d * 0.36
        u, v = np.array([-s, s, s, -s]), np.array([-s, -s, s, s])
    elif shape == "triangle":
        t = np.pi / 2 + np.array([0, 2, 4]) * np.pi / 3
        u, v = np.cos(t) * d / 2, np.sin(t) * d / 2
    else:  # cross: a plus sign with arms of half-width d/6
        a, b = d / 6, d / 2
        u = np.array([-a, a, a, b, b, a, a, -a, -a, -b, -b, -a])
        v = np.array([-b, -b, -a, -a, a, a, b, b, a, a, -a, -a])
    c, s = np.cos(angle), np.sin(angle)
    xs, ys = cx + c * u - s * v, cy + s * u + c * v
    return [round(float(p), 2) for xy in zip(xs, ys, strict=True) for p in xy]


def _rasterise(polygon: list[float], size: int) -> np.ndarray:
    """The pycocotools rasterisation of one polygon, bool ``[size, size]``."""
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], size, size))
    return mask_utils.decode(rle).astype(bool)


def _shape(rng: np.random.Generator, shape: str, size: int) -> tuple[np.ndarray, list[float]]:
    """A random placement of ``shape``: its full mask and outline polygon."""
    d = rng.uniform(_SIZE_RANGE[0], min(_SIZE_RANGE[1], size / 2))
    cx, cy = rng.uniform(d / 2 + 1, size - d / 2 - 1, size=2)
    polygon = _polygon(shape, cx, cy, d, rng.uniform(0, 2 * np.pi))
    mask = _rasterise(polygon, size)
    if shape == "ring":
        mask &= ~_rasterise(_polygon("circle", cx, cy, d / 2, 0.0), size)
    return mask, polygon


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random grey texture with a slight tint and pixel noise (channel spread < 30,
    far from the saturated class colours)."""
    cells = max(2, size // 16)
    coarse = rng.uniform(60, 180, size=(cells, cells)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size),
                                                                 Image.Resampling.BILINEAR))
    grey = smooth + rng.normal(0, 6, size=(size, size))
    tint = rng.integers(-10, 11, size=3)
    noise = rng.integers(-4, 5, size=(size, size, 3))
    return np.clip(grey[..., None] + tint + noise, 20, 230).astype(np.uint8)


def _place(rng: np.random.Generator, names: list[str], size: int,
           ) -> list[tuple[int, np.ndarray, list[float]]]:
    """1-4 shapes (class index, full mask, polygon), bottom first; a shape is tried a few
    times at new places if it would hide too much of an earlier one."""
    placed: list[tuple[int, np.ndarray, list[float]]] = []
    visible: list[np.ndarray] = []
    for _ in range(rng.integers(1, 5)):
        label = int(rng.integers(len(names)))
        for _attempt in range(10):
            mask, polygon = _shape(rng, names[label], size)
            kept = [v & ~mask for v in visible]
            if all(k.sum() >= _KEEP_VISIBLE * p[1].sum() for k, p in zip(kept, placed,
                                                                          strict=True)):
                placed.append((label, mask, polygon))
                visible = [*kept, mask.copy()]
                break
    return placed


def _annotations(placed: list[tuple[int, np.ndarray, list[float]]], names: list[str],
                 ) -> list[tuple[int, np.ndarray, dict[str, Any]]]:
    """Visible masks from the top down; instances under ``MIN_VISIBLE`` pixels are dropped
    (and not drawn). Returns (class index, full mask, annotation without ids), bottom first."""
    covered = np.zeros_like(placed[0][1]) if placed else None
    kept: list[tuple[int, np.ndarray, dict[str, Any]]] = []
    for label, full, polygon in reversed(placed):
        vis = full & ~covered
        if vis.sum() < MIN_VISIBLE:
            continue
        covered |= full
        rle = mask_utils.encode(np.asfortranarray(vis.astype(np.uint8)))
        ann: dict[str, Any] = {
            "category_id": label + 1, "iscrowd": 0, "area": float(vis.sum()),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        }
        if names[label] != "ring" and np.array_equal(vis, full):
            ann["segmentation"] = [polygon]
        else:
            ann["segmentation"] = {"size": list(vis.shape), "counts": rle["counts"].decode()}
        kept.append((label, full, ann))
    return kept[::-1]


def _colour(rng: np.random.Generator, name: str) -> np.ndarray:
    base = np.array(CLASS_COLOURS[name])
    return np.clip(base + rng.integers(-12, 13, size=3), 0, 255).astype(np.uint8)


def _write_split(folder: Path, split: str, n_images: int, names: list[str], size: int,
                 rng: np.random.Generator, first_ids: tuple[int, int]) -> tuple[int, int]:
    """Draw one split's images and write its JSON; returns the next (image, annotation) id."""
    (folder / "images" / split).mkdir(parents=True)
    image_id, ann_id = first_ids
    images, anns = [], []
    n_occluded = 0
    for _ in range(n_images):
        pixels = _background(rng, size)
        for label, full, ann in _annotations(_place(rng, names, size), names):
            pixels[full] = _colour(rng, names[label])
            if isinstance(ann["segmentation"], dict) and names[label] != "ring":
                n_occluded += 1
                if n_occluded % 2:  # every other occluded instance: uncompressed RLE
                    counts = ann["segmentation"]["counts"].encode()
                    ann["segmentation"]["counts"] = compressed_counts(counts)
            anns.append({"id": ann_id, "image_id": image_id, **ann})
            ann_id += 1
        file_name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(folder / "images" / split / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": size,
                       "height": size})
        image_id += 1
    data = {
        "info": {"description": f"{MARKER} sample written by raylab (not real images)",
                 "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [{"id": k + 1, "name": n, "supercategory": "shape"}
                       for k, n in enumerate(names)],
    }
    (folder / "annotations").mkdir(exist_ok=True)
    (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(data) + "\n")
    return image_id, ann_id


def write_detection_sample(dst: str | os.PathLike, *, images: int = 64,
                           val_images: int | None = None, size: int = 128, classes: int = 3,
                           seed: int = 0) -> Path:
    """Write a small SYNTHETIC COCO-format detection set (splits train and val).

    Args:
        dst: Output folder (new, empty, or an earlier sample, which is replaced).
        images: Training images.
        val_images: Validation images (default ``max(1, images // 4)``).
        size: Image side in pixels, 32..1024.
        classes: Number of classes, the first of ``SAMPLE_CLASSES`` (circle, square,
            triangle, ring, cross), 1..5; category ids are 1..classes.
        seed: Random seed; equal arguments give identical files.

    Returns:
        ``dst`` as a Path.

    Raises:
        ConfigError: An argument is out of range.
        DataError: ``dst`` is a file, or a non-empty folder that is not an earlier sample.
    """
    dst = Path(dst)
    val_images = max(1, images // 4) if val_images is None else val_images
    for name, value in (("images", images), ("val_images", val_images)):
        if value < 1:
            raise ConfigError(f"{name}: expected >= 1, got {value}")
    if not 32 <= size <= 1024:
        raise ConfigError(f"size: expected 32..1024 pixels, got {size}")
    if not 1 <= classes <= len(SAMPLE_CLASSES):
        raise ConfigError(f"classes: expected 1..{len(SAMPLE_CLASSES)}, got {classes}")
    names = list(SAMPLE_CLASSES[:classes])
    with sample_folder(dst, MARKER, "synthetic detection sample") as tmp:
        ids = (1, 1)
        for k, (split, n) in enumerate(zip(SPLITS, (images, val_images), strict=True)):
            rng = np.random.default_rng([seed, k])
            ids = _write_split(tmp, split, n, names, size, rng, ids)
        params = dict(classes=names, images=images, val_images=val_images, size=size,
                      seed=seed)
        (tmp / "README.txt").write_text(_README.format(classes=", ".join(names),
                                                       params=params))
    return dst


def convert_sample(raw: str | os.PathLike, dst: str | os.PathLike,
                   overwrite: bool = False) -> Path:
    """Convert each split of a sample from :func:`write_detection_sample` into
    ``dst/<split>`` (what ``raylab train detection --data dst`` reads)."""
    raw, dst = Path(raw), Path(dst)
    for split in SPLITS:
        convert_coco(raw / "images" / split, raw / "annotations" / f"instances_{split}.json",
                     dst / split, overwrite=overwrite)
    return dst
