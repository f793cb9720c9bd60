"""Helpers for code that runs inside Ray Train workers (or in-process with 0 workers).

A method's train loop uses these and never touches ``torch.distributed`` or
``ray.train`` directly, so the same loop runs on 1 CPU worker or N GPU workers.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raylab.runtime.checkpoint import load_checkpoint, save_checkpoint
from raylab.runtime.precision import autocast  # noqa: F401  (re-exported for loops)

log = logging.getLogger("raylab")

#: Set by :func:`raylab.runtime.trainer.fit` for ``--workers 0``. Ray Train's in-process
#: mode neither persists checkpoints nor calls callbacks, so in that mode these helpers write
#: checkpoints, metrics.jsonl and TensorBoard into the run folder themselves and resume from
#: it. The loop runs in the same process, so a module global reaches it.
LOCAL_RUN_DIR: Path | None = None
LOCAL_KEEP_CHECKPOINTS = 2


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


def _quiet_report_log() -> None:
    """Ray Train V2 logs every report at INFO from a logger named by its file path, which
    ``LoggingConfig`` does not reach; raylab's own progress and metrics.jsonl say the same.
    ``RAYLAB_TRAIN_LOG_LEVEL=INFO`` brings it back (as for the rest of Train's logs)."""
    import os

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: leave its logging alone
        return
    level = os.environ.get("RAYLAB_TRAIN_LOG_LEVEL", "WARNING").upper()
    logging.getLogger(context.__file__).setLevel(level)


def worker_info() -> WorkerInfo:
    """Rank, world size and the device Ray assigned to this worker."""
    _quiet_report_log()
    ctx = ray.train.get_context()
    return WorkerInfo(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Move to the worker's device and wrap in DDP when there are several workers."""
    if distributed():
        return ray.train.torch.prepare_model(model)
    return model.to(ray.train.torch.get_device())


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over workers into a new tensor on its own device; a copy with one.

    Ray Train sets up NCCL on GPU workers and gloo on CPU ones. NCCL reduces only CUDA
    tensors, so CPU tensors (metric counters) take a round trip through this worker's GPU
    there; with gloo the tensor is reduced where it is.
    """
    out = tensor.clone()
    if not distributed():
        return out
    if dist.get_backend() == "nccl" and out.device.type != "cuda":
        on_gpu = out.to(ray.train.torch.get_device())
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        return on_gpu.to(tensor.device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def restore_latest(**objects: Any) -> tuple[int, int, dict[str, Any] | None]:
    """Restore from the run's latest checkpoint, if Ray Train has one.

    Returns ``(next_epoch, step, state)``; ``(0, 0, None)`` on a fresh start.
    """
    from raylab.runtime.checkpoint import restore_checkpoint

    if LOCAL_RUN_DIR is not None:
        saved = sorted(LOCAL_RUN_DIR.glob("checkpoint_*/state.pt"))
        if not saved:
            return 0, 0, None
        state = load_checkpoint(saved[-1].parent)
        source = str(saved[-1].parent)
    else:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return 0, 0, None
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(folder)
        source = checkpoint.path
    epoch, step = restore_checkpoint(state, **objects)
    log.info("resumed from %s at epoch %d", source, epoch + 1)
    return epoch + 1, step, state


#: Marks a report that repeats the final metrics of a run restored from its last
#: checkpoint; MetricsLogger does not write it to metrics.jsonl again.
REPLAYED = "replayed_from_checkpoint"


def finished_already(state: dict[str, Any] | None, next_epoch: int, epochs: int) -> bool:
    """True when the restored checkpoint is the run's last one; then report its metrics.

    A run interrupted after its final checkpoint but before Tune saw the trial end is
    restored with nothing left to train. Without a report Tune would keep the trial's
    older result, so the final metrics saved in the checkpoint are reported once more.
    """
    if state is None or next_epoch < epochs:
        return False
    metrics = dict(state.get("extra", {}).get("last_metrics") or {"epoch": epochs})
    metrics[REPLAYED] = True
    ray.train.report(metrics)
    return True


def report(metrics: dict[str, Any], checkpoint: dict[str, Any] | None = None) -> None:
    """Report metrics from every rank; rank 0 also saves and attaches a checkpoint.

    ``checkpoint`` holds the keyword arguments of :func:`save_checkpoint`. Every rank must
    call this (Ray Train synchronises reports); only rank 0 writes files. The metrics are
    saved in the checkpoint too (see :func:`finished_already`).
    """
    if checkpoint is not None:
        extra = dict(checkpoint.get("extra") or {}, last_metrics=metrics)
        checkpoint = dict(checkpoint, extra=extra)
    if LOCAL_RUN_DIR is not None:
        _report_in_process(LOCAL_RUN_DIR, metrics, checkpoint)
        return
    if checkpoint is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="raylab-ckpt-") as tmp:
        attached = None
        if ray.train.get_context().get_world_rank() == 0:
            save_checkpoint(Path(tmp), **checkpoint)
            attached = ray.train.Checkpoint.from_directory(tmp)
        # The upload is synchronous, so the temporary folder may go once this returns.
        ray.train.report(metrics, checkpoint=attached)


def _report_in_process(run_dir: Path, metrics: dict[str, Any],
                       checkpoint: dict[str, Any] | None) -> None:
    from raylab.runtime.logging_callback import MetricsLogger

    attached = None
    if checkpoint is not None:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S") + f".{time.time_ns() % 10**9:09d}"
        folder = save_checkpoint(run_dir / f".tmp_checkpoint_{stamp}", **checkpoint)
        final = folder.rename(run_dir / f"checkpoint_{stamp}")
        for old in sorted(run_dir.glob("checkpoint_*"))[:-LOCAL_KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        attached = ray.train.Checkpoint.from_directory(str(final))
    MetricsLogger(str(run_dir)).after_report(None, [metrics], attached)
    ray.train.report(metrics, checkpoint=attached)


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    """``with timed() as t: ...`` then ``t["seconds"]``."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start
