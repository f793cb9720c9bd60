"""Helpers for code that runs inside Ray Train workers (or in-process with 0 workers).

A method's train loop uses these and never touches ``torch.distributed`` or
``ray.train`` directly, so the same loop runs on 1 CPU worker or N GPU workers.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raylab.errors import CheckpointError
from raylab.runtime.checkpoint import (
    check_compatible,
    load_checkpoint,
    load_meta,
    restore_checkpoint,
    save_checkpoint,
    short_reason,
)
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


CHECKPOINT_PREFIX = "checkpoint_"


def list_checkpoints(run_dir: str | os.PathLike, filesystem: Any | None = None) -> list[str]:
    """Paths of the ``checkpoint_*`` folders directly inside ``run_dir``, newest first.

    Both Ray Train (``checkpoint_2025-01-31_12-00-00.123456``) and the in-process mode
    name checkpoint folders by their creation time, so name order is age order; hidden
    temporary folders (``.tmp_checkpoint_*``) are not checkpoints. ``filesystem`` is a
    ``pyarrow.fs.FileSystem`` (a Ray checkpoint's ``filesystem``, e.g. S3) or None for the
    local disk. An unreadable or missing ``run_dir`` lists nothing.
    """
    if filesystem is None:
        try:
            names = [e.name for e in os.scandir(run_dir)
                     if e.name.startswith(CHECKPOINT_PREFIX) and e.is_dir()]
        except OSError:
            return []
        return [os.path.join(run_dir, n) for n in sorted(names, reverse=True)]
    from pyarrow import fs as pafs

    try:
        infos = filesystem.get_file_info(pafs.FileSelector(str(run_dir),
                                                           allow_not_found=True))
    except OSError:
        return []
    names = [i.base_name for i in infos
             if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX)]
    return [posixpath.join(str(run_dir), n) for n in sorted(names, reverse=True)]


def checkpoint_candidates(latest: str, filesystem: Any | None = None) -> list[str]:
    """``latest`` and then the older checkpoints kept beside it, newest first.

    Ray Train keeps ``num_to_keep`` checkpoints as sibling folders of the run's storage
    folder; :func:`restore_latest` falls back to them when ``latest`` is unusable. Only
    folders older than ``latest`` count: a newer one was never registered by Ray Train
    (an upload cut short). A ``latest`` not named ``checkpoint_*`` has no known siblings.
    """
    latest = latest.rstrip("/")
    join = os.path if filesystem is None else posixpath
    parent, name = join.split(latest)
    if not name.startswith(CHECKPOINT_PREFIX):
        return [latest]
    older = [p for p in list_checkpoints(parent, filesystem) if join.basename(p) < name]
    return [latest, *older]


Opener = Callable[[], AbstractContextManager[str]]


def _run_candidates() -> list[tuple[str, Opener]]:
    """(label, opener of a local folder) of each checkpoint to try, newest first."""
    if LOCAL_RUN_DIR is not None:
        return [(path, lambda path=path: nullcontext(path))
                for path in list_checkpoints(LOCAL_RUN_DIR)]
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return []
    filesystem = checkpoint.filesystem
    try:
        paths = checkpoint_candidates(checkpoint.path, filesystem)
    except Exception as exc:  # listing remote storage failed: try the latest alone
        log.warning("could not list older checkpoints beside %s (%s)", checkpoint.path, exc)
        paths = [checkpoint.path]
    out: list[tuple[str, Opener]] = [(checkpoint.path, checkpoint.as_directory)]
    for path in paths[1:]:
        older = ray.train.Checkpoint(path=path, filesystem=filesystem)
        out.append((path, older.as_directory))
    return out


@dataclass
class _Unusable:
    label: str
    error: CheckpointError
    unfit: bool  # readable, but does not fit the objects (another configuration)


def _load_usable(label: str, opener: Opener, objects: dict[str, Any]
                 ) -> dict[str, Any] | _Unusable:
    """The checked state of one checkpoint, or why it cannot be used."""
    try:
        with opener() as folder:
            load_meta(folder)  # meta.json is written last: without it the write was cut
            state = load_checkpoint(folder)
    except CheckpointError as exc:
        return _Unusable(label, exc, unfit=False)
    except Exception as exc:  # downloading from remote storage failed, ...
        return _Unusable(label, CheckpointError(
            f"{label}: cannot read checkpoint ({short_reason(exc)})"), unfit=False)
    try:
        check_compatible(state, where=label, **objects)
    except CheckpointError as exc:
        return _Unusable(label, exc, unfit=True)
    return state


def _first_usable(candidates: list[tuple[str, Opener]], start: int, objects: dict[str, Any],
                  skipped: list[_Unusable]) -> tuple[int, dict[str, Any] | None]:
    """Index and state of the first usable candidate from ``start`` (len: none is)."""
    for index in range(start, len(candidates)):
        label, opener = candidates[index]
        loaded = _load_usable(label, opener, objects)
        if not isinstance(loaded, _Unusable):
            return index, loaded
        log.warning("skipping unusable checkpoint: %s%s", loaded.error,
                    "; trying the one before it" if index + 1 < len(candidates) else "")
        skipped.append(loaded)
    return len(candidates), None


def _oldest_over_ranks(index: int) -> int:
    """The largest ``index`` over all workers (the newest checkpoint every rank can use)."""
    if not distributed():
        return index
    value = torch.tensor([index], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        value = value.to(ray.train.torch.get_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def restore_latest(**objects: Any) -> tuple[int, int, dict[str, Any] | None]:
    """Restore ``objects`` from the run's newest usable checkpoint.

    ``objects`` are the keyword arguments of
    :func:`~raylab.runtime.checkpoint.restore_checkpoint` (``model``, ``optimizer``,
    ``scheduler``, ``scaler``, ``ema``). Returns ``(next_epoch, step, state)``, or
    ``(0, 0, None)`` on a fresh start.

    The latest checkpoint is tried first (Ray Train's, or the newest ``checkpoint_*`` of
    the run folder in-process), then each older one kept beside it, newest first. A
    checkpoint that cannot be used (truncated or corrupt ``state.pt``, missing or broken
    ``meta.json``, not a training state, weights that do not fit the model) is skipped
    with a WARNING naming it and why. Every check runs before anything is loaded, so a
    skipped checkpoint never leaves the model half-restored.

    When no checkpoint can be read at all, training starts from scratch with a WARNING
    rather than failing: the damaged files hold no state to save, and an error would make
    the run impossible to continue under its name. Nothing is deleted; the run's new
    checkpoints replace the damaged ones as usual. But when readable checkpoints exist
    and none fits the model (the run was started with another configuration), this raises
    :class:`~raylab.errors.CheckpointError`: starting afresh would push that run's good
    checkpoints out.

    With several workers, all ranks resume from the same checkpoint: the newest one
    that every rank could use.
    """
    candidates = _run_candidates()
    if not candidates:
        return 0, 0, None
    skipped: list[_Unusable] = []
    index, state = _first_usable(candidates, 0, objects, skipped)
    agreed = _oldest_over_ranks(index)
    if agreed != index:
        log.warning("another worker could not use checkpoint %s; resuming from an older one",
                    candidates[index][0])
        index, state = _first_usable(candidates, agreed, objects, skipped)
        if index != agreed:
            raise CheckpointError(
                f"{candidates[agreed][0]}: readable by other workers but not by this one; "
                "check that every node sees the same storage")
    if state is None:
        unfit = [s for s in skipped if s.unfit]
        if unfit:
            raise CheckpointError(
                f"{unfit[0].error} -- the run was started with another configuration: "
                "resume it with that configuration or start a new run under another --name")
        log.warning("none of the %d checkpoint(s) of this run could be read; TRAINING "
                    "STARTS FROM SCRATCH (the unreadable ones are left in %s)",
                    len(candidates), os.path.dirname(candidates[0][0].rstrip("/")))
        return 0, 0, None
    label = candidates[index][0]
    epoch, step = restore_checkpoint(state, where=label, **objects)
    if skipped:
        log.warning("resumed from the older checkpoint %s at epoch %d: %d newer one(s) "
                    "could not be used", label, epoch + 1, len(skipped))
    else:
        log.info("resumed from %s at epoch %d", label, epoch + 1)
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
        # One clock reading for both parts, so that names sort in time order
        # (restore_latest relies on it).
        now = time.time_ns()
        stamp = (time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(now // 10**9))
                 + f".{now % 10**9:09d}")
        tmp = run_dir / f".tmp_checkpoint_{stamp}"
        try:
            final = save_checkpoint(tmp, **checkpoint).rename(run_dir / f"checkpoint_{stamp}")
        except BaseException:  # disk full, Ctrl-C: leave no half-written folder behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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
