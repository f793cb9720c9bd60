"""``raylab curate clear``: a CLEAR-style stream from a timestamped image pool.

The steps of Lin et al.'s curation (CLEAR, "Visio-Linguistic Dataset Curation"), each
its own piece:

1. every pool image's CLIP embedding, from a resumable Ray Data job with an actor pool
   (:mod:`raylab.runtime.embedding`), cached per model so that curating again with new
   queries costs no embedding;
2. each class's text embedding, its prompts averaged (:mod:`raylab.curation.clip`);
3. buckets by upload time: timestamp quantiles or fixed date edges; bucket 0 is kept
   whole and unlabeled, for unsupervised pre-training (CLEAR's bucket 0);
4. per labelled bucket, the top-N images of each class by cosine similarity, ambiguous
   images removed, and a background class from the images that rank lowest for every
   class (:func:`raylab.curation.select.select_bucket`);
5. the stream, in exactly the format ``raylab data convert clear`` writes, plus
   ``curation/selection.parquet`` (each labelled image's score) and a review page for
   the paper's human pass (:mod:`raylab.curation.review`).

The selection runs on the driver over all embeddings: N images x D dims x 4 bytes must
fit its memory (a million 512-d embeddings: 2 GiB).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raylab.curation.clip import (
    ImageEmbedder,
    check_checkpoint,
    load_clip,
    model_id,
    parse_model,
    text_embeddings,
)
from raylab.curation.queries import BACKGROUND, Queries, load_queries
from raylab.curation.select import (
    assign_buckets,
    bucket_edges,
    cosine_scores,
    parse_date_edges,
    select_bucket,
)
from raylab.data.clear import SCHEMA, UNLABELED, write_stream
from raylab.data.shards import output_folder
from raylab.errors import ConfigError, DataError

SELECTION = "curation/selection.parquet"
SELECTION_SCHEMA = pa.schema([("path", pa.string()), ("bucket", pa.int32()),
                              ("label", pa.int32()), ("score", pa.float32())])


def default_cache(pool: str | os.PathLike) -> Path:
    """Where a pool's embeddings are cached unless ``--cache`` says otherwise: beside its
    shards, so that every curation of the pool finds them."""
    return Path(pool) / "embeddings"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(float(t), timezone.utc).isoformat(timespec="seconds")


def _check_args(buckets: int, edges: Sequence[Any] | None, per_class: int) -> None:
    if edges is None and (not isinstance(buckets, int) or buckets < 2):
        raise ConfigError(f"--buckets must be an integer >= 2 (bucket 0 is kept unlabeled, "
                          f"so at least one labelled bucket follows it), got {buckets!r}")
    if edges is not None and len(edges) < 3:
        raise ConfigError("--edges: expected at least 3 dates (2 buckets: bucket 0, kept "
                          f"unlabeled, and one labelled bucket), got {len(edges)}")
    if not isinstance(per_class, int) or per_class < 1:
        raise ConfigError(f"--per-class must be an integer >= 1, got {per_class!r}")


def _image_rows(shards: list[str], wanted: set[str]) -> dict[str, dict[str, Any]]:
    """``{path: {image, height, width}}`` of the ``wanted`` pool images (read here: the
    selected images are few next to the pool)."""
    found: dict[str, dict[str, Any]] = {}
    values = pa.array(sorted(wanted), pa.string())
    for shard in shards:
        table = pq.read_table(shard, columns=["path", "image", "height", "width"])
        table = table.filter(pc.is_in(table.column("path"), value_set=values))
        for row in table.to_pylist():
            found[row["path"]] = row
    return found


def _bucket_table(bucket: int, rows: list[tuple[str, int]], images: dict[str, dict[str, Any]],
                  seed: int) -> pa.Table:
    """A bucket's stream rows (path, label), shuffled with ``seed`` as the converter does."""
    rows = list(rows)
    random.Random(f"{seed}/{bucket}").shuffle(rows)
    return pa.table({
        "image": pa.array([images[p]["image"] for p, _ in rows], pa.binary()),
        "label": pa.array([label for _, label in rows], pa.int32()),
        "bucket": pa.array([bucket] * len(rows), pa.int32()),
        "path": pa.array([p for p, _ in rows], pa.string()),
        "height": pa.array([images[p]["height"] for p, _ in rows], pa.int32()),
        "width": pa.array([images[p]["width"] for p, _ in rows], pa.int32()),
    }, schema=SCHEMA)


