"""Detection rows through Ray Data: decode, jitter, pack; and Mask R-CNN targets on a worker.

:func:`detection_batch_transform` is the ``map_batches`` function of the detection
pipelines: it decodes a batch of COCO shard rows (encoded image, RLE masks), applies a
:mod:`raylab.transforms.detection` transform to image, boxes and masks together, and ships
uint8 pixels with each mask bit-packed over its tight box (:func:`pack_masks`; why not RLE:
see :mod:`raylab.transforms.detection`). On the worker, :func:`to_torchvision_targets`
unpacks them into torchvision's image list and target dicts. numpy/torch only, no Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from raylab.errors import DataError
from raylab.transforms.copy_paste import copy_paste as paste_objects
from raylab.transforms.detection import (
    DetectionSample,
    ResizePad,
    ScaleJitter,
    masks_to_boxes,
)
from raylab.transforms.images import decode_image

# ---- compact masks -----------------------------------------------------------------------

def pack_masks(masks: np.ndarray,
               windows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Bit-pack ``[n, S, S]`` masks over each one's tight box.

    Args:
        masks: 0/1 masks.
        windows: Their tight ``xyxy`` boxes if known (e.g. ``DetectionSample.boxes``); any
            boxes that contain the masks work.

    Returns:
        ``(data, windows)``: uint8 ``data`` concatenating ``ceil(bh * bw / 8)`` bytes per
        instance (row-major bits of the window), and int32 ``windows`` ``[n, 4]`` ``xyxy``.
    """
    if windows is None:
        windows, _ = masks_to_boxes(masks)
    windows = np.asarray(windows).reshape(-1, 4).astype(np.int32)
    parts = [np.packbits(m[y1:y2, x1:x2], axis=None)
             for m, (x1, y1, x2, y2) in zip(masks, windows)]
    data = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return data.astype(np.uint8, copy=False), windows


