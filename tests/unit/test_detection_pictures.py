"""The report's picture of what the training pipeline feeds the detector: jittered images
before and after Simple Copy-Paste, drawn from the same batch function as Ray Data runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from raylab import config as cfglib
from raylab.tasks.detection.config import DetectionConfig
from raylab.tasks.detection.pictures import augmentation_grid
from raylab.tasks.detection.predict import PALETTE, PASTED, draw_instances


def test_draw_instances_tints_masks_and_outlines_pasted_boxes_in_white() -> None:
    image = np.full((20, 20, 3), 100, np.uint8)
    masks = np.zeros((2, 20, 20), bool)
    masks[0, 2:6, 2:6] = True
    masks[1, 10:18, 10:18] = True
    boxes = np.array([[2, 2, 6, 6], [10, 10, 18, 18]], np.float32)
    picture = np.asarray(draw_instances(image, boxes, masks, np.array([1, 2]),
                                        np.array([0, 1])))
    # Inside a mask, away from the box outline: half the image, half the label's colour.
    expected = np.rint(0.5 * 100 + 0.5 * np.asarray(PALETTE[1], float)).astype(np.uint8)
    np.testing.assert_allclose(picture[4, 4], expected, atol=1)
    assert tuple(picture[10, 14]) == PASTED  # the pasted object's outline
    assert tuple(picture[0, 0]) == (100, 100, 100)  # outside every object: untouched


def test_augmentation_grid_shows_both_columns_only_with_copy_paste(
        detection_shards: Path, tmp_path: Path) -> None:
    cfg = cfglib.apply_overrides(DetectionConfig(), {
        "data": str(detection_shards), "image_size": 64, "aug.copy_paste.prob": 1.0})
    path = augmentation_grid(cfg, tmp_path / "samples.png", count=3)
    with Image.open(path) as grid:
        assert grid.size == (2 * 64 + 4, 3 * 64 + 2 * 4)
        pixels = np.asarray(grid.convert("RGB"))
    before, after = pixels[:, :64], pixels[:, 68:]
    assert not np.array_equal(before, after)  # the paste changed some image
    assert (after == PASTED).all(axis=-1).any()  # and drew a pasted box
    off = cfglib.apply_overrides(cfg, {"aug.copy_paste.prob": 0.0})
    with Image.open(augmentation_grid(off, tmp_path / "plain.png", count=3)) as grid:
        assert grid.size == (64, 3 * 64 + 2 * 4)
        np.testing.assert_array_equal(np.asarray(grid.convert("RGB")), before)
    assert not list(tmp_path.glob(".*.tmp"))
