"""The engine inside a Ray Train worker: :class:`RayContext` and :func:`train_function`.

Every method's Train run executes :func:`train_function`: it builds the worker context from
Ray Train (rank, device, dataset shards, the checkpoint to resume from, reports) and runs the
method's task on the engine's loop (:func:`raylab.engine.loop.build_and_run`). Methods never
touch ``ray.train`` or ``torch.distributed`` themselves.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train
import ray.train.torch

from raylab.config import from_dict
from raylab.engine.checkpoint import save_checkpoint
from raylab.engine.context import WorkerContext
from raylab.engine.loop import REPLAYED, RUN, run_all
from raylab.engine.progress import Progress
from raylab.engine.restore import (
    Candidates,
    CheckpointFolder,
    checkpoint_candidates,
    checkpoint_name,
    export_folder,
)
from raylab.runtime.actors import ActorProxy, get_actor
from raylab.runtime.console import ForwardWarnings, WorkerProgress
from raylab.runtime.logging_callback import MetricsLogger

log = logging.getLogger("raylab")

#: Set by :func:`raylab.runtime.trainer.fit` for ``--workers 0``. Ray Train's in-process
#: mode neither persists checkpoints nor calls callbacks, so in that mode the context writes
#: checkpoints, metrics.jsonl and TensorBoard into the run folder itself and resumes from
#: it. The loop runs in the same process, so a module global reaches it.
LOCAL_RUN_DIR: Path | None = None
LOCAL_KEEP_CHECKPOINTS = 2
#: The driver's console for ``--workers 0`` (the loop runs in the driver's process).
LOCAL_PROGRESS: Progress | None = None


def _quiet_report_log() -> None:
    """Ray Train V2 logs every report at INFO from a logger named by its file path, which
    ``LoggingConfig`` does not reach; raylab's own progress and metrics.jsonl say the same.
    ``RAYLAB_TRAIN_LOG_LEVEL=INFO`` brings it back (as for the rest of Train's logs)."""
    try:  # a private module of Ray Train V2, absent from other Ray versions
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: leave its logging alone
        return
    level = os.environ.get("RAYLAB_TRAIN_LOG_LEVEL", "WARNING").upper()
    logging.getLogger(context.__file__).setLevel(level)


def run_checkpoints() -> Candidates:
    """The run's checkpoints to resume from, newest first: the latest (Ray Train's, or the
    newest of the run folder in-process), then each older one kept beside it."""
    if LOCAL_RUN_DIR is not None:
        return CheckpointFolder(LOCAL_RUN_DIR).candidates()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return []
    filesystem = checkpoint.filesystem
    try:
        paths = checkpoint_candidates(checkpoint.path, filesystem)
    except Exception as exc:  # listing remote storage failed: try the latest alone
        log.warning("could not list older checkpoints beside %s (%s)", checkpoint.path, exc)
        paths = [checkpoint.path]
    out: Candidates = [(checkpoint.path, checkpoint.as_directory)]
    for path in paths[1:]:
        older = ray.train.Checkpoint(path=path, filesystem=filesystem)
        out.append((path, older.as_directory))
    return out


class RayContext(WorkerContext):
    """A Ray Train worker (or the driver process with ``--workers 0``) as the engine's
    :class:`~raylab.engine.context.WorkerContext`."""

    def __init__(self, progress_token: str | None = None,
                 services: dict[str, str] | None = None, storage: str | None = None) -> None:
        _quiet_report_log()
        ctx = ray.train.get_context()
        rank = ctx.get_world_rank()
        progress: Progress | None = None
        if LOCAL_RUN_DIR is not None:
            progress = LOCAL_PROGRESS
        elif progress_token is not None:
            progress = WorkerProgress(progress_token)
            logging.getLogger("raylab").addHandler(ForwardWarnings(progress, rank))
        super().__init__(rank, ctx.get_world_size(), ray.train.torch.get_device(),
                         progress)
        self.services = dict(services or {})
        self.storage = storage

    def shard(self, name: str) -> Any:
        return ray.train.get_dataset_shard(self.dataset_name(name))

    def service(self, name: str) -> Any:
        """The run's actor ``name`` (started by the driver; ``services`` maps the name to
        the actor's) behind a plain interface."""
        if name not in self.services:
            raise KeyError(f"no service {name!r}; this run has {sorted(self.services)}")
        return ActorProxy(get_actor(self.services[name]))

    def checkpoint_candidates(self) -> Candidates:
        return run_checkpoints()

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None = None) -> None:
        """Every rank reports; rank 0 alone writes and attaches the checkpoint, in a folder
        named for the run (see :func:`raylab.engine.restore.checkpoint_name`)."""
        name = checkpoint_name(str(metrics.get(RUN) or "")) if checkpoint is not None else None
        if LOCAL_RUN_DIR is not None:
            self._report_in_process(LOCAL_RUN_DIR, metrics, checkpoint, name)
            return
        if checkpoint is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="raylab-ckpt-") as tmp:
            attached = None
            if self.is_chief:
                save_checkpoint(Path(tmp), **checkpoint)
                attached = ray.train.Checkpoint.from_directory(tmp)
            # The upload is synchronous, so the temporary folder may go once this returns.
            ray.train.report(metrics, checkpoint=attached, checkpoint_dir_name=name)

    def export_model(self, run: str, checkpoint: dict[str, Any]) -> str | None:
        """Rank 0 writes the run's final state to ``<experiment>/<run>/model`` (a local
        folder, or uploaded to the storage URI)."""
        if not self.is_chief or not self.storage:
            return None
        target = f"{self.storage.rstrip('/')}/{run or 'run'}/model"
        if "://" not in self.storage:
            return str(export_folder(target, **checkpoint))
        with tempfile.TemporaryDirectory(prefix="raylab-model-") as tmp:
            save_checkpoint(Path(tmp), **checkpoint)
            filesystem, path = pafs.FileSystem.from_uri(target)
            filesystem.create_dir(path, recursive=True)
            pafs.copy_files(tmp, path, destination_filesystem=filesystem)
        return target

    @staticmethod
    def _report_in_process(run_dir: Path, metrics: dict[str, Any],
                           checkpoint: dict[str, Any] | None, name: str | None) -> None:
        attached = None
        if checkpoint is not None:
            final = CheckpointFolder(run_dir, LOCAL_KEEP_CHECKPOINTS).save(name, **checkpoint)
            attached = ray.train.Checkpoint.from_directory(str(final))
        MetricsLogger(str(run_dir.parent)).after_report(None, [metrics], attached)
        ray.train.report(metrics, checkpoint=attached)


def train_function(loop_config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every Train worker's entry point: the method's runs on the engine's loop.

    ``loop_config``: ``task`` (the Task class), ``config_class`` and ``config`` (the
    method's config as a dict), ``runs`` (each run's task arguments: ``name``, ``split``,
    ``datasets``, ...), ``storage`` (the experiment folder or URI, where each run's final
    model goes), ``progress`` (the driver's progress token, or None) and ``services`` (service
    name -> the name of the run's actor providing it). Returns each run's final metrics
    (rank 0's come back as the Result's ``return_value``).
    """
    cfg = from_dict(loop_config["config_class"], loop_config["config"])
    task_cls = loop_config["task"]
    ctx = RayContext(loop_config.get("progress"), loop_config.get("services"),
                     loop_config.get("storage"))
    return run_all(loop_config["runs"], lambda run, c: task_cls(cfg, run, c), ctx, cfg.seed)


__all__ = ["LOCAL_KEEP_CHECKPOINTS", "LOCAL_PROGRESS", "LOCAL_RUN_DIR", "REPLAYED",
           "RayContext", "run_checkpoints", "train_function"]
