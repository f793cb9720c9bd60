"""Image data shared by the image methods: shard lookup, hold-out, decoding in Ray Data.

Driver side: it builds Ray Data pipelines through :mod:`raylab.runtime.datasets`; the
per-row transforms themselves are pure torch in :mod:`raylab.transforms.images` and
:mod:`raylab.transforms.multicrop`.
"""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from raylab.data import fs, imagefolder
from raylab.data.clear import is_stream, read_stream_manifest
from raylab.data.shards import read_manifest, shard_paths
from raylab.errors import ConfigError, DataError
from raylab.runtime.datasets import (
    keep_rows,
    read_shards,
    without_allocator_if_small_files,
)
from raylab.tasks.classification.config import ClassificationConfig, ImageDataConfig


@dataclass
class ImageData:
    """What the driver knows about the data before Ray starts.

    ``knn_paths``/``knn_rows``: the labelled split that forms the k-NN bank and the linear
    probe's training set (DINO's ``knn_split``); left empty they are the train split's.
    """

    class_names: list[str]
    train_paths: list[str]
    eval_paths: list[str]
    train_rows: int
    eval_rows: int
    knn_paths: list[str] = field(default_factory=list)
    knn_rows: int = -1

    def __post_init__(self) -> None:
        if not self.knn_paths:
            self.knn_paths = list(self.train_paths)
            if self.knn_rows < 0:
                self.knn_rows = self.train_rows


@dataclass
class _Splits:
    """The splits of one dataset: shard paths, row counts, which are unlabeled."""

    kind: str
    names: list[str]
    class_names: list[str]
    rows: dict[str, int]
    unlabeled: set[str]
    #: Split name -> its absolute shard paths (read when called).
    paths: Callable[[str], list[str]]


def knn_split_name(cfg: Any) -> str:
    """The split of the k-NN bank / linear probe: ``cfg.knn_split``, else ``train_split``."""
    return getattr(cfg, "knn_split", "") or cfg.train_split


def _imagefolder_splits(dst: str) -> _Splits:
    manifest = read_manifest(dst, expected_format=imagefolder.FORMAT)
    extra = manifest.get("extra") or {}
    counts = extra.get("counts") or {}
    names = list(extra.get("split_shards") or counts)
    return _Splits(
        kind="image shard folder", names=names, class_names=imagefolder.class_names(dst),
        rows={split: sum(counts.get(split, {}).values()) for split in names}, unlabeled=set(),
        paths=lambda split: imagefolder.split_paths(dst, split))


def _stream_splits(dst: str) -> _Splits:
    """A CLEAR stream: one split per bucket, named by its shard folder (``bucket_00``)."""
    manifest = read_stream_manifest(dst)  # checks every bucket's shard folder once
    folders = {b: manifest["bucket_dirs"][str(b)] for b in manifest["buckets"]}
    unlabeled = set(manifest["unlabeled_buckets"])
    return _Splits(
        kind="CLEAR stream", names=list(folders.values()),
        class_names=list(manifest["class_names"]),
        rows={name: int(manifest["bucket_rows"][str(b)]) for b, name in folders.items()},
        unlabeled={name for b, name in folders.items() if b in unlabeled},
        paths=lambda split: shard_paths(fs.join(dst, split)))


def _check_split(splits: _Splits, key: str, value: str) -> None:
    if value not in splits.names:
        raise ConfigError(f"config key {key!r}: {value!r} is not a split of this "
                          f"{splits.kind}; available: {', '.join(splits.names) or 'none'}")


