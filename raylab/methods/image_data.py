"""Image data shared by the image methods: shard lookup, hold-out, decoding in Ray Data.

Driver side only (Ray Data); the per-row transforms themselves are pure torch in
:mod:`raylab.transforms.images` and :mod:`raylab.transforms.multicrop`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raylab.errors import ConfigError, DataError


@dataclass
class ImageData:
    """What the driver knows about the shard folder before Ray starts."""

    class_names: list[str]
    train_paths: list[str]
    eval_paths: list[str]
    train_rows: int
    eval_rows: int


def load_image_data(cfg: Any) -> ImageData:
    """Class names, shard paths and row counts of ``cfg.train_split``/``cfg.eval_split``."""
    from raylab.data import imagefolder
    from raylab.data.shards import read_manifest

    if not cfg.data:
        raise ConfigError("config key 'data': expected the image shard folder (--data DST)")
    manifest = read_manifest(cfg.data, expected_format="imagefolder")
    counts = manifest.get("extra", {}).get("counts", {})
    rows = {split: sum(c.values()) for split, c in counts.items()}
    if cfg.train_split == cfg.eval_split:
        raise ConfigError(f"config keys 'train_split' and 'eval_split' are both "
                          f"{cfg.train_split!r}; evaluate on a different split")
    train_rows = rows.get(cfg.train_split, 0)
    if cfg.max_train_rows:
        train_rows = min(train_rows, cfg.max_train_rows)
    data = ImageData(
        class_names=imagefolder.class_names(cfg.data),
        train_paths=imagefolder.split_paths(cfg.data, cfg.train_split),
        eval_paths=imagefolder.split_paths(cfg.data, cfg.eval_split),
        train_rows=train_rows,
        eval_rows=rows.get(cfg.eval_split, 0),
    )
    if data.train_rows < cfg.optim.batch_size:
        raise DataError(f"split {cfg.train_split!r} has {data.train_rows} rows, fewer than "
                        f"optim.batch_size={cfg.optim.batch_size}", path=cfg.data)
    return data


def _in_val(paths: Any, fraction: float) -> Any:
    """Deterministic hold-out by a stable hash of the path (same on every node)."""
    import zlib

    import numpy as np

    return np.array([(zlib.crc32(str(p).encode()) % 10_000) < fraction * 10_000 for p in paths],
                    dtype=bool)


class HoldOut:
    """Ray Data batch filter: keep (or drop) the validation share of a split."""

    def __init__(self, fraction: float, keep_val: bool) -> None:
        self.fraction = fraction
        self.keep_val = keep_val

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        mask = _in_val(batch["path"], self.fraction)
        if not self.keep_val:
            mask = ~mask
        return {k: v[mask] for k, v in batch.items()}


def encoded_images(paths: list[str], cfg: Any, training: bool, hold_out: bool | None = None,
                   limit: int = 0) -> Any:
    """The encoded rows, streamed from Parquet or held in the object store when small.

    ``limit`` keeps the first rows only (0: all). ``hold_out``: None keeps every row; True
    keeps only the validation share of the split, False drops it (``cfg.val_fraction``).
    """
    from raylab.runtime.datasets import read_shards

    ds = read_shards(paths, ["image", "label", "path"], shuffle_files=training,
                     materialize_mb=cfg.materialize_mb)
    if limit:
        ds = ds.limit(limit)
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
    import importlib

    key = repr((kind, sorted(kwargs.items())))
    if key not in _TRANSFORMS:
        module, name = TRANSFORM_KINDS[kind].split(":")
        _TRANSFORMS[key] = getattr(importlib.import_module(module), name)(**kwargs)
    return _TRANSFORMS[key](batch)
