"""COCO shards for detection: split lookup, hold-out, jittering in Ray Data, batches.

Driver side (before Ray Train starts): :func:`load_detection_data` finds the training and
evaluation shard folders and their category table. Ray Data side: training rows are
decoded and scale-jittered on CPU tasks (:func:`raylab.transforms.detection.
detection_batch_transform`), evaluation rows resized and padded, and both ship uint8
pixels with masks bit-packed. Evaluation rows also carry their original annotations
(compressed RLE masks, COCO boxes), so the worker that runs COCOeval rebuilds the ground
truth of exactly the rows it scored: no shared file, and a row count to check.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylab.data import fs
from raylab.data.coco import coco_manifest
from raylab.data.shards import MANIFEST, iter_rows, shard_paths
from raylab.errors import DataError
from raylab.runtime.datasets import (
    WithTable,
    dataset_from_tables,
    local_tables,
    read_shard,
    read_shards,
    stream_shards,
    without_allocator_if_small_files,
)
from raylab.tasks.classification.data import HoldOut, in_val, row_subset
from raylab.tasks.detection.config import DetectionConfig
from raylab.transforms.detection import ResizePad, ScaleJitter
from raylab.transforms.detection_batch import (
    contiguous_label_map,
    detection_batch_transform,
    with_partner_table,
)

#: Columns of a coco shard the pipelines read.
COLUMNS = ["image_id", "file_name", "image", "width", "height", "ann_ids", "category_ids",
           "boxes", "areas", "iscrowd", "masks"]
#: The original annotations an evaluation row carries to the scoring worker.
GROUND_TRUTH = ("ann_ids", "category_ids", "boxes", "areas", "iscrowd", "masks")
GT_PREFIX = "gt_"
#: Rows per training ``map_batches`` call (decode, jitter, paste, pack).
TRAIN_MAP_BATCH = 8
#: Rows per block of a streamed split before the per-row transforms.
STREAM_BLOCK_ROWS = 4 * TRAIN_MAP_BATCH
#: The hold-out of a Tune trial is drawn by this column's value.
ROW_ID = "image_id"


@dataclass
class DetectionData:
    """What the driver knows about the data before Ray starts."""

    categories: list[dict[str, Any]]
    train_paths: list[str]
    eval_paths: list[str]
    train_rows: int
    eval_rows: int
    train_folder: str
    eval_folder: str
    #: COCO category id -> its count in the training split (``cfg.ap_bins_count``), for
    #: AP by class frequency; every category listed (0 when unseen).
    train_counts: dict[int, int] | None = None
    #: Pseudo-labeled shard files (``cfg.pseudo``): trained on with ``train_paths``, never
    #: held out or scored.
    pseudo_paths: list[str] = field(default_factory=list)
    pseudo_rows: int = 0

    @property
    def label_map(self) -> dict[int, int]:
        """COCO category id -> the detector's label 1..K (0 is the background)."""
        return contiguous_label_map(c["id"] for c in self.categories)

    @property
    def num_classes(self) -> int:
        """Categories + the background, as torchvision's heads count them."""
        return len(self.categories) + 1

    @property
    def class_names(self) -> list[str]:
        names = {c["id"]: c["name"] for c in self.categories}
        return [names[cid] for cid in sorted(names)]


def split_folder(cfg: DetectionConfig, split: str) -> str:
    """``<data>/<split>``: a coco shard folder (``raylab data convert coco``), a path or a
    store URI."""
    return fs.join(cfg.data, split)