def load_image_data(cfg: Any) -> ImageData:
    """Class names, shard paths and row counts of the train, eval and k-NN splits.

    ``cfg.data`` is an ImageFolder shard folder (splits such as ``train``/``test``) or a
    CLEAR stream folder (one split per bucket, named by its shard folder: ``bucket_00``,
    ``bucket_01``, ...). The eval split and the k-NN bank split (``cfg.knn_split`` where
    the config has one, else the train split) must be labelled; the train split may be an
    unlabeled bucket only when a labelled ``knn_split`` is set.

    Raises:
        ConfigError: No data, an unknown split name (the message lists the available
            ones), the train and eval splits or the k-NN and eval splits coincide, or a
            split that needs labels is unlabeled.
        DataError: The data folder is malformed, or the train split has fewer rows than
            ``optim.batch_size``.
    """
    if not cfg.data:
        raise ConfigError("config key 'data': expected the image shard folder or CLEAR "
                          "stream folder (--data DST)")
    splits = _stream_splits(cfg.data) if is_stream(cfg.data) else _imagefolder_splits(cfg.data)
    has_knn = hasattr(cfg, "knn_split")
    knn = knn_split_name(cfg)
    _check_split(splits, "train_split", cfg.train_split)
    _check_split(splits, "eval_split", cfg.eval_split)
    if has_knn and cfg.knn_split:
        _check_split(splits, "knn_split", cfg.knn_split)
    if cfg.train_split == cfg.eval_split:
        raise ConfigError(f"config keys 'train_split' and 'eval_split' are both "
                          f"{cfg.train_split!r}; evaluate on a different split")
    if knn == cfg.eval_split:
        raise ConfigError(f"config keys 'knn_split' and 'eval_split' are both {knn!r}; the "
                          "k-NN bank and linear probe must not train on the eval split")
    if cfg.eval_split in splits.unlabeled:
        raise ConfigError(f"config key 'eval_split': {cfg.eval_split!r} is unlabeled; "
                          f"choose a labelled split, e.g. "
                          f"{_labelled_example(splits, cfg.train_split)}")
    if knn in splits.unlabeled:
        if not has_knn:
            raise ConfigError(f"config key 'train_split': {knn!r} is unlabeled; choose a "
                              f"labelled split, e.g. {_labelled_example(splits, cfg.eval_split)}")
        if cfg.knn_split:
            raise ConfigError(f"config key 'knn_split': {knn!r} is unlabeled; the k-NN bank "
                              "and linear probe need labels, choose a labelled split, e.g. "
                              f"{_labelled_example(splits, cfg.eval_split)}")
        raise ConfigError(f"config key 'knn_split': the train split {knn!r} is unlabeled, "
                          "so it cannot be the k-NN bank / linear-probe set; set knn_split "
                          "to a labelled split, e.g. --set knn_split="
                          f"{_labelled_example(splits, cfg.eval_split)}")
    train_rows = splits.rows[cfg.train_split]
    if cfg.max_train_rows:
        train_rows = min(train_rows, cfg.max_train_rows)
    paths = {name: splits.paths(name) for name in {cfg.train_split, cfg.eval_split, knn}}
    data = ImageData(
        class_names=splits.class_names,
        train_paths=paths[cfg.train_split],
        eval_paths=paths[cfg.eval_split],
        train_rows=train_rows,
        eval_rows=splits.rows[cfg.eval_split],
        knn_paths=paths[knn],
        # The k-NN bank is the first max_train_rows rows when it is the train split.
        knn_rows=train_rows if knn == cfg.train_split else splits.rows[knn],
    )
    if data.train_rows < cfg.optim.batch_size:
        raise DataError(f"split {cfg.train_split!r} has {data.train_rows} rows, fewer than "
                        f"optim.batch_size={cfg.optim.batch_size}", path=cfg.data)
    return data


def _labelled_example(splits: _Splits, avoid: str) -> str:
    """A labelled split other than ``avoid`` to suggest in a message."""
    labelled = [s for s in splits.names if s not in splits.unlabeled]
    return next((s for s in labelled if s != avoid), labelled[0] if labelled else "none")


def in_val(paths: Any, fraction: float) -> Any:
    """Deterministic hold-out by a stable hash of the path (same on every node)."""
    return np.array([(zlib.crc32(str(p).encode()) % 10_000) < fraction * 10_000 for p in paths],
                    dtype=bool)


class HoldOut:
    """Ray Data batch filter: keep (or drop) the validation share of a split."""

    def __init__(self, fraction: float, keep_val: bool, column: str = "path") -> None:
        self.fraction = fraction
        self.keep_val = keep_val
        self.column = column  # the row's identity: an image path, a COCO image id

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        mask = in_val(batch[self.column], self.fraction)
        if not self.keep_val:
            mask = ~mask
        return {k: v[mask] for k, v in batch.items()}


def row_paths(paths: list[str]) -> list[str]:
    """The image paths (the rows' identities) of the shard files ``paths``, in order
    (reads their ``path`` column only)."""
    names: list[str] = []
    for path in paths:
        names += pq.read_table(path, columns=["path"]).column("path").to_pylist()
    return names