def select_stream(paths: np.ndarray, stamps: np.ndarray, scores: np.ndarray, edges: np.ndarray,
                  *, per_class: int, margin: float, background: int | None
                  ) -> dict[str, Any]:
    """The curation's choices from embeddings already scored (no model, no files).

    Returns:
        ``buckets`` ({bucket: [(path, label)]}, bucket 0 all :data:`UNLABELED`),
        ``selection`` (rows of path, bucket, label, score for the labelled buckets),
        ``ambiguous`` ({bucket: count}), ``outside`` (images outside the edges).
    """
    assigned = assign_buckets(stamps, edges)
    n_classes = scores.shape[1]
    out: dict[str, Any] = {"buckets": {}, "selection": [], "ambiguous": {},
                           "outside": int((assigned < 0).sum())}
    for bucket in range(len(edges) - 1):
        members = np.flatnonzero(assigned == bucket)
        if bucket == 0:
            out["buckets"][0] = [(str(paths[i]), UNLABELED) for i in members]
            continue
        if not len(members):
            raise DataError(f"bucket {bucket} ({_iso(edges[bucket])} to "
                            f"{_iso(edges[bucket + 1])}) holds no image; expected every "
                            "bucket to hold some (choose fewer buckets or other edges)")
        chosen = select_bucket(scores[members], per_class, margin=margin,
                               background=background)
        rows = [(str(paths[members[i]]), int(label))
                for i, label in zip(chosen.indices, chosen.labels)]
        out["buckets"][bucket] = rows
        out["selection"] += [(p, bucket, label, float(s))
                             for (p, label), s in zip(rows, chosen.scores)]
        out["ambiguous"][bucket] = int(len(chosen.ambiguous))
        if not rows:
            raise DataError(f"bucket {bucket}: no image was selected (all ambiguous at "
                            f"margin {margin}); expected a smaller --margin")
    out["has_background"] = any(label == n_classes for _, _, label, _ in out["selection"])
    return out


