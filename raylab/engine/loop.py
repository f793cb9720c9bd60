"""The one epoch loop every method runs, with a few hooks (pure torch, no Ray).

A method supplies a :class:`Task`: its model and optimiser state, this worker's batches,
one training step, and its evaluation. The loop owns everything the methods share: seeding,
resuming from the newest usable checkpoint (and reporting a finished run's metrics again),
the epochs, the step loop with a look-ahead that tells the step it is the epoch's last (so
gradient accumulation always ends on a synchronised step), summing the step results over
workers, timing and throughput, the evaluation and checkpoint cadence, reports and progress.

One epoch::

    task.start_epoch(epoch)                         # e.g. ask a stream for its bucket
    for batch, last in look-ahead(task.batches(epoch)):
        sums = task.train_step(batch, state, last)  # {"samples": n, "loss": loss*n, ...}
    metrics = mean of the sums over all workers (train_<key>), samples/s
    metrics += task.end_epoch(epoch, state)         # lr, flushes, method checks
    metrics += task.evaluate(epoch, last_epoch)     # {} in epochs without evaluation
    ctx.report(metrics, checkpoint every checkpoint_every epochs and after the last)
    task.after_report(epoch, metrics)               # e.g. tell the stream it is done
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raylab.engine.batching import batch_rows, with_last
from raylab.engine.checkpoint import unwrap_model
from raylab.engine.context import WorkerContext
from raylab.engine.restore import Candidates, restore_latest
from raylab.errors import CheckpointError, RaylabError

log = logging.getLogger("raylab")

#: Marks a report that repeats the final metrics of a run restored from its last
#: checkpoint; the metrics log does not write it again.
REPLAYED = "replayed_from_checkpoint"
#: Every report names its run (``metrics.jsonl`` goes to ``<experiment>/<run>/``).
RUN = "run"
#: A checkpoint's record of the runs finished before it (their final metrics).
FINISHED_RUNS = "finished_runs"
#: Between a checkpoint folder's time stamp and its run's name.
RUN_SEPARATOR = "-"
#: Reported every epoch by runs of several workers (see :func:`replica_drift`).
REPLICA_DRIFT = "replica_drift"


class TrainingDiverged(RaylabError):
    """The training loss stopped being a finite number."""


@dataclass
class TrainState:
    """Where the run is: the epoch being trained (0-based), optimizer steps taken so far."""

    epoch: int = 0
    step: int = 0


class Task:
    """What a method plugs into :func:`run`. Subclasses set the attributes in ``__init__``
    and implement :meth:`batches` and :meth:`train_step`; every other hook is optional.

    Attributes:
        epochs: Length of the run (Tune's time axis: each report carries ``epoch``).
        checkpoint_every: Checkpoint every N epochs (and always after the last).
        meta: What the checkpoint's ``meta.json`` holds (method, config, class names...).
        sum_keys: The keys :meth:`train_step` sums besides ``samples``; each becomes
            ``train_<key>`` = its sum over workers / the samples.
        throughput_key: The report's rows/s key.
        batches_per_epoch: This worker's steps per epoch when known (the progress bar).
    """

    epochs: int = 1
    checkpoint_every: int = 1
    meta: dict[str, Any] = {}
    sum_keys: tuple[str, ...] = ("loss",)
    throughput_key: str = "samples_per_s"
    batches_per_epoch: int | None = None

    def state_objects(self) -> dict[str, Any]:
        """The objects a checkpoint saves and a resume restores: ``model`` and optionally
        ``optimizer``, ``scheduler``, ``scaler``, ``ema``."""
        raise NotImplementedError

    def state_extra(self) -> dict[str, Any]:
        """Further state for the checkpoint (tensors and plain values)."""
        return {}

    def on_restore(self, saved: dict[str, Any] | None, state: TrainState
                   ) -> dict[str, Any] | None:
        """Called after the resume (``saved``: the restored checkpoint, None on a fresh
        start) with ``state`` at the epoch to train next; load ``saved["extra"]`` here.
        Returns the checkpoint state the loop continues from (``saved`` unless the task
        adopted another one)."""
        return saved

    def start_epoch(self, epoch: int) -> None:
        """Before the epoch's first step."""

    def batches(self, epoch: int) -> Iterable[Any]:
        """This worker's training batches of ``epoch``."""
        raise NotImplementedError

    def train_step(self, batch: Any, state: TrainState, last: bool) -> dict[str, float]:
        """One step on ``batch`` (``last``: the epoch's last batch). Returns sums over the
        batch's rows: ``samples`` (rows) and each of :attr:`sum_keys`. Counts optimizer
        steps in ``state.step``."""
        raise NotImplementedError

    def end_epoch(self, epoch: int, state: TrainState) -> dict[str, Any]:
        """After the epoch's last step; returns metrics to add (e.g. ``lr``)."""
        return {}

    def evaluate(self, epoch: int, last: bool) -> dict[str, Any]:
        """Metrics over this epoch's evaluation data, the same on every worker; ``{}`` in
        epochs without evaluation. ``last``: the run's last epoch."""
        return {}

    def after_report(self, epoch: int, metrics: dict[str, Any]) -> None:
        """After the epoch was reported (and checkpointed)."""


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs from one seed (every worker starts alike)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_and_run(make_task: Callable[[WorkerContext], Task], ctx: WorkerContext,
                  seed: int, run_name: str = "") -> Task:
    """Seed, build the task (its model starts from the same weights on every worker) and
    :func:`run` it; returns the task."""
    seed_everything(seed)
    task = make_task(ctx)
    run(task, ctx, run_name)
    return task


def run_all(runs: list[dict[str, Any]], make_task: Callable[[dict[str, Any], WorkerContext],
                                                             Task],
            ctx: WorkerContext, seed: int) -> dict[str, dict[str, Any]]:
    """Train ``runs`` one after the other on this worker (e.g. the folds of a
    cross-validation in one Ray Train run: one start-up for all); returns each run's final
    metrics by name.

    Each run is a dict of task arguments with a unique ``name`` and optionally
    ``datasets`` (the task's dataset names -> the run's, see
    :meth:`WorkerContext.use_datasets`). A restarted worker skips the runs its newest
    checkpoint records as finished (their final metrics travel in every checkpoint),
    resumes the run that checkpoint belongs to, and starts the rest afresh.
    """
    names = [r["name"] for r in runs]
    candidates = ctx.checkpoint_candidates()
    start = _resumed_run(candidates, names)
    finished: dict[str, dict[str, Any]] = {}
    for index, args in enumerate(runs):
        name = args["name"]
        if index < start or name in finished:
            continue
        mine = [c for c in candidates if _run_of(c[0], names) == name] if index == start \
            else []
        ctx.use_datasets(args.get("datasets") or {})
        seed_everything(seed)
        task = make_task(args, ctx)
        finished[name] = run(task, ctx, name, candidates=mine, finished=finished)
    missing = [r for r in runs[:start] if r["name"] not in finished]
    if missing:  # the checkpoint that recorded them could not be restored: train them again
        log.warning("the results of run(s) %s were lost with their checkpoint; training "
                    "them again", [r["name"] for r in missing])
        finished.update(run_all(missing, make_task, ctx, seed))
    return {name: finished[name] for name in names}


def _run_of(label: str, names: list[str]) -> str | None:
    """The run a checkpoint folder belongs to, from its name ``checkpoint_<time>-<run>``;
    None for a folder named without one (a single-run folder from before runs had names)."""
    base = label.rstrip("/").rsplit("/", 1)[-1]
    return next((n for n in names if base.endswith(f"{RUN_SEPARATOR}{n}")), None)


def _resumed_run(candidates: Candidates, names: list[str]) -> int:
    """The index of the run the newest checkpoint belongs to (0 without checkpoints)."""
    if not candidates:
        return 0
    owner = _run_of(candidates[0][0], names)
    if owner is None:
        if len(names) == 1:
            return 0
        raise CheckpointError(f"{candidates[0][0]}: the newest checkpoint of this run belongs "
                              f"to none of its runs {names}: it was started with other runs; "
                              "start a new run (another --name)")
    return names.index(owner)


def run(task: Task, ctx: WorkerContext, run_name: str = "",
        candidates: Candidates | None = None,
        finished: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train ``task`` to ``task.epochs`` on this worker, resuming where a checkpoint says;
    returns the final metrics (with ``model``: where the chief exported the final weights,
    and ``seconds``).

    ``candidates``: the checkpoints to resume from (default: the context's). ``finished``:
    other runs' final metrics, kept in every checkpoint so that a restart knows them; a
    restored checkpoint's are merged into it.
    """
    finished = {} if finished is None else finished
    t0 = time.perf_counter()
    objects = task.state_objects()
    if candidates is None:
        candidates = ctx.checkpoint_candidates()
    next_epoch, step, saved = restore_latest(candidates, objects, ctx.max_over_ranks)
    state = TrainState(epoch=next_epoch, step=step)
    saved = task.on_restore(saved, state)
    if saved is not None:
        for name, result in (saved.get("extra", {}).get(FINISHED_RUNS) or {}).items():
            finished.setdefault(name, result)
    if saved is not None and state.epoch >= task.epochs:
        return _report_again(ctx, saved, task.epochs)
    if ctx.is_chief:
        ctx.progress.run_start(run_name, task.epochs, state.epoch)
    final: dict[str, Any] = {}
    for epoch in range(state.epoch, task.epochs):
        state.epoch = epoch
        metrics = _train_epoch(task, ctx, state, epoch, first=epoch == next_epoch)
        last = epoch + 1 == task.epochs
        metrics.update(task.evaluate(epoch, last))
        metrics[RUN] = run_name
        checkpoint = None
        if last or (epoch + 1) % task.checkpoint_every == 0:
            checkpoint = {**task.state_objects(), "epoch": epoch, "step": state.step,
                          "meta": task.meta,
                          # The metrics go into the checkpoint too (see _report_again).
                          "extra": {**task.state_extra(), "last_metrics": metrics,
                                    FINISHED_RUNS: dict(finished)}}
        if last and checkpoint is not None:
            final = dict(metrics, seconds=time.perf_counter() - t0,
                         model=ctx.export_model(run_name, checkpoint))
            checkpoint["extra"]["last_metrics"] = final
        ctx.report(metrics, checkpoint)
        if ctx.is_chief:
            ctx.progress.epoch_end(epoch, metrics)
        task.after_report(epoch, metrics)
    return final


def _train_epoch(task: Task, ctx: WorkerContext, state: TrainState, epoch: int,
                 first: bool) -> dict[str, Any]:
    """The epoch's steps; returns the metrics summed over workers."""
    keys = ("samples", *task.sum_keys)
    sums = dict.fromkeys(keys, 0.0)
    task.start_epoch(epoch)
    if ctx.is_chief:
        ctx.progress.epoch_start(epoch, task.batches_per_epoch)
    t0 = time.perf_counter()
    first_step = None
    for batch, last in with_last(task.batches(epoch)):
        out = task.train_step(batch, state, last)
        if first_step is None:
            first_step = time.time()
        loss = out.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise TrainingDiverged(f"the training loss is {loss} at epoch {epoch + 1}, step "
                                   f"{state.step}; lower optim.lr, or train in fp32")
        for key in keys:
            sums[key] += float(out.get(key, 0.0))
        if ctx.is_chief:
            ctx.progress.advance(int(out.get("samples", 0)) or batch_rows(batch))
    seconds = time.perf_counter() - t0
    totals = ctx.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
    samples = totals[0].item()
    metrics: dict[str, Any] = {"epoch": epoch + 1, "train_samples": int(samples),
                               task.throughput_key: samples / max(seconds, 1e-9)}
    for key, total in zip(keys[1:], totals[1:].tolist()):
        metrics[f"train_{key}"] = total / max(samples, 1.0)
    if first and first_step is not None:
        metrics["first_step_unix_time"] = first_step  # start-up cost, see `raylab bench`
    metrics.update(task.end_epoch(epoch, state))
    if ctx.world_size > 1:
        metrics[REPLICA_DRIFT] = replica_drift(task.state_objects()["model"], ctx)
    return metrics


def replica_drift(model: torch.nn.Module, ctx: WorkerContext) -> float:
    """How far the workers' copies of ``model`` are apart: the largest difference, over
    workers, of two fingerprints of the weights (their sum and sum of squares, in float64).
    Data-parallel replicas are identical, so this is 0.0; anything else means the
    gradients were not all-reduced on some step (reported every epoch as a check)."""
    fingerprint = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for p in unwrap_model(model).parameters():
            values = p.detach().double()
            fingerprint += torch.stack([values.sum(), values.pow(2).sum()]).cpu()
    top = ctx.all_reduce(fingerprint, "max")
    bottom = ctx.all_reduce(fingerprint, "min")
    return float((top - bottom).abs().max().item())


def _report_again(ctx: WorkerContext, saved: dict[str, Any], epochs: int
                  ) -> dict[str, Any]:
    """The restored checkpoint is the run's last: report its metrics once more (and return
    them, the run's final metrics).

    A run interrupted after its final checkpoint but before Tune saw the trial end is
    restored with nothing left to train. Without a report Tune would keep the trial's
    older result, so the final metrics saved in the checkpoint are reported again.
    """
    final = dict((saved.get("extra") or {}).get("last_metrics") or {"epoch": epochs})
    metrics = {k: v for k, v in final.items() if k not in ("model", "seconds")}
    metrics[REPLAYED] = True
    ctx.report(metrics, None)
    return final


__all__ = ["FINISHED_RUNS", "REPLAYED", "RUN", "RUN_SEPARATOR", "Task", "TrainState",
           "TrainingDiverged", "build_and_run", "run", "run_all", "seed_everything"]
