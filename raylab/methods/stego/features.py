"""STEGO's frozen features, computed once as a Ray Data batch-inference job and cached.

The backbone is frozen and STEGO trains on fixed crops (the reference has no training-time
augmentation besides its five-crop dataset), so each image's feature map is the same in
every epoch: it is computed once, by an actor pool that holds one backbone per actor (a
GPU each when the run has GPUs), and stored beside the shards with each training image's
nearest neighbours by global feature. Every later run (and every Tune trial) with the same
backbone and input size reads the cache; training then costs only the head.

Cache folder ``<feature_cache>/<key>/`` (``key`` hashes the backbone's weights file, the
weights used, the input size and the data's manifest), written atomically::

    shards/manifest.json  format "stego_features": feature shape, splits, rows, backbone
    shards/part-*.parquet index, split, path, feats (float16 C x h x w), label (uint8 S x S)
    knn_<train>.npy     (rows, knn_k) int32: each training row's neighbours, nearest first
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from raylab.data import fs, segmentation
from raylab.data.shards import MANIFEST, output_folder, read_manifest, write_shards
from raylab.engine.checkpoint import load_meta
from raylab.errors import CheckpointError, ConfigError, DataError
from raylab.models.backbones import load_backbone
from raylab.models.stego import global_features, knn_indices, patch_features
from raylab.transforms.images import decode_image, normalize_on_device

FORMAT = "stego_features"
#: Bumped when the cache's contents change meaning (old caches are then not reused).
CACHE_VERSION = 1
#: The cache's shard folder (beside it: the neighbour lists).
SHARDS = "shards"


def backbone_input_size(checkpoint: str, img_size: int) -> int:
    """``img_size``, or the DINO run's own when 0."""
    if img_size:
        return img_size
    config = load_meta(checkpoint).get("config") or {}
    if "img_size" not in config:
        raise CheckpointError(f"{checkpoint}: meta.json's config has no img_size; set "
                              "img_size")
    return int(config["img_size"])


def cache_key(checkpoint: str, which: str, img_size: int, knn_k: int, data: str) -> str:
    """A short hash of what the cached features depend on."""
    weights = Path(checkpoint) / "state.pt"
    stat = weights.stat() if weights.exists() else None
    manifest = fs.join(data, MANIFEST)
    parts = {
        "version": CACHE_VERSION,
        "weights": str(weights.resolve()),
        "weights_stat": [stat.st_size, stat.st_mtime_ns] if stat else None,
        "which": which, "img_size": img_size, "knn_k": knn_k,
        "data": (hashlib.sha1(fs.read_bytes(manifest)).hexdigest()
                 if fs.kind(manifest) == "file" else ""),
    }
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def source_of(path: str) -> str:
    """The source image of a shard row's path (a five-crop row's ends in ``#crop<i>``)."""
    return str(path).split("#")[0]


def square_crop(img: Image.Image, size: int, resample: int) -> Image.Image:
    """Resize the shorter side to ``size``, then cut the centre ``size`` x ``size``."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


class FeatureExtractor:
    """One Ray Data actor of the feature job: decodes, crops and embeds a batch.

    Args:
        checkpoint: The DINO run's checkpoint folder.
        which: ``teacher`` or ``student`` weights.
        img_size: The square input size.
    """

    def __init__(self, checkpoint: str, which: str, img_size: int) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.backbone = load_backbone(checkpoint, which).to(self.device)
        self.img_size = img_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        size = self.img_size
        images, labels = [], []
        for data, mask, path in zip(batch["image"], batch["mask"], batch["path"]):
            img = square_crop(decode_image(data, str(path)), size, Image.BILINEAR)
            images.append(np.asarray(img))
            label = Image.fromarray(segmentation.decode_mask(mask))
            labels.append(np.asarray(square_crop(label, size, Image.NEAREST)))
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(self.device)
        with torch.no_grad():
            fmap = patch_features(self.backbone, normalize_on_device(x))
            keys = global_features(fmap)
        fmap = fmap.half().cpu().numpy()
        return {
            "path": np.asarray(batch["path"]),
            "split": np.asarray(batch["split"]),
            # Five crops of one image share their source: a hold-out keeps them together.
            "source": np.array([source_of(p) for p in batch["path"]], dtype=object),
            "feats": np.array([f.tobytes() for f in fmap], dtype=object),
            "shape": np.array([list(f.shape) for f in fmap], dtype=np.int32),
            "label": np.array([lab.tobytes() for lab in labels], dtype=object),
            "key": keys.float().cpu().numpy(),
        }


@dataclass
class FeatureCache:
    """A written cache: its folder, feature shape and rows per split."""

    folder: Path
    shape: tuple[int, int, int]
    img_size: int
    rows: dict[str, int]
    knn_k: int

    def paths(self, split: str) -> list[str]:
        """The shard files holding ``split``'s rows."""
        manifest = read_manifest(self.folder / SHARDS, expected_format=FORMAT)
        files = manifest["extra"]["split_shards"].get(split, [])
        return [str(self.folder / SHARDS / name) for name in files]

    def knn(self, split: str) -> np.ndarray:
        return np.load(self.folder / f"knn_{split}.npy")

    @classmethod
    def open(cls, folder: Path) -> FeatureCache:
        extra = read_manifest(folder / SHARDS, expected_format=FORMAT)["extra"]
        return cls(folder, tuple(extra["feature_shape"]), int(extra["img_size"]),
                   {k: int(v) for k, v in extra["rows"].items()}, int(extra["knn_k"]))


