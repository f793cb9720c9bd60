"""Finding and restoring a run's newest usable checkpoint, and keeping checkpoints in a
folder (pure torch and files; the runtime adds where Ray Train keeps them).

A checkpoint is a ``checkpoint_<time>`` folder (:mod:`raylab.engine.checkpoint`). Both Ray
Train (``checkpoint_2025-01-31_12-00-00.123456``) and :class:`CheckpointFolder` name them
by creation time, so name order is age order; hidden temporary folders
(``.tmp_checkpoint_*``) are not checkpoints.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylab.engine.checkpoint import (
    check_compatible,
    load_checkpoint,
    load_meta,
    restore_checkpoint,
    save_checkpoint,
    short_reason,
)
from raylab.errors import CheckpointError

log = logging.getLogger("raylab")

CHECKPOINT_PREFIX = "checkpoint_"

#: Opens a checkpoint as a local folder for the duration of a ``with`` block (a remote one
#: is downloaded first).
Opener = Callable[[], AbstractContextManager[str]]
#: (label, opener) of each checkpoint to try, newest first.
Candidates = list[tuple[str, Opener]]


def list_checkpoints(run_dir: str | os.PathLike, filesystem: Any | None = None) -> list[str]:
    """Paths of the ``checkpoint_*`` folders directly inside ``run_dir``, newest first.

    ``filesystem`` is a ``pyarrow.fs.FileSystem`` (e.g. S3) or None for the local disk. An
    unreadable or missing ``run_dir`` lists nothing.
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

    Only folders older than ``latest`` count: a newer one was never registered (an upload
    cut short). A ``latest`` not named ``checkpoint_*`` has no known siblings.
    """
    latest = latest.rstrip("/")
    join = os.path if filesystem is None else posixpath
    parent, name = join.split(latest)
    if not name.startswith(CHECKPOINT_PREFIX):
        return [latest]
    older = [p for p in list_checkpoints(parent, filesystem) if join.basename(p) < name]
    return [latest, *older]


def folder_candidates(run_dir: str | os.PathLike) -> Candidates:
    """The checkpoints of a local run folder as restore candidates, newest first."""
    return [(path, lambda path=path: nullcontext(path)) for path in list_checkpoints(run_dir)]


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


def _first_usable(candidates: Candidates, start: int, objects: dict[str, Any],
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


def restore_latest(candidates: Candidates, objects: dict[str, Any],
                   max_over_ranks: Callable[[int], int] = lambda i: i
                   ) -> tuple[int, int, dict[str, Any] | None]:
    """Restore ``objects`` from the newest usable checkpoint of ``candidates``.

    ``objects`` are the keyword arguments of
    :func:`~raylab.engine.checkpoint.restore_checkpoint` (``model``, ``optimizer``,
    ``scheduler``, ``scaler``, ``ema``). Returns ``(next_epoch, step, state)``, or
    ``(0, 0, None)`` on a fresh start.

    A checkpoint that cannot be used (truncated or corrupt ``state.pt``, missing or broken
    ``meta.json``, not a training state, weights that do not fit the model) is skipped
    with a WARNING naming it and why, and the next older one is tried. Every check runs
    before anything is loaded, so a skipped checkpoint never leaves the model
    half-restored.

    When no checkpoint can be read at all, training starts from scratch with a WARNING
    rather than failing: the damaged files hold no state to save, and an error would make
    the run impossible to continue under its name. But when readable checkpoints exist
    and none fits the model (the run was started with another configuration), this raises
    :class:`~raylab.errors.CheckpointError`: starting afresh would push that run's good
    checkpoints out.

    With several workers, ``max_over_ranks`` (the largest index over all ranks) makes
    every rank resume from the same checkpoint: the newest one that all could use.
    """
    if not candidates:
        return 0, 0, None
    skipped: list[_Unusable] = []
    index, state = _first_usable(candidates, 0, objects, skipped)
    agreed = max_over_ranks(index)
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


def checkpoint_name(run: str = "") -> str:
    """``checkpoint_<local time to the nanosecond>[-<run>]``: names sort in time order (one
    clock reading for both parts), and a run's checkpoints carry its name."""
    now = time.time_ns()
    stamp = (time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(now // 10**9))
             + f".{now % 10**9:09d}")
    return f"{CHECKPOINT_PREFIX}{stamp}" + (f"-{run}" if run else "")


def export_folder(folder: str | os.PathLike, **checkpoint: Any) -> Path:
    """Write a complete checkpoint to ``folder``, replacing what is there only once the new
    one is whole (written beside it under a hidden name, then swapped in)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp_{folder.name}_{time.time_ns()}")
    old = folder.with_name(f".old_{folder.name}_{time.time_ns()}")
    try:
        save_checkpoint(tmp, **checkpoint)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
    return folder


class CheckpointFolder:
    """Checkpoints written straight into a local run folder, the newest ``keep`` kept.

    What Ray Train does for a run on several workers, done by hand where it does not
    (in-process runs, plain-torch runs and tests). Each checkpoint is written under a
    hidden temporary name and renamed, so a cut write leaves no ``checkpoint_*`` folder.
    """

    def __init__(self, run_dir: str | os.PathLike, keep: int = 2) -> None:
        self.run_dir = Path(run_dir)
        self.keep = keep

    def save(self, name: str | None = None, **checkpoint: Any) -> Path:
        """Write ``checkpoint`` (the keyword arguments of ``save_checkpoint``) into a new
        folder, by default :func:`checkpoint_name`."""
        name = name or checkpoint_name()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / f".tmp_{name}"
        try:
            final = save_checkpoint(tmp, **checkpoint).rename(self.run_dir / name)
        except BaseException:  # disk full, Ctrl-C: leave no half-written folder behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in sorted(self.run_dir.glob(f"{CHECKPOINT_PREFIX}*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def candidates(self) -> Candidates:
        return folder_candidates(self.run_dir)