def unpack_masks(data: np.ndarray, windows: np.ndarray, size: int | tuple[int, int],
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_masks`: uint8 ``[n, H, W]`` 0/1 tensor on ``device``.

    Raises:
        DataError: ``data`` does not hold exactly the bytes the windows need.
    """
    h, w = (size, size) if isinstance(size, (int, np.integer)) else size
    windows = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    out = np.zeros((len(windows), h, w), np.uint8)
    pos = 0
    for i, (x1, y1, x2, y2) in enumerate(windows):
        bits = (y2 - y1) * (x2 - x1)
        nbytes = (bits + 7) // 8
        if pos + nbytes > data.size:
            raise DataError(f"packed masks hold {data.size} bytes, windows need more")
        out[i, y1:y2, x1:x2] = np.unpackbits(data[pos:pos + nbytes], count=bits).reshape(
            y2 - y1, x2 - x1)
        pos += nbytes
    if pos != data.size:
        raise DataError(f"packed masks hold {data.size} bytes, windows need {pos}")
    return torch.from_numpy(out).to(device) if device is not None else torch.from_numpy(out)


# ---- Ray Data batch function ------------------------------------------------------------

def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """COCO ``xywh`` (any shape with n*4 values) to float32 ``[n, 4]`` ``xyxy``."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    b[:, 2:] += b[:, :2]
    return b


def contiguous_label_map(category_ids: Iterable[int]) -> dict[int, int]:
    """Sorted category ids to labels ``1..K`` (0 is torchvision's background)."""
    return {int(c): i + 1 for i, c in enumerate(sorted({int(c) for c in category_ids}))}


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def _decode_masks(rles: Any, h: int, w: int, where: str) -> np.ndarray:
    objs = [{"size": [h, w], "counts": bytes(r) if not isinstance(r, str) else r.encode()}
            for r in rles]
    try:
        return np.asarray(mask_utils.decode(objs)).transpose(2, 0, 1)
    except Exception as exc:  # pycocotools raises bare Exceptions on bad counts
        raise DataError(f"cannot decode RLE masks ({exc})", path=where) from None


def _transform_row(batch: Mapping[str, Any], i: int, transform: ScaleJitter | ResizePad,
                   label_map: Mapping[int, int], rng: np.random.Generator,
                   with_masks: bool) -> DetectionSample:
    where = str(batch["file_name"][i]) if "file_name" in batch else f"<row {i}>"
    image = np.asarray(decode_image(batch["image"][i], where))
    h, w = int(batch["height"][i]), int(batch["width"][i])
    if image.shape[:2] != (h, w):
        raise DataError(f"image is {image.shape[1]}x{image.shape[0]} but the row says {w}x{h}",
                        path=where)
    cats = np.asarray(batch["category_ids"][i], dtype=np.int64).reshape(-1)
    n = cats.size
    boxes = xywh_to_xyxy(batch["boxes"][i])
    iscrowd = np.asarray(batch["iscrowd"][i], dtype=np.uint8).reshape(-1)
    rles = batch["masks"][i] if with_masks and "masks" in batch else []
    if len(boxes) != n or len(iscrowd) != n or len(rles) not in (0, n):
        raise DataError(f"instance columns differ in length: category_ids {n}, boxes "
                        f"{len(boxes)}, iscrowd {len(iscrowd)}, masks {len(rles)}", path=where)
    unknown = sorted({int(c) for c in cats} - set(label_map))
    if unknown:
        raise DataError(f"category ids {unknown} are not in the label map", path=where)
    labels = np.array([label_map[int(c)] for c in cats], dtype=np.int64)
    masks = _decode_masks(rles, h, w, where) if n and len(rles) else None
    return transform(image, boxes, masks, labels, iscrowd, rng=rng)


def _row_rng(seed: int | None, epoch: int, image_id: Any, *stream: int
             ) -> np.random.Generator:
    """An image's generator for an epoch (its jitter, flip and paste subset draws; with
    ``stream``, another sequence of its own, e.g. its partner draw)."""
    return np.random.default_rng(None if seed is None else
                                 [seed, epoch, int(image_id) % 2**63, *stream])


@dataclass
class CopyPasteParams:
    """Simple Copy-Paste between training rows (:func:`draw_partners`, then
    :func:`detection_batch_transform`).

    Attributes:
        prob: Each row's chance to receive objects from another image of the pool.
        blend, sigma, box_thr, area_thr: As :func:`raylab.transforms.copy_paste.copy_paste`.
    """

    prob: float = 1.0
    blend: bool = True
    sigma: float = 1.0
    box_thr: float = 10.0
    area_thr: int = 300


@dataclass
class _Row:
    """A jittered row on its way to the batch: the sample and its per-object columns."""

    image: np.ndarray
    boxes: np.ndarray
    masks: np.ndarray | None
    labels: np.ndarray
    iscrowd: np.ndarray
    ann_ids: np.ndarray
    pasted: np.ndarray
    scale: np.ndarray


#: The columns of a row that travel with it as a paste partner, each prefixed with
#: :data:`PARTNER_PREFIX`; :data:`PARTNER_ID` is -1 for a row that receives no paste.
PARTNER_COLUMNS = ("image_id", "file_name", "image", "width", "height", "ann_ids",
                   "category_ids", "boxes", "iscrowd", "masks")
PARTNER_PREFIX = "partner_"
PARTNER_ID = PARTNER_PREFIX + "image_id"
#: Mixed into a row's partner draw: a stream apart from its jitter's ``[seed, epoch, id]``.
_PARTNER_STREAM = 1


def draw_partners(image_ids: Any, pool_ids: Any, *, prob: float, seed: int | None,
                  epoch: int) -> np.ndarray:
    """For each row, the position in the pool of the image whose objects it receives, or -1.

    Row ``x`` draws from ``default_rng([seed, epoch, x, 1])`` alone: with probability
    ``prob`` it gets a partner uniform over the pool's other images. So the draw depends
    on the row, the epoch and the pool, never on which rows share its batch or block
    (a resumed run replays an epoch's pastes). ``seed=None``: fresh entropy.
    """
    ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
    pool = np.asarray(pool_ids, dtype=np.int64).reshape(-1)
    # Each row's own position in the pool, or -1 when it is not in it.
    own = np.full(len(ids), -1, np.int64)
    if len(pool):
        order = np.argsort(pool, kind="stable")
        at = np.minimum(np.searchsorted(pool[order], ids), len(pool) - 1)
        own = np.where(pool[order[at]] == ids, order[at], -1)
    out = np.full(len(ids), -1, np.int64)
    for r, image_id in enumerate(ids):
        rng = _row_rng(seed, epoch, image_id, _PARTNER_STREAM)
        others = len(pool) - (own[r] >= 0)
        if rng.random() >= prob or others < 1:
            continue
        k = int(rng.integers(others))
        out[r] = k + 1 if 0 <= own[r] <= k else k
    return out


def _partner_ids(idx: np.ndarray, pool_ids: np.ndarray) -> np.ndarray:
    """The partners' image ids (-1: no partner) from their pool positions."""
    if not len(pool_ids):
        return np.full(len(idx), -1, np.int64)
    return np.where(idx >= 0, pool_ids[np.maximum(idx, 0)], -1).astype(np.int64)


def with_partners(batch: Mapping[str, Any], pool: Mapping[str, Any], *, prob: float,
                  seed: int | None, epoch: int | Callable[[], int] = 0) -> dict[str, Any]:
    """``batch`` (numpy columns) plus each row's paste partner drawn from ``pool`` (numpy
    columns, e.g. the whole training split): :data:`PARTNER_ID` and the partner's
    :data:`PARTNER_COLUMNS` under :data:`PARTNER_PREFIX` (see :func:`draw_partners`).
    What :func:`detection_batch_transform` reads to paste; the pyarrow twin for Ray Data
    is :func:`with_partner_table`."""
    if callable(epoch):
        epoch = int(epoch())
    pool_ids = np.asarray(pool["image_id"], np.int64).reshape(-1)
    idx = draw_partners(batch["image_id"], pool_ids, prob=prob, seed=seed, epoch=epoch)
    out = dict(batch)
    for key in PARTNER_COLUMNS[1:]:
        # Rows without a partner carry any pool row (or None): only PARTNER_ID is read.
        out[PARTNER_PREFIX + key] = (np.asarray(pool[key])[np.maximum(idx, 0)]
                                     if len(pool_ids) else np.full(len(idx), None))
    out[PARTNER_ID] = _partner_ids(idx, pool_ids)
    return out


def with_partner_table(rows: Any, pool: Any, *, prob: float, seed: int | None,
                       epoch: int | Callable[[], int] = 0) -> Any:
    """:func:`with_partners` for pyarrow Tables (Ray Data's ``batch_format="pyarrow"``):
    the partner's columns are taken from ``pool`` by Arrow (no copy through Python), null
    for rows without a partner."""
    import pyarrow as pa

    if callable(epoch):
        epoch = int(epoch())
    pool_ids = pool.column("image_id").to_numpy()
    idx = draw_partners(rows.column("image_id").to_numpy(), pool_ids, prob=prob,
                        seed=seed, epoch=epoch)
    picked = pool.select(list(PARTNER_COLUMNS[1:])).take(pa.array(idx, mask=idx < 0))
    for key in PARTNER_COLUMNS[1:]:
        rows = rows.append_column(PARTNER_PREFIX + key, picked.column(key))
    return rows.append_column(PARTNER_ID, pa.array(_partner_ids(idx, pool_ids)))


def _paste_into(dst: _Row, src: _Row, rng: np.random.Generator,
                params: CopyPasteParams) -> _Row:
    """``dst`` with a random subset of ``src``'s objects pasted on (draws from ``rng``);
    crowd flags and annotation ids follow their objects."""
    pasted = paste_objects(_four(dst), _four(src), rng, blend=params.blend,
                           sigma=params.sigma, box_thr=params.box_thr,
                           area_thr=params.area_thr)
    own = ~pasted["pasted"]
    idx = pasted["source"]

    def follow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.concatenate([a[idx[own]], b[idx[~own]]])

    return _Row(image=pasted["image"], boxes=pasted["boxes"],
                masks=pasted["masks"].astype(np.uint8), labels=pasted["labels"],
                iscrowd=follow(dst.iscrowd, src.iscrowd),
                ann_ids=follow(dst.ann_ids, src.ann_ids),
                pasted=pasted["pasted"].astype(np.uint8), scale=dst.scale)


def _jittered_row(batch: Mapping[str, Any], i: int, transform: ScaleJitter | ResizePad,
                  label_map: Mapping[int, int], rng: np.random.Generator,
                  with_masks: bool) -> _Row:
    sample = _transform_row(batch, i, transform, label_map, rng, with_masks)
    size = transform.output_size
    ann_ids = np.asarray(batch["ann_ids"][i], dtype=np.int64).reshape(-1)
    n = len(sample.boxes)
    return _Row(image=sample.image, boxes=sample.boxes.reshape(-1, 4),
                # An image without objects can still receive pasted ones.
                masks=np.zeros((0, size, size), np.uint8) if with_masks and not n
                else sample.masks,
                labels=np.asarray(sample.labels if sample.labels is not None
                                  else np.zeros(0), np.int64),
                iscrowd=np.asarray(sample.iscrowd if sample.iscrowd is not None
                                   else np.zeros(0), np.uint8),
                ann_ids=ann_ids[sample.keep] if ann_ids.size else ann_ids,
                pasted=np.zeros(n, np.uint8),
                scale=np.asarray(sample.geometry.scale, np.float64))


def _four(row: _Row) -> dict[str, np.ndarray]:
    return {"image": row.image, "masks": np.asarray(row.masks, bool),
            "boxes": row.boxes, "labels": row.labels}


def detection_batch_transform(
    batch: dict[str, np.ndarray],
    transform: ScaleJitter | ResizePad,
    *,
    label_map: Mapping[int, int],
    seed: int | None = None,
    epoch: int | Callable[[], int] = 0,
    with_masks: bool = True,
    copy_paste: CopyPasteParams | None = None,
) -> dict[str, np.ndarray]:
    """Decode, jitter and pack a batch of COCO shard rows (Ray Data ``map_batches``).

    Use as ``ds.map_batches(detection_batch_transform, fn_kwargs=dict(transform=...,
    label_map=..., seed=..., epoch=...), batch_format="numpy")``. Each row gets its own
    generator ``default_rng([seed, epoch, image_id])``, so the draws do not depend on how Ray
    splits the data into batches; pass a new ``epoch`` per epoch (or ``seed=None``, fresh
    entropy and not reproducible) to get new draws.

    Args:
        batch: Columns ``image_id``, ``file_name``, ``image`` (encoded bytes), ``width``,
            ``height``, ``ann_ids``, ``category_ids``, ``boxes`` (flattened COCO ``xywh``),
            ``iscrowd`` and ``masks`` (COCO compressed RLE counts per instance).
        transform: :class:`ScaleJitter` (training) or :class:`ResizePad` (evaluation).
        label_map: Category id to label ``1..K`` (:func:`contiguous_label_map`).
        seed: Base seed, or None.
        epoch: Mixed into each row's seed: a number, or a function returning the current
            epoch (read once per batch; e.g. :class:`raylab.runtime.datasets.EpochClock`,
            so that a dataset planned once draws anew each epoch, and the same again in
            a resumed run).
        with_masks: False skips mask decoding (box-only, e.g. for evaluation).
        copy_paste: Simple Copy-Paste: a row whose :data:`PARTNER_ID` is not -1 (the
            columns :func:`with_partners` adds) receives a random subset of the objects
            of its partner, jittered with the partner's own generator (so as the partner
            itself is this epoch); the subset comes from the row's generator after its
            jitter. None: no paste (partner columns, if any, are ignored).

    Returns:
        ``image`` uint8 ``[B, S, S, 3]``; ``image_id`` int64, ``height``/``width`` int32
        (original) and ``scale`` float64 ``[B, 2]`` (``sy, sx``); per row (object arrays of
        1-D arrays): ``boxes`` float32 ``n*4`` ``xyxy``, ``labels`` int64, ``iscrowd`` uint8,
        ``ann_ids`` int64 (a pasted object keeps its source's), ``pasted`` uint8 (1: pasted
        from the partner), ``masks`` uint8 packed bits and ``mask_windows`` int32 ``n*4``
        (:func:`unpack_masks`; empty without masks).

    Raises:
        DataError: A row's image or masks do not decode, its columns disagree, or a
            category id is missing from ``label_map`` (the error names the file).
        ValueError: ``copy_paste`` without the partner columns.
    """
    count = len(batch["image"])
    size = transform.output_size
    if callable(epoch):
        epoch = int(epoch())
    pasting = copy_paste is not None and with_masks
    if pasting and PARTNER_ID not in batch:
        raise ValueError("copy_paste needs each row's partner: attach them first "
                         "(with_partners / with_partner_table)")
    # The partners' columns under the row's own names, for the same row decoder.
    partners = {k: batch[PARTNER_PREFIX + k] for k in PARTNER_COLUMNS} if pasting else {}
    rows: list[_Row] = []
    for i in range(count):
        rng = _row_rng(seed, epoch, batch["image_id"][i])
        row = _jittered_row(batch, i, transform, label_map, rng, with_masks)
        partner_id = int(batch[PARTNER_ID][i]) if pasting else -1
        if partner_id >= 0:
            # The partner jittered with its own draws: the sample it is itself this epoch.
            src = _jittered_row(partners, i, transform, label_map,
                                _row_rng(seed, epoch, partner_id), with_masks)
            row = _paste_into(row, src, rng, copy_paste)
        rows.append(row)
    images = np.empty((count, size, size, 3), np.uint8)
    scale = np.empty((count, 2), np.float64)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in
                                         ("boxes", "labels", "iscrowd", "ann_ids", "pasted",
                                          "masks", "mask_windows")}
    for i, row in enumerate(rows):
        images[i] = row.image
        scale[i] = row.scale
        if row.masks is not None and len(row.masks):
            data, windows = pack_masks(row.masks, row.boxes)
        else:
            data, windows = np.zeros(0, np.uint8), np.zeros((0, 4), np.int32)
        cols["boxes"].append(row.boxes.reshape(-1))
        cols["labels"].append(row.labels)
        cols["iscrowd"].append(row.iscrowd)
        cols["ann_ids"].append(row.ann_ids)
        cols["pasted"].append(row.pasted)
        cols["masks"].append(data)
        cols["mask_windows"].append(windows.reshape(-1))
    return {
        "image": images,
        "image_id": np.asarray(batch["image_id"], dtype=np.int64).reshape(-1),
        "height": np.asarray(batch["height"], dtype=np.int32).reshape(-1),
        "width": np.asarray(batch["width"], dtype=np.int32).reshape(-1),
        "scale": scale,
        **{k: _ragged(v) for k, v in cols.items()},
    }


def to_torchvision_targets(
    batch: Mapping[str, Any],
    device: torch.device | str = "cpu",
    *,
    drop_crowd: bool = True,
    with_masks: bool = True,
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Turn a :func:`detection_batch_transform` batch into torchvision Mask R-CNN inputs.

    Read the batches with ``iter_batches(batch_format="numpy")``: the per-row columns are
    ragged, which ``iter_torch_batches`` cannot collate.

    Images travel as uint8 and become float ``[3, S, S]`` in 0-1 on ``device`` (the model
    normalises). Build the model with ``min_size=max_size=S`` so that its own transform does
    not resize again. torchvision cannot ignore crowd regions, so ``drop_crowd`` (default)
    removes crowd instances from the targets, as detectron2 does for training; evaluation
    ground truth comes from the COCO JSON.

    Returns:
        ``(images, targets)``; each target has ``boxes`` float32 ``[n, 4]`` ``xyxy``,
        ``labels`` int64, ``iscrowd`` int64, ``image_id`` int64 scalar and, with
        ``with_masks``, ``masks`` uint8 ``[n, S, S]``.

    Raises:
        DataError: A row's masks are missing or do not match its boxes.
    """
    x = torch.as_tensor(np.ascontiguousarray(batch["image"])).to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    size = tuple(x.shape[-2:])
    targets = []
    for i in range(x.shape[0]):
        boxes = np.asarray(batch["boxes"][i], dtype=np.float32).reshape(-1, 4)
        keep = np.ones(len(boxes), bool)
        if drop_crowd:
            keep = np.asarray(batch["iscrowd"][i]).reshape(-1) == 0
        t = {
            "boxes": torch.from_numpy(boxes[keep]).to(device),
            "labels": torch.as_tensor(np.asarray(batch["labels"][i], np.int64)[keep],
                                      device=device),
            "iscrowd": torch.as_tensor(np.asarray(batch["iscrowd"][i], np.int64)[keep],
                                       device=device),
            "image_id": torch.as_tensor(int(batch["image_id"][i]), device=device),
        }
        if with_masks:
            windows = np.asarray(batch["mask_windows"][i]).reshape(-1, 4)
            if len(windows) != len(boxes):
                raise DataError(f"row {i} (image_id {int(batch['image_id'][i])}) has "
                                f"{len(windows)} masks for {len(boxes)} boxes")
            masks = unpack_masks(batch["masks"][i], windows, size)
            t["masks"] = masks[torch.from_numpy(keep)].to(device)
        targets.append(t)
    return list(x.unbind(0)), targets
