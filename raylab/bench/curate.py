"""CLIP curation benchmark (BENCHMARKS.md, "CLEAR-style curation"; issue 21).

``curate``: the embedding job of ``raylab curate clear`` (a Ray Data actor pool, 1 and 2
actors) against a plain loop over the same images with the same model and batch size in
one process (what a user writes without raylab: read the shards, decode, preprocess,
``encode_image``), images/s over the whole job; then the time to curate again with new
queries from the cached embeddings (no image is embedded).

The model is open_clip's ViT-B-32 architecture with random weights saved to a local file
(nothing pretrained can be downloaded here): the embedding cost is that of the real model,
the rankings are arbitrary.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from raylab.bench import BenchOptions, say_data, shared_data
from raylab.curation.clip import (
    ImageEmbedder,
    check_checkpoint,
    model_id,
    parse_model,
    save_random_weights,
)
from raylab.curation.curate import curate_clear
from raylab.curation.queries import parse_queries
from raylab.data.imagefolder import write_image_sample
from raylab.data.pool import convert_pool, write_timestamps_csv
from raylab.data.shards import shard_paths
from raylab.runtime.cluster import ensure_ray
from raylab.runtime.embedding import embed_pool

ARCH = "ViT-B-32"
BATCH = 32
#: Images per class of the CIFAR-10 subset (10 classes): 1,000 images, ~1 min per arm here.
PER_CLASS = 100
#: This machine's cores: the plain loop's threads, shared by the actors.
CORES = os.cpu_count() or 1
QUERIES = {"classes": ["airplane", "automobile", "bird", "cat", "deer"]}
NEW_QUERIES = {"classes": ["dog", "frog", "horse", "ship", "truck"],
               "templates": ["a photo of a {}.", "a blurry photo of a {}."]}


def plain_loop(pool: Path, checkpoint: str, batch: int = BATCH) -> dict[str, float]:
    """The baseline: one process, every core, the same model, decode and batch size."""
    start = time.perf_counter()
    embedder = ImageEmbedder(ARCH, checkpoint, device="cpu", threads=CORES)
    images = 0
    for shard in shard_paths(pool):
        table = pq.read_table(shard, columns=["image", "path"])
        for offset in range(0, table.num_rows, batch):
            rows = table.slice(offset, batch).to_pydict()
            out = embedder({"image": rows["image"], "path": rows["path"]})
            images += len(out["embedding"])
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "images_per_second": images / seconds}


def _pool(opts: BenchOptions, per_class: int = PER_CLASS) -> Path:
    root = Path(opts.data) if opts.data else shared_data() / "cifar10" / "train"
    if root.is_dir():
        say_data(f"{per_class} images per class of the ImageFolder at {root}, SYNTHETIC "
                 "timestamps")
        subset = opts.tmp / "images"
        shutil.rmtree(subset, ignore_errors=True)
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            (subset / folder.name).mkdir(parents=True)
            for f in sorted(folder.iterdir())[:per_class]:
                shutil.copy(f, subset / folder.name / f.name)
        root = subset
    else:
        say_data("the SYNTHETIC image sample (no CIFAR-10 subset found)")
        root = write_image_sample(opts.tmp / "images", classes=4, train_per_class=125) / "train"
    csv = opts.tmp / "times.csv"
    write_timestamps_csv(root, csv)
    pool = opts.tmp / "pool"
    convert_pool(root, pool, timestamps=str(csv), overwrite=True, rows_per_shard=250)
    return pool


def bench_curate(opts: BenchOptions) -> dict[str, Any]:
    pool = _pool(opts)
    checkpoint = check_checkpoint(save_random_weights(ARCH, opts.tmp / "vit-b-32-random.pt"))
    arch = parse_model(f"open_clip:{ARCH}")
    mid = model_id(arch, checkpoint)
    ensure_ray()
    result: dict[str, Any] = {"model": f"open_clip:{ARCH} (random weights)", "batch": BATCH,
                              "cores": CORES, "rounds": []}
    rounds = opts.rounds or 1
    for r in range(rounds):
        row: dict[str, Any] = {"plain_loop": plain_loop(pool, checkpoint)}
        for actors in (1, 2):
            cache = opts.tmp / f"cache-{r}-{actors}"
            done = embed_pool(pool, cache / mid, embedder=ImageEmbedder, embedder_kwargs={
                "arch": arch, "checkpoint": checkpoint, "threads": max(1, CORES // actors)},
                model=mid, actors=actors, batch_size=BATCH)
            row[f"actors_{actors}"] = {k: done[k] for k in (
                "embedded", "seconds", "images_per_second")}
            row[f"ratio_{actors}"] = (done["images_per_second"]
                                      / row["plain_loop"]["images_per_second"])
        result["rounds"].append(row)
        print(row, flush=True)
    # Curating: the first time embeds nothing more (the cache of the last 1-actor job is
    # reused), then again with new queries: only text embeddings and the selection run.
    cache_root = opts.tmp / f"cache-{rounds - 1}-1"
    timings = {}
    for name, queries in (("first", QUERIES), ("new_queries", NEW_QUERIES)):
        start = time.perf_counter()
        done = curate_clear(pool, opts.tmp / f"stream-{name}", queries=parse_queries(queries),
                            model=f"open_clip:{ARCH}", checkpoint=checkpoint, buckets=6,
                            per_class=20, cache=cache_root, overwrite=True)
        timings[name] = {"seconds": time.perf_counter() - start, "embedded": done["embedded"],
                         "rows": done["rows"], "stages": done["seconds"]}
    result["curate_from_cache"] = timings
    result["images"] = result["rounds"][0]["plain_loop"]["images"]
    return result
