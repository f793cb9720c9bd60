"""Building and running a ``TorchTrainer`` from a method's loop and :class:`RunOptions`."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ray.train
from ray.train.torch import TorchTrainer

from raylab.errors import RaylabError, StorageError, shard_read_error
from raylab.runtime.logging_callback import MetricsLogger
from raylab.runtime.options import RunOptions, local_path


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
    datasets_to_split: list[str] | None = None,
) -> ray.train.Result:
    """Run ``train_loop`` data-parallel and return its Result.

    Running again with the same ``storage``/``name`` resumes from the latest checkpoint
    (Train V2's restore); callers choose unique names for fresh runs.

    ``datasets_to_split`` names the datasets sharded across workers (default: all);
    the others reach every worker whole (e.g. k-NN feature banks that rank 0 evaluates).
    """
    all_callbacks = list(callbacks or [])
    folder = local_path(storage, name)
    if folder is not None and options.workers > 0:
        all_callbacks.append(MetricsLogger(str(folder)))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=scaling_config(options),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(
            datasets_to_split="all" if datasets_to_split is None else datasets_to_split),
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
    run_dir = str(folder) if folder is not None else f"{storage.rstrip('/')}/{name}"
    if options.workers > 0:
        return _fit_naming_shards(trainer, datasets, run_dir)
    from raylab.runtime import worker

    if folder is None:
        raise StorageError("--workers 0 runs in-process and needs local --storage")
    folder.mkdir(parents=True, exist_ok=True)
    worker.LOCAL_RUN_DIR = folder
    try:
        result = _fit_naming_shards(trainer, datasets, run_dir)
    finally:
        worker.LOCAL_RUN_DIR = None
    return result


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