def cache_folder(cfg: Any) -> Path:
    """Where ``cfg``'s features are (or will be) cached."""
    size = backbone_input_size(cfg.backbone, cfg.img_size)
    if fs.is_uri(cfg.data) and not cfg.feature_cache:
        raise ConfigError(f"config key 'feature_cache': the features are cached beside the "
                          f"data by default, and {cfg.data} is in object storage; expected a "
                          f"local folder for the cache")
    root = Path(cfg.feature_cache) if cfg.feature_cache else Path(cfg.data) / "stego"
    return root / cache_key(cfg.backbone, cfg.backbone_weights, size, cfg.knn_k, cfg.data)


def _split_tables(batches: Iterator[dict[str, np.ndarray]], keys: dict[str, list[np.ndarray]],
                  shape: list[tuple[int, ...]]) -> Iterator[pa.Table]:
    """The job's output batches (in input order) as one table per split and batch, each
    row with its running ``index`` within its split; collects the global features
    (``keys``) and the feature shape on the way."""
    starts = dict.fromkeys(keys, 0)
    for b in batches:
        if not shape:
            shape.append(tuple(int(v) for v in b["shape"][0]))
        splits = np.asarray(b["split"]).astype(str)
        for split in dict.fromkeys(splits.tolist()):  # in order of appearance
            take = splits == split
            n = int(take.sum())
            keys[split].append(b["key"][take])
            yield pa.table({
                "index": pa.array(np.arange(starts[split], starts[split] + n, dtype=np.int64)),
                "split": pa.array([split] * n),
                "path": pa.array([str(p) for p in b["path"][take]]),
                "source": pa.array([str(p) for p in b["source"][take]]),
                "feats": pa.array(list(b["feats"][take]), type=pa.binary()),
                "label": pa.array(list(b["label"][take]), type=pa.binary()),
            })
            starts[split] += n


def build_cache(cfg: Any, splits: list[str], gpus_per_actor: float = 0.0) -> FeatureCache:
    """Run the feature job over ``splits`` (the first one gets neighbour lists) unless the
    cache exists; returns it. Two runs building the same cache at once both finish: the
    first one's folder is kept."""
    from raylab.runtime.datasets import map_with_actors, read_shards

    folder = cache_folder(cfg)
    if (folder / SHARDS / MANIFEST).exists():
        return FeatureCache.open(folder)
    size = backbone_input_size(cfg.backbone, cfg.img_size)
    load_backbone(cfg.backbone, cfg.backbone_weights)  # a bad checkpoint fails here, once
    keys: dict[str, list[np.ndarray]] = {s: [] for s in splits}
    shape: list[tuple[int, ...]] = []

    def tables() -> Iterator[pa.Table]:
        # One job over every split (one actor pool start-up), in input order so that each
        # split's rows arrive together.
        paths = [p for split in splits for p in segmentation.split_paths(cfg.data, split)]
        ds = read_shards(paths, ["image", "mask", "path", "split"], shuffle_files=False,
                         materialize_mb=0)
        ds = map_with_actors(
            ds, FeatureExtractor, batch_size=cfg.feature_batch, actors=cfg.feature_actors,
            gpus_per_actor=gpus_per_actor, preserve_order=True,
            constructor_kwargs={"checkpoint": cfg.backbone, "which": cfg.backbone_weights,
                                "img_size": size})
        yield from _split_tables(ds.iter_batches(batch_size=None, batch_format="numpy"),
                                 keys, shape)

    try:
        with output_folder(folder, overwrite=False) as tmp:

            def extra(shards: list[dict[str, Any]]) -> dict[str, Any]:
                # Called once every table is written: the neighbour lists need every key.
                rows = {s: int(sum(len(k) for k in keys[s])) for s in splits}
                train = splits[0]
                k = min(cfg.knn_k, rows[train] - 1)
                if k < 1:
                    raise DataError(f"split {train!r} has {rows[train]} image(s); STEGO's "
                                    "KNN pairs need at least 2", path=cfg.data)
                neighbours = knn_indices(torch.from_numpy(np.concatenate(keys[train])), k)
                np.save(tmp / f"knn_{train}.npy", neighbours.numpy().astype(np.int32))
                by_split: dict[str, list[str]] = {}
                for entry in shards:
                    by_split.setdefault(entry["group"], []).append(entry["file"])
                return {"feature_shape": list(shape[0]), "img_size": size, "rows": rows,
                        "knn_k": k, "split_shards": by_split, "backbone": cfg.backbone,
                        "backbone_weights": cfg.backbone_weights}

            write_shards(tables(), tmp / SHARDS, format=FORMAT, extra=extra,
                         rows_per_shard=512, group_by="split")
    except (DataError, OSError):
        if (folder / SHARDS / MANIFEST).exists():  # another run published it first
            return FeatureCache.open(folder)
        raise
    return FeatureCache.open(folder)


def decode_batch(batch: dict[str, np.ndarray], shape: list[int], size: int
                 ) -> dict[str, np.ndarray]:
    """Ray Data task: the cache's byte columns as arrays (``feats`` float16 (B, C, h, w),
    ``label`` uint8 (B, size, size)), so that workers get tensors (and may keep them)."""
    out = {k: v for k, v in batch.items() if k not in ("feats", "label", "source", "path")}
    if "feats" in batch:
        out["feats"] = np.stack([np.frombuffer(bytes(b), dtype=np.float16)
                                 for b in batch["feats"]]).reshape(-1, *shape)
    if "label" in batch:
        out["label"] = np.stack([np.frombuffer(bytes(b), dtype=np.uint8)
                                 for b in batch["label"]]).reshape(-1, size, size)
    return out


__all__ = ["FeatureCache", "FeatureExtractor", "build_cache", "cache_folder"]
