"""Rows of a CLEAR stream by id: the numbering the stream actor uses, and stores that fetch
the rows for a worker (pure torch/pyarrow, no Ray).

The stream actor (:mod:`raylab.continual.stream`) deals in row ids only: its split, its
replay buffer and the shards it hands to each worker are lists of ints. A row id is
``bucket * ROW_STRIDE + position``, where ``position`` counts the rows of the bucket's shard
files in the order :func:`raylab.data.clear.bucket_paths` lists them (file by file, row by
row). The id therefore names the same image on every node and in every run over the same
converted stream, and replay rows from past buckets are fetched without any look-up table.

Why workers read shards directly instead of through Ray Data: the protocol needs random
access by id across every bucket seen so far (replay) and a test set fixed per bucket; a
stream is small per bucket (CLEAR-10: ~3,300 images per bucket), so each worker decodes a
bucket once, keeps it in memory as uint8 (``input_size`` square), and serves batches from
it. The stream folder must be readable by every node (a shared file system), as for the
stream's state file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import nn

from raylab.data.clear import bucket_paths, read_stream_manifest
from raylab.errors import DataError
from raylab.transforms.images import DeviceNormalize, decode_image

#: Positions within a bucket stay below this (CLEAR-100's largest bucket has ~10k rows).
ROW_STRIDE = 10_000_000


def row_id(bucket: int, position: int) -> int:
    """The stream-wide id of row ``position`` of bucket ``bucket``."""
    if not 0 <= position < ROW_STRIDE:
        raise ValueError(f"row position must be in [0, {ROW_STRIDE}), got {position}")
    return int(bucket) * ROW_STRIDE + int(position)


def split_row_id(row: int) -> tuple[int, int]:
    """``(bucket, position)`` of a row id."""
    return divmod(int(row), ROW_STRIDE)


def _read_column(paths: Sequence[str], column: str) -> list[Any]:
    values: list[Any] = []
    for path in paths:
        try:
            values.extend(pq.read_table(path, columns=[column]).column(column).to_pylist())
        except (OSError, ValueError, KeyError) as exc:  # ArrowInvalid is a ValueError
            raise DataError(f"cannot read column {column!r} ({exc})", path=path) from None
    return values


def stream_rows(dst: str | os.PathLike, buckets: Sequence[int] | None = None,
                manifest: dict[str, Any] | None = None
                ) -> dict[int, tuple[list[int], list[int]]]:
    """``{bucket: (row ids, labels)}`` of a converted stream (labels only are read).

    This is what :class:`~raylab.continual.stream.StreamProtocol` is built from.
    ``manifest``: the stream's manifest when the caller has read it already.

    Raises:
        DataError: The stream or one of its shards is unreadable.
    """
    manifest = read_stream_manifest(dst) if manifest is None else manifest
    chosen = manifest["buckets"] if buckets is None else list(buckets)
    out = {}
    for b in chosen:
        labels = [int(y) for y in _read_column(bucket_paths(dst, b, manifest), "label")]
        if len(labels) >= ROW_STRIDE:
            raise DataError(f"bucket {b} has {len(labels)} rows; at most {ROW_STRIDE - 1} "
                            "fit the row numbering", path=dst)
        out[int(b)] = ([row_id(b, k) for k in range(len(labels))], labels)
    return out


def decode_square(data: bytes, size: int, path: str) -> np.ndarray:
    """An encoded image as ``(3, size, size)`` uint8: shorter side resized to ``size``
    (bicubic), then centre-cropped, as a standard evaluation transform does."""
    image = decode_image(data, path)
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


class ImageRows:
    """Decoded images of a stream's buckets, fetched by row id.

    A bucket is read and decoded on first use and kept (uint8, ``3 x size x size``).

    Args:
        dst: The converted stream folder.
        size: Side of the square images served.
    """

    def __init__(self, dst: str | os.PathLike, size: int) -> None:
        self.dst = os.fspath(dst)
        self.size = int(size)
        self._buckets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._manifest: dict[str, Any] | None = None

    def bucket(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All rows of bucket ``b`` as ``(images uint8 [N,3,S,S], labels int64 [N])``."""
        if b not in self._buckets:
            if self._manifest is None:
                self._manifest = read_stream_manifest(self.dst)
            paths = bucket_paths(self.dst, b, self._manifest)
            images, labels = [], []
            for path in paths:
                try:
                    table = pq.read_table(path, columns=["image", "label", "path"])
                except (OSError, ValueError) as exc:
                    raise DataError(f"cannot read shard ({exc})", path=path) from None
                for data, y, name in zip(table.column("image").to_pylist(),
                                         table.column("label").to_pylist(),
                                         table.column("path").to_pylist()):
                    images.append(decode_square(data, self.size, f"{path}: {name}"))
                    labels.append(int(y))
            if not images:
                raise DataError(f"bucket {b} has no rows", path=self.dst)
            self._buckets[b] = (torch.from_numpy(np.stack(images)),
                                torch.tensor(labels, dtype=torch.int64))
        return self._buckets[b]

    def fetch(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of the rows ``ids`` in the given order."""
        return _gather(self.bucket, ids)


class FeatureRows:
    """Frozen features of a stream's rows, computed once per bucket and kept.

    The "unsupervised representation" setting of CLEAR: a frozen backbone (e.g. a DINO
    teacher from :func:`raylab.methods.load_backbone`) embeds every image once; strategies
    then train a linear classifier on the cached vectors.

    Args:
        images: Where the pixels come from.
        embed: ``embed(uint8 batch [B,3,S,S]) -> float features [B, D]`` (no grad).
        batch_size: Images per ``embed`` call.
    """

    def __init__(self, images: ImageRows, embed: Callable[[torch.Tensor], torch.Tensor],
                 batch_size: int = 256) -> None:
        self.images = images
        self.embed = embed
        self.batch_size = int(batch_size)
        self._buckets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def bucket(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All rows of bucket ``b`` as ``(features float32 [N, D], labels [N])``."""
        if b not in self._buckets:
            pixels, labels = self.images.bucket(b)
            with torch.no_grad():
                feats = [self.embed(pixels[i:i + self.batch_size]).float().cpu()
                         for i in range(0, len(pixels), self.batch_size)]
            self._buckets[b] = (torch.cat(feats), labels)
        return self._buckets[b]

    def fetch(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, y)`` of the rows ``ids`` in the given order."""
        return _gather(self.bucket, ids)


def _gather(bucket: Callable[[int], tuple[torch.Tensor, torch.Tensor]], ids: Sequence[int]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows by id from per-bucket tensors, in the order of ``ids``."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise ValueError("no row ids to fetch")
    buckets, positions = np.divmod(ids, ROW_STRIDE)
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    order = np.empty(ids.size, dtype=np.int64)
    done = 0
    for b in np.unique(buckets).tolist():
        where = np.flatnonzero(buckets == b)
        x, y = bucket(int(b))
        pos = torch.from_numpy(positions[where])
        if int(pos.max()) >= len(y):
            raise DataError(f"row id {int(ids[where][pos.argmax()])} is past the end of "
                            f"bucket {b} ({len(y)} rows)", path=None)
        xs.append(x[pos])
        ys.append(y[pos])
        order[where] = np.arange(done, done + where.size)
        done += where.size
    index = torch.from_numpy(order)
    return torch.cat(xs)[index], torch.cat(ys)[index]


class FrozenEmbedding(nn.Module):
    """A frozen backbone as ``uint8 images -> pooled features``, normalised as in training
    (:class:`~raylab.transforms.images.DeviceNormalize`). ``backbone(x)`` must return pooled
    features, as :func:`raylab.methods.load_backbone` models do (timm, ``num_classes=0``)."""

    def __init__(self, backbone: nn.Module, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.backbone = backbone.eval().requires_grad_(False).to(self.device)
        self.normalize = DeviceNormalize()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(images.to(self.device)))


__all__ = ["ROW_STRIDE", "FeatureRows", "FrozenEmbedding", "ImageRows", "decode_square",
           "row_id", "split_row_id", "stream_rows"]