def curate_clear(pool: str | os.PathLike, dst: str | os.PathLike, *,
                 queries: str | os.PathLike | Queries, model: str,
                 checkpoint: str | os.PathLike, buckets: int = 11,
                 edges: Sequence[str | float] | None = None, per_class: int = 100,
                 margin: float = 0.0, background: int | None = None,
                 cache: str | os.PathLike | None = None, actors: int = 1,
                 gpus_per_actor: float = 0.0, batch_size: int = 64,
                 threads: int | None = None, seed: int = 0,
                 overwrite: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Curate ``pool`` into a CLEAR stream at ``dst`` (Ray must be running).

    Args:
        pool: A ``raylab data convert pool`` shard folder.
        dst: The stream folder to write.
        queries: A queries YAML file (:mod:`raylab.curation.queries`) or parsed queries.
        model: ``open_clip:ARCH``.
        checkpoint: Local weights file of the model.
        buckets: Time buckets by timestamp quantiles (bucket 0 unlabeled); ignored with
            ``edges``.
        edges: Bucket edges as ISO dates or POSIX seconds (len = buckets + 1); images
            outside are left out.
        per_class: Images per class per labelled bucket (before ambiguity removal).
        margin: Minimum gap between an image's best and second-best class similarity.
        background: Background images per labelled bucket (None: ``per_class``; 0: none).
        cache: Embeddings cache root (default: ``POOL/embeddings``); one folder per model.
        actors, gpus_per_actor, batch_size, threads: The embedding job's actor pool
            (threads: torch CPU threads per actor).
        seed: Seed of the per-bucket row shuffle in the shards.
        overwrite: Replace an existing ``dst``.
        progress: Called with (images embedded, images to embed).

    Returns:
        A summary: rows per bucket, counts per bucket and class, ambiguous and background
        counts, embedding figures (``embedded``, ``cached``, ``images_per_second``) and
        the time of each stage.
    """
    from raylab.runtime.embedding import embed_pool, pool_parts, read_embeddings

    _check_args(buckets, edges, per_class)
    parsed = queries if isinstance(queries, Queries) else load_queries(queries)
    arch = parse_model(model)
    weights = check_checkpoint(checkpoint)
    parts = pool_parts(pool)  # the manifest and shards checked once for every stage
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise DataError("output folder already exists (expected a new path, or pass "
                        "--overwrite)", path=dst)
    date_edges = None if edges is None else parse_date_edges(edges)
    mid = model_id(arch, weights)
    cache_dir = Path(cache) if cache is not None else default_cache(pool)
    cache_dir = cache_dir / mid

    t0 = time.perf_counter()
    embedding = embed_pool(pool, cache_dir, embedder=ImageEmbedder, embedder_kwargs={
        "arch": arch, "checkpoint": weights, "threads": threads}, model=mid, actors=actors,
        gpus_per_actor=gpus_per_actor, batch_size=batch_size, progress=progress,
        parts=parts)
    t1 = time.perf_counter()
    paths, stamps, image_emb = read_embeddings(cache_dir, parts)
    clip, _, tokenizer = load_clip(arch, weights)
    class_emb = text_embeddings(clip, tokenizer, parsed.prompts)
    scores = cosine_scores(image_emb, class_emb)
    bucket_bounds = date_edges if date_edges is not None else bucket_edges(stamps, buckets)
    chosen = select_stream(paths, stamps, scores, bucket_bounds, per_class=per_class,
                           margin=margin, background=background)
    t2 = time.perf_counter()

    names = list(parsed.names) + ([BACKGROUND] if chosen["has_background"] else [])
    wanted = {p for rows in chosen["buckets"].values() for p, _ in rows}
    images = _image_rows([path for _, path, _ in parts], wanted)
    tables = {b: _bucket_table(b, rows, images, seed) for b, rows in chosen["buckets"].items()}
    settings = {
        "pool": str(Path(pool).resolve()), "model": model, "model_id": mid,
        "checkpoint": weights, "queries": parsed.as_dict(),
        "edges": [_iso(e) for e in bucket_bounds], "edges_from": "dates" if edges else
        "quantiles", "per_class": per_class, "margin": margin,
        "background": per_class if background is None else background,
        "ambiguous": {str(b): n for b, n in chosen["ambiguous"].items()},
        "outside_edges": chosen["outside"], "cache": str(cache_dir.resolve()),
    }
    with output_folder(dst, overwrite) as tmp:
        manifest = write_stream(tmp, names, tables, unlabeled=[0], source=settings["pool"],
                                overwrite=True, extra={"curation": settings})
        (tmp / SELECTION).parent.mkdir(parents=True, exist_ok=True)
        selection = pa.Table.from_pylist(
            [dict(zip(SELECTION_SCHEMA.names, row)) for row in chosen["selection"]],
            schema=SELECTION_SCHEMA)
        pq.write_table(selection, tmp / SELECTION)
        from raylab.curation.review import write_review

        write_review(tmp)
    t3 = time.perf_counter()
    return {
        "dst": str(dst), "rows": manifest["rows"], "bucket_rows": manifest["bucket_rows"],
        "counts": manifest["counts"], "class_names": names,
        "ambiguous": sum(chosen["ambiguous"].values()),
        "background": sum(1 for row in chosen["selection"] if row[2] == len(parsed.names)),
        "outside_edges": chosen["outside"], "edges": settings["edges"],
        "embedded": embedding["embedded"], "cached": embedding["cached"],
        "images_per_second": embedding["images_per_second"], "model_id": mid,
        "seconds": {"embed": t1 - t0, "select": t2 - t1, "write": t3 - t2},
        "review": str(dst / "review" / "index.html"),
    }
