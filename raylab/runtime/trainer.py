"""Building and running a ``TorchTrainer`` from a method's loop and :class:`RunOptions`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import ray.train
from ray.train.torch import TorchTrainer

from raylab.engine.keys import TRAIN_DATASET
from raylab.engine.progress import Progress
from raylab.errors import RaylabError, StorageError, shard_read_error
from raylab.runtime import worker
from raylab.runtime.cluster import check_request
from raylab.runtime.console import ProgressRelay
from raylab.runtime.logging_callback import MetricsLogger
from raylab.runtime.options import RunOptions, local_path

#: Seconds between two polls of the workers by Ray Train's controller (Ray's default is
#: 2.0). A worker's ``ray.train.report`` hands its result over through a queue of one that
#: only the controller's poll empties, so every epoch shorter than the interval waited for
#: it: the skill model's ~1.1 s epochs took 2.0 s each (BENCHMARKS.md, "What a user waits
#: for"). Train passes the driver's value on to its controller; a value the user set wins.
CONTROLLER_POLL_S = "0.2"
CONTROLLER_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def scaling_config(options: RunOptions) -> ray.train.ScalingConfig:
    """``--workers/--cpus-per-worker/--gpus-per-worker`` as a ScalingConfig."""
    resources: dict[str, float] = {"CPU": options.cpus_per_worker}
    if options.gpus_per_worker:
        resources["GPU"] = options.gpus_per_worker
    return ray.train.ScalingConfig(
        num_workers=((options.workers, options.max_workers) if options.max_workers
                     else options.workers),
        use_gpu=options.gpus_per_worker > 0,
        resources_per_worker=resources if options.workers else None,
    )


def is_training_dataset(name: str) -> bool:
    """``train``, or a run's ``<run>.train`` (several runs in one Train run)."""
    return name == TRAIN_DATASET or name.endswith(f".{TRAIN_DATASET}")


class ShardingConfig(ray.train.DataConfig):
    """How each dataset reaches the workers.

    - ``train`` (or ``<run>.train``): split evenly (Ray's ``equal=True``): every worker
      takes the same number of rows, so the same number of steps, which data-parallel
      training needs (a worker with one step more would wait forever in the gradient
      all-reduce).
    - every other dataset (evaluation): split *exactly once* (``equal=False``): each row
      goes to one worker and none is dropped, so an evaluation scores the whole split even
      when its rows do not divide by the workers (an even split drops the remainder).
    - ``whole``: every worker gets the whole dataset (e.g. a k-NN bank rank 0 scores).
    """

    def __init__(self, names: Sequence[str], whole: Sequence[str] = ()) -> None:
        self.whole = set(whole)
        # Ray Train makes getting a split dataset's shard a barrier across workers; the
        # whole ones are read by some workers only (rank 0), so they must not be listed.
        super().__init__(datasets_to_split=[n for n in names if n not in self.whole])

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any,
                  worker_node_ids: Any, **kwargs: Any) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        locality = worker_node_ids if self._enable_shard_locality else None
        resolve = getattr(self, "_resolve_execution_options", None)
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            if resolve is not None:
                ds.context.execution_options = resolve(name)
            if name in self.whole or world_size == 1:
                # One worker takes it all: a split would only add a coordinator actor
                # (a process to start) between the data and the worker.
                for i in range(world_size):
                    output[i][name] = ds.iterator()
                continue
            splits = ds.streaming_split(world_size, equal=is_training_dataset(name),
                                        locality_hints=locality)
            for i, split in enumerate(splits):
                output[i][name] = split
        return output


def fit(
    train_loop: Callable[[dict[str, Any]], Any],
    loop_config: dict[str, Any],
    datasets: dict[str, Any],
    options: RunOptions,
    *,
    storage: str,
    name: str,
    callbacks: list[Any] | None = None,
    keep_checkpoints: int = 2,
    whole_datasets: Sequence[str] = (),
    progress: Progress | None = None,
) -> ray.train.Result:
    """Run ``train_loop`` data-parallel and return its Result.

    Running again with the same ``storage``/``name`` resumes from the latest checkpoint
    (Train V2's restore); callers choose unique names for fresh runs.

    ``whole_datasets`` reach every worker whole (see :class:`ShardingConfig`);
    ``progress`` receives the chief worker's epoch lines and bar (the driver's console).
    """
    all_callbacks = list(callbacks or [])
    folder = local_path(storage, name)
    if options.workers > 0:
        all_callbacks.append(MetricsLogger(storage if folder is None else str(folder.parent)))
    run_dir = str(folder) if folder is not None else f"{storage.rstrip('/')}/{name}"
    in_process = options.workers == 0
    if in_process and folder is None:
        raise StorageError("--workers 0 runs in-process and needs local --storage")
    if not in_process:  # a request that can never fit fails here, not after minutes
        check_request(options.workers, options.cpus_per_worker, options.gpus_per_worker)
    os.environ.setdefault(CONTROLLER_POLL_ENV, CONTROLLER_POLL_S)
    relay = None
    if progress is not None and not in_process:
        relay = ProgressRelay(progress)
        loop_config = dict(loop_config, progress=relay.token)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=scaling_config(options),
        datasets=datasets,
        dataset_config=ShardingConfig(list(datasets), whole_datasets),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=options.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=all_callbacks,
            # Ray Train logs every report at INFO; raylab's own progress lines and
            # metrics.jsonl already say that. RAYLAB_TRAIN_LOG_LEVEL=INFO brings it back.
            logging_config=ray.train.LoggingConfig(
                log_level=os.environ.get("RAYLAB_TRAIN_LOG_LEVEL", "WARNING")),
        ),
    )
    if not in_process:
        if relay is None:
            return _fit_naming_shards(trainer, datasets, run_dir)
        with relay:
            return _fit_naming_shards(trainer, datasets, run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    worker.LOCAL_RUN_DIR, worker.LOCAL_PROGRESS = folder, progress
    try:
        return _fit_naming_shards(trainer, datasets, run_dir)
    finally:
        worker.LOCAL_RUN_DIR, worker.LOCAL_PROGRESS = None, None


def dataset_files(datasets: dict[str, Any]) -> list[str]:
    """The input files of the datasets, as far as Ray Data knows them (best effort)."""
    files: list[str] = []
    for ds in datasets.values():
        try:
            files += [str(f) for f in ds.input_files()]
        except Exception:  # not a Ray Dataset, or Ray Data cannot tell
            continue
    return list(dict.fromkeys(files))


def _fit_naming_shards(trainer: TorchTrainer, datasets: dict[str, Any], run_dir: str
                       ) -> ray.train.Result:
    """``trainer.fit()``; a failure to read a shard becomes a DataError naming the file.

    A shard deleted or damaged after the run started fails a Ray Data read task inside
    a worker; Ray Train reports that as a long worker traceback. The files the run wrote
    so far (checkpoints, metrics.jsonl) stay where they are; the error says so.
    """
    try:
        return trainer.fit()
    except RaylabError:
        raise
    except Exception as exc:
        error = shard_read_error(exc, dataset_files(datasets), run_dir)
        if error is None:
            raise
        raise error from exc