def load_detection_data(cfg: DetectionConfig) -> DetectionData:
    """The training and evaluation splits of ``cfg.data``.

    Raises:
        DataError: ``cfg.data`` lacks a split folder, a split is not a coco shard folder,
            or the two splits' category tables differ.
    """
    root = cfg.data
    manifests = {}
    for split in (cfg.train_split, cfg.eval_split):
        folder = split_folder(cfg, split)
        if fs.kind(fs.join(folder, MANIFEST)) != "file":
            found = [name for name in fs.list_dirs(root)
                     if fs.kind(fs.join(fs.join(root, name), MANIFEST)) == "file"]
            raise DataError(f"no coco shard folder for split {split!r}: expected "
                            f"{folder}/{MANIFEST} (convert each split with `raylab data "
                            f"convert coco IMAGES ANNOTATIONS.json {folder}`); found "
                            f"{found or 'none'}", path=root)
        manifests[split] = coco_manifest(folder)
    train, evaluate = manifests[cfg.train_split], manifests[cfg.eval_split]
    categories = train["extra"]["categories"]
    if _ids_names(categories) != _ids_names(evaluate["extra"]["categories"]):
        raise DataError(f"the category tables of splits {cfg.train_split!r} and "
                        f"{cfg.eval_split!r} differ; convert both with the same categories",
                        path=fs.join(split_folder(cfg, cfg.eval_split), MANIFEST))
    pseudo_paths, pseudo_rows = _pseudo(cfg, categories)
    return DetectionData(
        pseudo_paths=pseudo_paths, pseudo_rows=pseudo_rows,
        categories=[dict(c) for c in categories],
        train_paths=shard_paths(split_folder(cfg, cfg.train_split)),
        eval_paths=shard_paths(split_folder(cfg, cfg.eval_split)),
        train_rows=int(train["rows"]),
        eval_rows=int(evaluate["rows"]),
        train_folder=str(split_folder(cfg, cfg.train_split)),
        eval_folder=str(split_folder(cfg, cfg.eval_split)),
        train_counts=category_counts(shard_paths(split_folder(cfg, cfg.train_split)),
                                     [int(c["id"]) for c in categories], cfg.ap_bins_count)
        if cfg.ap_by_frequency else None,
    )


def _pseudo(cfg: DetectionConfig, categories: list[dict[str, Any]]) -> tuple[list[str], int]:
    """The pseudo-labeled shard files and rows of ``cfg.pseudo`` (none when unset).

    Raises:
        DataError: Not a coco shard folder, or its categories differ from the data's.
    """
    if not cfg.pseudo:
        return [], 0
    manifest = coco_manifest(cfg.pseudo)
    if _ids_names(manifest["extra"]["categories"]) != _ids_names(categories):
        raise DataError(f"the pseudo-labels' categories differ from those of split "
                        f"{cfg.train_split!r}; label with a model trained on this data",
                        path=fs.join(cfg.pseudo, MANIFEST))
    return shard_paths(cfg.pseudo), int(manifest["rows"])


def category_counts(paths: list[str], category_ids: list[int], count: str = "instances"
                    ) -> dict[int, int]:
    """Per category, its non-crowd annotations (``instances``) or the images holding one
    (``images``) in the shards ``paths``: two list columns read, no pixels.

    Raises:
        DataError: A shard without the ``category_ids`` / ``iscrowd`` columns.
    """
    counts = dict.fromkeys(category_ids, 0)
    for path in paths:
        try:
            table = pq.read_table(path, columns=["category_ids", "iscrowd"])
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"cannot read category_ids/iscrowd ({exc}); expected a coco "
                            "shard", path=path) from None
        for cats, crowd in zip(table.column("category_ids").to_pylist(),
                               table.column("iscrowd").to_pylist(), strict=True):
            found = [int(c) for c, z in zip(cats or [], crowd or [], strict=True) if not z]
            for c in (set(found) if count == "images" else found):
                counts[c] = counts.get(c, 0) + 1
    return counts


