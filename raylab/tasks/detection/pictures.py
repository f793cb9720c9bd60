"""What the training pipeline feeds the detector, drawn: jittered images before and after
Simple Copy-Paste, each instance's mask tinted and its box outlined (pasted ones in white,
:func:`raylab.tasks.detection.predict.draw_instances`).

Runs the same batch function as the Ray Data pipeline (:func:`raylab.transforms.
detection_batch.detection_batch_transform`) on the first training rows with the run's
seed, once without the paste and once with it: the two columns share their jitter draws,
so they differ exactly by the paste. Pure numpy and PIL, no Ray.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image

from raylab.data.coco import coco_manifest
from raylab.tasks.detection.config import DetectionConfig
from raylab.tasks.detection.data import TRAIN_MAP_BATCH, read_batch, split_folder, train_transform
from raylab.tasks.detection.predict import draw_instances
from raylab.transforms.detection_batch import (
    CopyPasteParams,
    contiguous_label_map,
    detection_batch_transform,
    unpack_masks,
    with_partners,
)

GAP = 4


def _batch_pictures(out: dict[str, Any]) -> list[Image.Image]:
    size = out["image"].shape[1]
    pictures = []
    for i in range(len(out["image"])):
        masks = unpack_masks(out["masks"][i], out["mask_windows"][i], size).numpy()
        pictures.append(draw_instances(out["image"][i], out["boxes"][i], masks,
                                       out["labels"][i], out["pasted"][i]))
    return pictures


def augmentation_grid(cfg: DetectionConfig, path: str | os.PathLike, count: int = 4
                      ) -> Path | None:
    """Draw ``count`` training images as the pipeline makes them: jittered (left) and, when
    ``aug.copy_paste.prob`` > 0, after the paste (right), each image's partner drawn
    among the first rows read (at least a map batch of the pipeline).

    Returns:
        The PNG written (atomically), or None when the split has no rows.
    """
    folder = split_folder(cfg, cfg.train_split)
    batch = read_batch(folder, limit=max(count, TRAIN_MAP_BATCH))
    if not len(batch["image_id"]):
        return None
    label_map = contiguous_label_map(
        c["id"] for c in coco_manifest(folder)["extra"]["categories"])
    transform = train_transform(cfg)
    columns = [_batch_pictures(detection_batch_transform(
        batch, transform, label_map=label_map, seed=cfg.seed))]
    params: CopyPasteParams | None = cfg.aug.copy_paste.params()
    if params is not None:
        paired = with_partners(batch, batch, prob=params.prob, seed=cfg.seed)
        columns.append(_batch_pictures(detection_batch_transform(
            paired, transform, label_map=label_map, seed=cfg.seed, copy_paste=params)))
    rows = min(count, len(columns[0]))
    side = columns[0][0].width
    grid = Image.new("RGB", (len(columns) * (side + GAP) - GAP, rows * (side + GAP) - GAP),
                     (255, 255, 255))
    for c, column in enumerate(columns):
        for r in range(rows):
            grid.paste(column[r], (c * (side + GAP), r * (side + GAP)))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
