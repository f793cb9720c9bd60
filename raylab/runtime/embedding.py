"""CLIP image embeddings of an image pool as a resumable Ray Data batch-inference job.

Each pool shard file becomes one embeddings file of the same name in the cache folder,
written atomically once all of that shard's rows are embedded. A later run (after an
interruption, or to curate again with new queries) embeds only the shards whose file is
missing, so finished blocks are never embedded twice. The images stream through an
actor pool (:func:`raylab.runtime.datasets.map_with_actors`): one model per actor, on a
GPU each where the cluster has them, CPUs otherwise.

Cache layout (one folder per model: embeddings of different weights never mix)::

    <cache>/manifest.json           format "clip_embeddings", model id, dim, pool
    <cache>/part-00000.parquet      path, timestamp, embedding (float32 x dim, L2-normalised)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylab.config import atomic_write_text
from raylab.data.pool import read_pool_manifest
from raylab.data.shards import MANIFEST
from raylab.errors import DataError
from raylab.runtime.datasets import map_with_actors, read_shard

FORMAT = "clip_embeddings"
COLUMNS = ["image", "path", "timestamp"]


Part = tuple[str, str, int]


def pool_parts(pool: str | os.PathLike) -> list[Part]:
    """``(file name, absolute path, rows)`` of each pool shard, in manifest order (the
    manifest and shards checked once; pass the list on rather than reading it again)."""
    manifest = read_pool_manifest(pool)
    root = Path(pool).resolve()
    return [(s["file"], str(root / s["file"]), int(s["rows"])) for s in manifest["shards"]]


def _done(cache: Path, name: str, rows: int) -> bool:
    """Whether ``name``'s embeddings are in the cache, complete."""
    path = cache / name
    try:
        return path.is_file() and pq.ParquetFile(path).metadata.num_rows == rows
    except (OSError, pa.ArrowException):
        return False  # a damaged file (e.g. a disk filled mid-write) is embedded again


def _check_cache(cache: Path, model: str, pool: str, dim: int | None) -> None:
    """Write or check ``manifest.json``: a cache folder holds one model's embeddings."""
    path = cache / MANIFEST
    if path.is_file():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read the embeddings cache's manifest ({exc})",
                            path=path) from None
        if found.get("format") != FORMAT or found.get("model") != model:
            raise DataError(f"the cache holds embeddings of model {found.get('model')!r}, "
                            f"not {model!r}; choose another --cache folder", path=cache)
        return
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"format": FORMAT, "model": model, "dim": dim,
                                        "pool": str(Path(pool).resolve())}, indent=2) + "\n")


def _write_part(cache: Path, name: str, rows: list[dict[str, np.ndarray]]) -> None:
    """One shard's embeddings, rows sorted by path (a stable order whatever the actors
    returned first), written to a temporary file and renamed."""
    paths = np.concatenate([r["path"] for r in rows]).astype(str)
    order = np.argsort(paths, kind="stable")
    emb = np.concatenate([r["embedding"] for r in rows])[order].astype(np.float32)
    table = pa.table({
        "path": pa.array(paths[order], pa.string()),
        "timestamp": pa.array(np.concatenate([r["timestamp"] for r in rows])[order],
                              pa.float64()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)),
                                                       emb.shape[1]),
    })
    tmp = cache / f".{name}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, cache / name)


def _read_part_batch(batch: Any) -> Any:
    """A batch of (file, part) rows -> the images of those shard files, tagged by part."""
    tables = []
    for path, part in zip(batch.column("file").to_pylist(), batch.column("part").to_pylist()):
        table = read_shard(path, COLUMNS)
        tables.append(table.append_column("part", pa.array([part] * table.num_rows)))
    return pa.concat_tables(tables)