def _ids_names(categories: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return sorted((int(c["id"]), str(c["name"])) for c in categories)


def row_ids(paths: list[str]) -> list[int]:
    """The image ids of the shard files ``paths``, in order (reads that column only)."""
    ids: list[int] = []
    for path in paths:
        ids += pq.read_table(path, columns=[ROW_ID]).column(ROW_ID).to_pylist()
    return ids


def holdout_ids(paths: list[str], fraction: float) -> list[int]:
    """The image ids of the validation hold-out (what a Tune trial scores)."""
    ids = row_ids(paths)
    if fraction <= 0:
        return []
    return [i for i, keep in zip(ids, in_val(ids, fraction)) if keep]


def train_transform(cfg: DetectionConfig) -> ScaleJitter | ResizePad:
    """Large- or standard-scale jittering at ``image_size`` (or a plain resize + pad)."""
    a = cfg.aug
    if a.jitter == "none":
        return ResizePad(cfg.image_size)
    return ScaleJitter(cfg.image_size, scale_range=a.scale(), flip_prob=a.flip)


def train_dataset(paths: list[str], cfg: DetectionConfig, label_map: dict[int, int],
                  hold_out: bool | None = None,
                  epoch: Callable[[], int] | None = None,
                  labeled: list[str] | None = None) -> Any:
    """Training rows, jittered anew in every epoch, with Simple Copy-Paste when
    ``aug.copy_paste.prob``.

    ``hold_out``: None keeps every row; False drops the validation share (a Tune trial).
    ``epoch``: the run's epoch clock (:class:`raylab.runtime.datasets.EpochClock`): each
    image's jitter, flip, paste partner and paste draws come from ``(cfg.seed, epoch,
    image id)``, so a resumed run makes every image of an epoch as the uninterrupted run
    did. Without a clock, fresh entropy.
    ``labeled``: the files of ``paths`` with ground truth (default: all). Only their
    objects are pasted, onto labeled and pseudo-labeled images alike, and only their
    rows are held out (pseudo-labels are never scored).

    A row's partner is drawn among the training rows of the sources: all of them when
    the split is held in the object store (``materialize_mb``), those of its own shard
    file when streamed (a pseudo-labeled file draws a labeled file per epoch): the read
    task holds that file, while the whole split is not held anywhere.
    """
    sources = list(paths if labeled is None else labeled)
    select = TrainRows(cfg, paths, hold_out, sources)
    params = cfg.aug.copy_paste.params()
    partners = None if params is None else Partners(
        prob=params.prob, seed=None if epoch is None else cfg.seed,
        epoch=0 if epoch is None else epoch)
    tables = local_tables(paths, COLUMNS, cfg.materialize_mb)
    if tables is not None:
        tables = [select(table, path) for table, path in zip(tables, paths)]
        ds = dataset_from_tables(tables, shuffle_files=True)
        if partners is not None:
            pool = [t for t, path in zip(tables, paths) if path in select.labeled]
            ds = ds.map_batches(WithTable(partners, pa.concat_tables(pool) if pool
                                          else tables[0].slice(0, 0)),
                                batch_format="pyarrow", batch_size=None)
    else:
        ds = stream_shards(paths, COLUMNS, shuffle_files=True,
                           rows_per_block=STREAM_BLOCK_ROWS,
                           per_file=StreamedTrainFile(select, partners, sources))
    ds = ds.map_batches(detection_batch_transform, fn_kwargs=dict(
        transform=train_transform(cfg), label_map=label_map,
        seed=None if epoch is None else cfg.seed, epoch=0 if epoch is None else epoch,
        copy_paste=params),
        batch_format="numpy", batch_size=TRAIN_MAP_BATCH)
    # What a row puts in the object store: its uint8 pixels (masks go bit-packed, far
    # smaller).
    return without_allocator_if_small_files(ds, paths, cfg.image_size ** 2 * 3)


class TrainRows:
    """A shard file's training rows (a pyarrow Table in, its kept rows out): the fixed,
    seeded subset of ``max_train_rows`` and, in the ``labeled`` files, the hold-out, as
    Arrow filters. Applied where the file is read, so that a row's paste partner is drawn
    among training rows only (a validation image never pastes into training)."""

    def __init__(self, cfg: DetectionConfig, paths: list[str], hold_out: bool | None,
                 labeled: list[str]) -> None:
        self.subset = (np.asarray(row_subset(row_ids(paths), cfg.max_train_rows, cfg.seed),
                                  np.int64) if cfg.max_train_rows else None)
        self.val_fraction = cfg.val_fraction if hold_out is not None else 0.0
        self.keep_val = bool(hold_out)
        self.labeled = set(labeled)

    def __call__(self, table: Any, path: str) -> Any:
        ids = table.column(ROW_ID).to_numpy()
        keep = np.ones(len(ids), bool)
        if self.subset is not None:
            keep &= np.isin(ids, self.subset)
        if self.val_fraction > 0 and path in self.labeled:
            val = in_val(ids, self.val_fraction)
            keep &= val if self.keep_val else ~val
        return table if keep.all() else table.filter(pa.array(keep))


@dataclass
class Partners:
    """Each row's paste partner drawn from a pool of rows (both pyarrow Tables), for the
    epoch the clock reads (:func:`raylab.transforms.detection_batch.with_partner_table`)."""

    prob: float
    seed: int | None
    epoch: int | Callable[[], int]

    def now(self) -> int:
        return int(self.epoch()) if callable(self.epoch) else int(self.epoch)

    def __call__(self, rows: Any, pool: Any, epoch: int | None = None) -> Any:
        return with_partner_table(rows, pool, prob=self.prob, seed=self.seed,
                                  epoch=self.now() if epoch is None else epoch)


@dataclass
class StreamedTrainFile:
    """In a streamed split's read task: a file's training rows and, when pasting, each
    row's partner among the training rows of that file, or, for a file that is not a
    paste source (pseudo-labels), of a source file drawn per epoch and file."""

    select: TrainRows
    partners: Partners | None
    sources: list[str]

    def __call__(self, table: Any, path: str) -> Any:
        rows = self.select(table, path)
        if self.partners is None:
            return rows
        epoch = self.partners.now()
        if path in self.select.labeled:
            pool = rows
        elif not self.sources:
            pool = rows.slice(0, 0)
        else:
            seed = self.partners.seed
            rng = np.random.default_rng(None if seed is None else
                                        [seed, epoch, zlib.crc32(path.encode())])
            source = self.sources[int(rng.integers(len(self.sources)))]
            pool = self.select(read_shard(source, COLUMNS), source)
        return self.partners(rows, pool, epoch)


def eval_dataset(paths: list[str], cfg: DetectionConfig, label_map: dict[int, int],
                 hold_out: bool | None = None) -> Any:
    """Evaluation rows resized + padded to ``image_size``, with their ground truth
    (``hold_out=True``: only the validation share, what a Tune trial scores)."""
    ds = read_shards(paths, COLUMNS, shuffle_files=False,
                     materialize_mb=cfg.materialize_mb, rows_per_block=STREAM_BLOCK_ROWS)
    if hold_out is not None and cfg.val_fraction > 0:
        ds = ds.map_batches(HoldOut(cfg.val_fraction, keep_val=hold_out, column=ROW_ID),
                            batch_format="numpy")
    return ds.map_batches(eval_batch, fn_kwargs=dict(
        transform=ResizePad(cfg.image_size), label_map=label_map),
        batch_format="numpy", batch_size=8)


def eval_batch(batch: dict[str, np.ndarray], transform: ResizePad,
               label_map: dict[int, int]) -> dict[str, np.ndarray]:
    """Ray Data task: resize + pad the images (no masks needed to predict) and keep each
    row's original annotations under ``gt_*`` for COCOeval."""
    out = detection_batch_transform(batch, transform, label_map=label_map, with_masks=False)
    for key in GROUND_TRUTH:
        out[GT_PREFIX + key] = batch[key]
    return out


def read_batch(folder: str | Path, limit: int | None = None) -> dict[str, np.ndarray]:
    """Every row (or the first ``limit``) of a coco shard folder as one numpy batch, as Ray
    Data hands a ``map_batches`` function (per-row lists as object arrays): for plain loops,
    reports and tests."""
    rows = list(itertools.islice(iter_rows(folder, columns=COLUMNS), limit))
    batch = {k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1] for k in COLUMNS}
    for k in ("image_id", "width", "height"):
        batch[k] = batch[k].astype(np.int64)
    return batch


def keep_numpy(batch: dict[str, Any]) -> dict[str, Any]:
    """The collate function of detection batches: per-row arrays stay numpy (a row's
    boxes and masks differ in count from the next row's); the task moves them to its
    device with :func:`raylab.transforms.detection.to_torchvision_targets`."""
    return batch
