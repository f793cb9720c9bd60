"""Self-training's first half: a trained detector labels unlabeled images as a coco shard set.

``raylab predict detection IMAGES OUT --checkpoint MODEL --pseudo-labels`` runs
:class:`PseudoLabeler` in Ray Data actors (one model per actor, on a GPU each where the
cluster has them) over a coco shard folder (its annotations are ignored) or a folder of
image files, keeps the detections scoring at least ``threshold`` and writes them as
annotations of a ``format="coco"`` shard folder: the same schema ``raylab data convert
coco`` writes, so ``raylab train detection --set pseudo=OUT`` trains on labeled +
pseudo-labeled images (Ghiasi et al. 2021, Tables 2-3; Xie et al.'s noisy student).

The model and the rows are plain torch/numpy here; the Ray Data job goes through
:mod:`raylab.runtime.datasets`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from raylab.data.coco import FORMAT, SCHEMA, coco_manifest
from raylab.data.shards import MANIFEST, shard_paths, write_shards
from raylab.errors import DataError
from raylab.tasks.detection.predict import (
    TrainedDetector,
    detection_meta,
    image_files,
    read_image,
)
from raylab.transforms.detection_batch import _ragged

#: The columns the labeler reads (an input coco shard folder has more; they are dropped).
INPUT_COLUMNS = ["image_id", "file_name", "image", "width", "height"]
#: Annotation ids of pseudo-labels: ``image_id * IDS_PER_IMAGE + k`` (torchvision keeps at
#: most 100 detections per image), unique over the set.
IDS_PER_IMAGE = 1000


class PseudoLabeler:
    """A Ray Data actor's callable: detections at or above ``threshold`` of each image as
    the annotation columns of a coco shard row (boxes ``xywh``, masks as compressed RLE,
    ``iscrowd`` 0, the area in mask pixels). Detections whose mask covers no pixel are
    dropped (a coco shard never holds an empty mask)."""

    def __init__(self, checkpoint: str, threshold: float, device: str = "auto") -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.detector = TrainedDetector(checkpoint, device=device)
        self.threshold = float(threshold)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        columns: dict[str, list[Any]] = {k: [] for k in ("ann_ids", "category_ids", "boxes",
                                                         "areas", "iscrowd", "masks")}
        for i, (image_id, data) in enumerate(zip(batch["image_id"], batch["image"])):
            pixels = read_image(bytes(data))
            h, w = int(batch["height"][i]), int(batch["width"][i])
            if pixels.shape[:2] != (h, w):
                raise DataError(f"image is {pixels.shape[1]}x{pixels.shape[0]} but the row "
                                f"says {w}x{h}", path=str(batch["file_name"][i]))
            found = [d for d in self.detector(pixels, int(image_id))
                     if d["score"] >= self.threshold]
            kept = [(d, int(mask_utils.area({"size": [h, w], "counts":
                                             d["segmentation"]["counts"].encode("ascii")})))
                    for d in found]
            kept = [(d, area) for d, area in kept if area > 0]
            columns["ann_ids"].append(np.array([int(image_id) * IDS_PER_IMAGE + k
                                                for k in range(len(kept))], np.int64))
            columns["category_ids"].append(np.array([d["category_id"] for d, _ in kept],
                                                    np.int32))
            columns["boxes"].append(np.array([v for d, _ in kept for v in d["bbox"]],
                                             np.float32))
            columns["areas"].append(np.array([a for _, a in kept], np.float32))
            columns["iscrowd"].append(np.zeros(len(kept), np.int8))
            columns["masks"].append(_ragged([d["segmentation"]["counts"].encode("ascii")
                                             for d, _ in kept]))
        out = {k: np.asarray(batch[k]) for k in INPUT_COLUMNS}
        out.update({k: _ragged(v) for k, v in columns.items()})
        return out


def image_folder_table(folder: str | os.PathLike) -> pa.Table:
    """The images of a folder as input rows (image ids 1..N in file order), read here."""
    rows = []
    for image_id, path in enumerate(image_files(folder), start=1):
        data = Path(path).read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
        except OSError as exc:
            raise DataError(f"not a readable image ({exc})", path=path) from None
        rows.append({"image_id": image_id, "file_name": Path(path).name, "image": data,
                     "width": width, "height": height})
    return pa.Table.from_pylist(rows, schema=pa.schema(
        [SCHEMA.field(k) for k in INPUT_COLUMNS]))


def _row_tables(batches: Iterator[dict[str, np.ndarray]], counts: dict[str, int]
                ) -> Iterator[pa.Table]:
    for batch in batches:
        rows = []
        for i in range(len(batch["image_id"])):
            row = {k: batch[k][i] for k in SCHEMA.names}
            row = {k: (v.tolist() if isinstance(v, np.ndarray) else
                       v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
            counts["images"] += 1
            counts["instances"] += len(row["ann_ids"])
            counts["images_without_instances"] += not row["ann_ids"]
            rows.append(row)
        yield pa.Table.from_pylist(rows, schema=SCHEMA)


def pseudo_label(checkpoint: str | os.PathLike, images: str | os.PathLike,
                 out: str | os.PathLike, *, threshold: float = 0.5, actors: int = 1,
                 gpus_per_actor: float = 0.0, batch_size: int = 8) -> dict[str, Any]:
    """Label ``images`` (a coco shard folder or a folder of image files) with the detector
    of ``checkpoint`` in a Ray Data job and write ``out`` as a coco shard folder.

    Returns:
        The manifest written; its ``extra`` holds the model's ``categories``, ``counts``
        and ``pseudo`` (checkpoint, threshold, source).

    Raises:
        DataError: ``images`` is neither a coco shard folder nor a folder of images, an
            image does not decode, or ``out`` exists.
        CheckpointError: ``checkpoint`` is not a detection run's model.
    """
    from raylab.runtime.datasets import dataset_from_tables, map_with_actors, read_shards

    if not 0.0 <= threshold < 1.0:
        raise DataError(f"the pseudo-label score threshold must be in [0, 1), got {threshold}")
    meta = detection_meta(checkpoint)  # fails here, before Ray starts an actor
    if Path(out).exists():
        raise DataError("the output folder exists; choose a new one", path=out)
    source = Path(images)
    if (source / MANIFEST).is_file():
        coco_manifest(source)  # a clear error for a shard folder of another format
        ds = read_shards(shard_paths(source), INPUT_COLUMNS, shuffle_files=False,
                         materialize_mb=0)
    else:
        ds = dataset_from_tables([image_folder_table(source)], shuffle_files=False)
    ds = map_with_actors(ds, PseudoLabeler, batch_size=batch_size, actors=actors,
                         gpus_per_actor=gpus_per_actor, constructor_kwargs={
                             "checkpoint": str(Path(checkpoint).resolve()),
                             "threshold": threshold})
    counts = {"images": 0, "instances": 0, "images_without_instances": 0}
    tables = _row_tables(ds.iter_batches(batch_size=None, batch_format="numpy"), counts)

    def extra(shards: list[dict[str, Any]]) -> dict[str, Any]:
        return {"categories": meta["categories"], "counts": counts,
                "pseudo": {"checkpoint": str(Path(checkpoint).resolve()),
                           "threshold": threshold, "source": str(source.resolve())}}

    return write_shards(tables, out, format=FORMAT, extra=extra)