def embed_pool(pool: str | os.PathLike, cache: str | os.PathLike, *, embedder: type,
               embedder_kwargs: dict[str, Any], model: str, actors: int = 1,
               gpus_per_actor: float = 0.0, batch_size: int = 64, rows_per_block: int = 256,
               progress: Callable[[int, int], None] | None = None,
               parts: list[Part] | None = None) -> dict[str, Any]:
    """Embed every pool image whose shard is not yet in ``cache``.

    Args:
        pool: A ``raylab data convert pool`` shard folder.
        cache: The embeddings folder of this model (created when missing).
        embedder: The actors' callable class (:class:`raylab.curation.clip.ImageEmbedder`):
            built with ``embedder_kwargs`` plus ``keep``, it maps a batch with ``image``
            bytes to one with an ``embedding`` column and the ``keep`` columns.
        embedder_kwargs: Its constructor arguments (the model, weights, threads).
        model: The model id stored in the cache (:func:`raylab.curation.clip.model_id`).
        actors: Model replicas (Ray Data actors).
        gpus_per_actor: GPUs per actor (0: CPU).
        batch_size: Images per model call.
        rows_per_block: Rows per Ray Data block between the read and the actors, so that
            the actors share a shard's rows instead of one actor taking a whole file.
        progress: Called with (images embedded so far, images to embed) as files finish.
        parts: :func:`pool_parts` of ``pool`` when the caller has them already.

    Returns:
        ``embedded`` (images embedded by this call), ``cached`` (images found done),
        ``seconds`` and ``images_per_second`` (of this call's embedding, the actors'
        start-up included), ``files``.
    """
    import ray.data

    cache = Path(cache)
    parts = pool_parts(pool) if parts is None else parts
    _check_cache(cache, model, os.fspath(pool), None)
    todo = [p for p in parts if not _done(cache, p[0], p[2])]
    expected = {name: rows for name, _, rows in todo}
    cached = sum(rows for name, _, rows in parts if name not in expected)
    start = time.perf_counter()
    embedded = 0
    if todo:
        ds = ray.data.from_items([{"file": path, "part": name} for name, path, _ in todo],
                                 override_num_blocks=len(todo))
        ds = ds.map_batches(_read_part_batch, batch_size=1, batch_format="pyarrow")
        ds = ds.repartition(target_num_rows_per_block=rows_per_block)
        # No more actors than blocks to feed (a resumed job may have one file left).
        actors = max(1, min(actors, -(-sum(expected.values()) // rows_per_block)))
        ds = map_with_actors(ds, embedder, batch_size=batch_size, actors=actors,
                             gpus_per_actor=gpus_per_actor, constructor_kwargs={
                                 **embedder_kwargs, "keep": ("path", "timestamp", "part")})
        pending: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in expected}
        seen = dict.fromkeys(expected, 0)
        total = sum(expected.values())
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for name in np.unique(batch["part"].astype(str)):
                mask = batch["part"].astype(str) == name
                pending[name].append({k: batch[k][mask]
                                      for k in ("path", "timestamp", "embedding")})
                seen[name] += int(mask.sum())
                embedded += int(mask.sum())
                if seen[name] == expected[name]:
                    _write_part(cache, name, pending.pop(name))
                    if progress is not None:
                        progress(embedded, total)
        if pending:
            raise DataError(f"the embedding job returned fewer rows than the pool shards "
                            f"{', '.join(sorted(pending))} hold; run again to finish",
                            path=pool)
    seconds = time.perf_counter() - start
    return {"embedded": embedded, "cached": cached, "seconds": seconds,
            "images_per_second": embedded / seconds if embedded and seconds > 0 else None,
            "files": len(parts)}


def read_embeddings(cache: str | os.PathLike, parts: list[Part]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(paths, timestamps, embeddings)`` of every pool image, in pool shard order
    (``parts``: :func:`pool_parts` of the pool).

    Raises:
        DataError: A pool shard has no complete embeddings file in ``cache``.
    """
    cache = Path(cache)
    paths, stamps, embs = [], [], []
    for name, _, rows in parts:
        if not _done(cache, name, rows):
            raise DataError(f"no complete embeddings for pool shard {name}; embed the "
                            "pool first", path=cache)
        table = pq.read_table(cache / name)
        paths.append(np.asarray(table.column("path").to_pylist(), dtype=object))
        stamps.append(table.column("timestamp").to_numpy())
        column = table.column("embedding").combine_chunks()
        embs.append(column.values.to_numpy().reshape(len(column), -1))
    return (np.concatenate(paths), np.concatenate(stamps),
            np.concatenate(embs).astype(np.float32))