def holdout_paths(paths: list[str], fraction: float) -> list[str]:
    """The image paths of the shard files ``paths`` in the validation hold-out of
    :class:`HoldOut` (what a Tune trial scores)."""
    names = row_paths(paths)
    return [n for n, keep in zip(names, in_val(names, fraction)) if keep] if fraction > 0 \
        else []


def holdout_rows(paths: list[str], fraction: float) -> int:
    """How many rows of the shard files ``paths`` fall in the validation hold-out."""
    return len(holdout_paths(paths, fraction))


def row_subset(values: list[Any], count: int, seed: int) -> list[Any]:
    """A fixed, seeded choice of ``count`` of ``values`` (all when fewer), in their order:
    the same rows in every epoch and in every dataset built from the same files and seed
    (e.g. DINO's training rows and its k-NN bank)."""
    if count >= len(values):
        return list(values)
    rng = np.random.default_rng([int(seed), len(values), count])
    return [values[i] for i in np.sort(rng.choice(len(values), size=count, replace=False))]


#: Rows per block of a streamed split before decoding (a few map batches of small images).
STREAM_BLOCK_ROWS = 512


def encoded_images(paths: list[str], cfg: ImageDataConfig, training: bool,
                   hold_out: bool | None = None, limit: int = 0) -> Any:
    """The encoded rows, streamed from Parquet or held in the object store when small.

    ``limit`` keeps a fixed, seeded subset of that many rows (``cfg.seed``; 0: all), the
    same in every epoch: the first rows after a random block order would differ per epoch.
    ``hold_out``: None keeps every row; True keeps only the validation share of the split,
    False drops it (``cfg.val_fraction``).
    """
    # Streamed, files arrive in blocks of STREAM_BLOCK_ROWS so that decoding and
    # augmentation spread over tasks however few the files are (runtime.datasets).
    ds = read_shards(paths, ["image", "label", "path"], shuffle_files=training,
                     materialize_mb=cfg.materialize_mb, rows_per_block=STREAM_BLOCK_ROWS)
    if limit:
        ds = keep_rows(ds, "path", row_subset(row_paths(paths), limit,
                                              getattr(cfg, "seed", 0)))
    if hold_out is not None and cfg.val_fraction > 0:
        ds = ds.map_batches(HoldOut(cfg.val_fraction, keep_val=hold_out), batch_format="numpy")
    return ds


_TRANSFORMS: dict[str, Any] = {}


#: Batch transforms by name: Ray Data tasks receive the name (plain data) and build the
#: transform in the worker process.
TRANSFORM_KINDS = {
    "classify": "raylab.transforms.images:ImageBatchTransform",
    "multicrop": "raylab.transforms.multicrop:MultiCropBatch",
}


def transform_batch(batch: dict[str, Any], kind: str = "classify", **kwargs: Any
                    ) -> dict[str, Any]:
    """Ray Data task: decode + transform one batch.

    A plain function (not a callable class) so Ray Data runs it as tasks, which spread
    over every CPU node and need no actor pool; the timm transform is built once per
    worker process and cached.
    """
    key = repr((kind, sorted(kwargs.items())))
    if key not in _TRANSFORMS:
        module, name = TRANSFORM_KINDS[kind].split(":")
        _TRANSFORMS[key] = getattr(importlib.import_module(module), name)(**kwargs)
    return _TRANSFORMS[key](batch)


def image_dataset(paths: list[str], cfg: ClassificationConfig, training: bool,
                  hold_out: bool | None = None, limit: int = 0) -> Any:
    """Decode + augment on CPU in Ray Data; workers receive pixel tensors and labels.

    ``hold_out``: None keeps every row; True keeps only the validation share of the split,
    False drops it (see ``val_fraction``).
    """
    ds = encoded_images(paths, cfg, training, hold_out, limit)
    kwargs = cfg.aug.transform_kwargs() if training else {}
    if cfg.loader_dtype == "uint8":
        kwargs.pop("re_prob", None)  # random erasing happens on the worker's device
    ds = ds.map_batches(transform_batch, fn_kwargs=dict(
        is_training=training, input_size=cfg.input_size, out_dtype=cfg.loader_dtype,
        **kwargs), batch_format="numpy", batch_size=64)
    pixel_bytes = 1 if cfg.loader_dtype == "uint8" else 4
    return without_allocator_if_small_files(ds, paths, cfg.input_size ** 2 * 3 * pixel_bytes)
