"""Reading shard files into Ray Datasets: streamed, or held in the object store when small.

Every epoch of a streamed dataset lists the files and reads the Parquet again, which on
small datasets costs more than the epoch's own work (1-3 s here against well under a second
of decoding for the CIFAR subset or windowing for a JIGSAWS fold). Shard sets no larger
than ``materialize_mb`` are read once, cut into enough blocks for every CPU, and kept in
the object store; later stages (filters, windowing, decoding, augmentation) still run
fresh in every epoch. Larger or remote sets stream.

The small sets are read by the driver with pyarrow and handed over as blocks
(``ray.data.from_blocks``): a Ray Data read + repartition + materialize of the same files
starts read tasks first, which cost 5.8 s before the first step of a JIGSAWS fold against
under 0.3 s this way (BENCHMARKS.md, "Platform overhead").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylab.data.shards import unreadable_shard
from raylab.errors import DataError


def local_mib(paths: list[str]) -> float | None:
    """Total size of local files in MiB; None for remote storage (never materialised)."""
    if any("://" in p for p in paths):
        return None
    return sum(os.path.getsize(p) for p in paths) / (1 << 20)


def read_shards(paths: list[str], columns: list[str], *, shuffle_files: bool,
                materialize_mb: int, rows_per_block: int | None = None) -> Any:
    """A Ray Dataset of ``columns`` of the Parquet ``paths``.

    Args:
        paths: Shard files.
        columns: Columns to keep.
        shuffle_files: Randomise the file (or block) order every epoch.
        materialize_mb: Hold the rows in the object store when the files total at most
            this many MiB (0: always stream).
        rows_per_block: When streaming, cut each file's rows into blocks of at most this
            many before the next stage (see :func:`stream_shards`).
    """
    tables = local_tables(paths, columns, materialize_mb)
    if tables is not None:
        return dataset_from_tables(tables, shuffle_files=shuffle_files)
    return stream_shards(paths, columns, shuffle_files=shuffle_files,
                         rows_per_block=rows_per_block)


def local_tables(paths: list[str], columns: list[str], materialize_mb: int
                 ) -> list[Any] | None:
    """``columns`` of the shard files as pyarrow Tables read here, or None when the set
    is remote, larger than ``materialize_mb`` MiB, or ``materialize_mb`` is 0."""
    size = local_mib(paths)
    if not materialize_mb or size is None or size > materialize_mb:
        return None
    return [read_shard(path, columns) for path in paths]


def dataset_from_tables(tables: list[Any], *, shuffle_files: bool) -> Any:
    """Tables from :func:`local_tables` as a Ray Dataset held in the object store."""
    # Ray (and cluster, which imports it) inside functions: the Ray-free method modules
    # import this one (raylab.bench.gpu runs them on GPU machines without Ray).
    import ray.data

    from raylab.runtime.cluster import cluster_resources

    # Small shard files would be one block each and so processed by one task: cut them
    # into enough blocks for every CPU.
    blocks = max(len(tables), 2 * int(cluster_resources().get("CPU", 1)))
    rows_per_block = max(1, -(-sum(t.num_rows for t in tables) // blocks))
    pieces = [t.slice(start, rows_per_block) for t in tables
              for start in range(0, t.num_rows, rows_per_block)]
    # from_blocks keeps these blocks as they are and takes their metadata here; from_arrow
    # computes it in a remote task, which on a fresh cluster waits for Ray's first task
    # worker to start (0.8 s of the first step, BENCHMARKS.md). Rays without it fall back.
    make = getattr(ray.data, "from_blocks", None) or ray.data.from_arrow
    ds = make(pieces or tables)
    return ds.randomize_block_order() if shuffle_files else ds


def dataset_from_arrays(columns: dict[str, np.ndarray], *, shuffle_blocks: bool) -> Any:
    """Equal-length numpy columns computed on the driver as a Ray Dataset held in the
    object store, cut into blocks as :func:`dataset_from_tables` cuts tables. A column of
    more than one dimension becomes a tensor column (what ``map_batches`` makes of it)."""
    from ray.data.extensions import ArrowTensorArray

    table = pa.table({name: ArrowTensorArray.from_numpy(values) if values.ndim > 1
                      else pa.array(values) for name, values in columns.items()})
    return dataset_from_tables([table], shuffle_files=shuffle_blocks)


#: Blocks a streamed read task may hand on before the executor takes them (see
#: :func:`stream_shards`): a file of 512 rows in blocks of 32.
STREAM_GENERATOR_BLOCKS = 16


def stream_shards(paths: list[str], columns: list[str], *, shuffle_files: bool,
                  rows_per_block: int | None = None,
                  per_file: Callable[[Any, str], Any] | None = None) -> Any:
    """A Ray Dataset that reads ``columns`` of the files again in every epoch.

    Each file is read by one task of a plain map over the list of paths, not by
    ``ray.data.read_parquet``: the latter lists and plans its files again at every epoch's
    start, 1.1-2.5 s on 2 cores even for one 100-row file, against 0.12-0.17 s for the
    map (BENCHMARKS.md, "Ingest with copy-paste"), which halved a small streamed split's
    throughput. A damaged file raises the DataError naming it.

    Ray Data fuses the following ``map_batches`` into the read task, so a split of few,
    large files is transformed by as many tasks as it has files: 2 files keep 2 CPUs busy
    however many the node has, and nothing overlaps the epoch's tail.
    ``rows_per_block`` inserts Ray Data's streaming repartition (no shuffle, no barrier:
    a block is cut as it arrives), so that the expensive per-row stage that follows
    (decoding, jitter, copy-paste) spreads over small blocks.

    ``per_file(table, path)``, when given, runs in the read task on each file's rows
    before they are cut (e.g. a filter, or a draw among the rows of that file).
    """
    import ray.data

    ds = ray.data.from_items([{"path": p} for p in paths],
                             override_num_blocks=max(len(paths), 1))
    if shuffle_files:
        ds = ds.randomize_block_order()
    ds = ds.map_batches(_read_shard_batch, fn_kwargs={"columns": list(columns),
                                                      "per_file": per_file},
                        batch_size=1, batch_format="pyarrow")
    if rows_per_block:
        ds = ds.repartition(target_num_rows_per_block=int(rows_per_block))
        # A read task holds its whole file, but Ray hands on at most this many of its
        # blocks per scheduling round (2 by default): a 500-row file cut into 32-row
        # blocks trickled out over 1.6 s, the read task holding its CPU meanwhile, so
        # that one decoding task ran where two could (BENCHMARKS.md, "Ingest with
        # copy-paste"). Letting all of a file's blocks go at once costs no memory the
        # task has not already taken.
        if hasattr(ds.context, "_max_num_blocks_in_streaming_gen_buffer"):
            ds.context._max_num_blocks_in_streaming_gen_buffer = max(
                ds.context._max_num_blocks_in_streaming_gen_buffer or 0,
                STREAM_GENERATOR_BLOCKS)
    return ds


def _read_shard_batch(batch: Any, columns: list[str],
                      per_file: Callable[[Any, str], Any] | None = None) -> Any:
    """A batch of shard paths -> their rows (``columns``), one file after the other."""
    paths = batch.column("path").to_pylist()
    tables = [read_shard(path, columns) for path in paths]
    if per_file is not None:
        tables = [per_file(table, path) for table, path in zip(tables, paths)]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def read_shard(path: str, columns: list[str]) -> Any:
    """One shard file's ``columns`` (a path or a store URI) as a pyarrow Table, or a
    DataError naming it (one that is gone, e.g. deleted from the bucket mid-run, as such)."""
    try:
        return pq.read_table(path, columns=columns)
    except FileNotFoundError:  # the words a local shard's probe uses (errors.py)
        raise DataError("the file is missing", path=path) from None
    except (OSError, pa.ArrowException) as exc:
        raise unreadable_shard(path, exc) from None


#: An epoch's output at most this share of the object store runs without Ray Data's
#: resource allocator (:func:`without_allocator_if_small`); Ray Data's own memory limit
#: when that allocator is off is a quarter of the store.
SMALL_EPOCH_STORE_SHARE = 0.25


def without_allocator_if_small(ds: Any, epoch_output_bytes: float) -> Any:
    """Turn Ray Data's per-operator resource allocator off for ``ds`` when a whole epoch
    of its output is small next to the object store.

    Ray 2.60 learns the cluster's size asynchronously: each execution (every epoch of a
    dataset) starts with resource limits of zero until its first answer arrives, read
    once a second, and meanwhile the allocator lets the expensive map stage run one task
    at a time. On a held split of 100 coco128 images (decode + LSJ + copy-paste, 2 CPUs)
    that was most of each ~1.7 s epoch: 1.1 s with the allocator off (BENCHMARKS.md,
    "Ingest with copy-paste"). The allocator's job is to keep fast stages from filling
    the object store ahead of slow ones; an epoch whose whole output (and input, when
    streamed) fits in :data:`SMALL_EPOCH_STORE_SHARE` of the store needs no such guard.
    Larger datasets keep it, and so does one whose context caps Ray Data's CPUs or
    memory (``execution_options.resource_limits``: only the allocator enforces them).
    Only ``ds``'s own context changes (Ray copies it per dataset), and the Train
    workers' split of ``ds`` runs with it; Ray core still runs no more tasks at once
    than the cluster has free logical CPUs.
    """
    import math

    import ray

    limits = ds.context.execution_options.resource_limits
    if any(math.isfinite(v) for v in (limits.cpu, limits.gpu, limits.object_store_memory)):
        return ds
    store = float(ray.cluster_resources().get("object_store_memory", 0.0))
    if 0 < epoch_output_bytes <= SMALL_EPOCH_STORE_SHARE * store:
        ds.context.op_resource_reservation_enabled = False
    return ds


def without_allocator_if_small_files(ds: Any, paths: list[str], bytes_per_row: float) -> Any:
    """:func:`without_allocator_if_small` for a dataset over the local shard files
    ``paths`` whose rows each put about ``bytes_per_row`` in the object store: the rows
    (counted from the files' footers, before any filter) times that, plus the files'
    own bytes. Remote files: the allocator stays."""
    mib = local_mib(paths)
    if mib is None:
        return ds
    rows = sum(pq.ParquetFile(path).metadata.num_rows for path in paths)
    return without_allocator_if_small(ds, rows * bytes_per_row + mib * 2**20)


class WithTable:
    """A Ray Data batch function ``fn(batch, table)`` given a table held once in the
    object store: the table is put there when this is built (on the driver) and read
    without a copy in each task (Arrow buffers), instead of being pickled into every
    task with the function. E.g. a whole split that each row draws a partner from."""

    def __init__(self, fn: Callable[[Any, Any], Any], table: Any) -> None:
        import ray

        self.fn = fn
        self.ref = ray.put(table)

    def __call__(self, batch: Any) -> Any:
        import ray

        return self.fn(batch, ray.get(self.ref))


def keep_rows(ds: Any, column: str, values: set[str] | list[str]) -> Any:
    """The rows of ``ds`` whose ``column`` is one of ``values`` (a Ray Data expression, so
    the filter runs in Arrow without Python per row)."""
    from ray.data.expressions import col

    return ds.filter(expr=col(column).is_in(sorted(values)))


def map_with_actors(ds: Any, fn_class: type, *, constructor_kwargs: dict[str, Any],
                    batch_size: int, actors: int, gpus_per_actor: float = 0.0,
                    preserve_order: bool = False) -> Any:
    """Batch inference: ``fn_class(**constructor_kwargs)`` is built once in each of
    ``actors`` Ray Data actors (a model loaded once per actor, not per batch) and called
    on numpy batches of ``batch_size`` rows; ``gpus_per_actor`` > 0 places each actor on
    a GPU. ``preserve_order``: the output rows come in the input's order."""
    import ray.data

    if preserve_order:
        ds.context.execution_options.preserve_order = True
    kwargs: dict[str, Any] = {"num_gpus": gpus_per_actor} if gpus_per_actor else {}
    return ds.map_batches(fn_class, fn_constructor_kwargs=constructor_kwargs,
                          batch_size=batch_size, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=actors), **kwargs)


class EpochClock:
    """The epoch a run's Ray Data tasks produce training rows for, readable in the tasks.

    A dataset is planned once on the driver, but its random augmentation should differ per
    epoch and be the same again when a resumed run reaches that epoch. The chief sets the
    clock at the start of every epoch, while no training rows are being produced (the
    workers wait at a barrier before they ask for the epoch's batches); a ``map_batches``
    function given the clock as its ``epoch`` reads it once per batch. The value lives
    in Ray's key-value store under a key of its own, so the clock pickles into tasks.
    """

    NAMESPACE = "raylab-epoch"

    def __init__(self) -> None:
        import uuid

        self.key = f"epoch-{uuid.uuid4().hex}"

    def set(self, epoch: int) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(self.key, str(int(epoch)), namespace=self.NAMESPACE)

    def __call__(self) -> int:
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get(self.key, namespace=self.NAMESPACE)
        return 0 if raw is None else int(raw)
