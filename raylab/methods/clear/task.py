"""A CLEAR learner on a worker: one bucket of the stream per epoch of the engine's loop.

The stream (a :class:`~raylab.continual.stream.StreamService`: the named actor in Ray
Train workers, the object itself in tests and benchmarks) owns the protocol; the learner
asks it for each bucket, trains with the strategy's hooks, evaluates every bucket and tells
it. Order per bucket ``t`` (what makes a restart safe):

1. ``start_epoch``: ``next_bucket(rank, world_size)``, this worker's shard of the training
   rows and the replay buffer's ids; a fresh optimizer (as avalanche builds one per
   experience) and the strategy's ``before_bucket``;
2. the steps (the bucket's rows, ``optim.epochs`` passes), then ``after_bucket``;
3. evaluation on every labelled bucket's test rows; the per-bucket counts are summed over
   workers with one all-reduce, so every worker holds the same accuracies;
4. the engine reports and checkpoints (model, strategy state and the accuracies of ``t``);
5. ``after_report``: all workers wait for each other (a collective), then every worker
   calls ``finish_bucket(t, accuracies)``: the first records row ``R[t]`` and advances the
   cursor, the others are no-ops (the stream accepts an identical repeat).

A run restored from the checkpoint of step 4 repeats step 5 first (a no-op if it happened
before the crash), so no bucket is trained twice or skipped.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from raylab.continual.loop import BucketTrainer
from raylab.continual.rows import FeatureRows, FrozenEmbedding, ImageRows
from raylab.continual.runner import Prepare, evaluate_buckets, replay_sampler, train_batches
from raylab.continual.strategies.base import Bucket
from raylab.continual.stream import StreamError
from raylab.engine.batching import per_worker_batch
from raylab.engine.checkpoint import check_compatible, load_checkpoint, restore_checkpoint
from raylab.engine.context import WorkerContext
from raylab.engine.keys import ROWS, metric_key
from raylab.engine.loop import Task, TrainState
from raylab.engine.restore import list_checkpoints
from raylab.errors import CheckpointError
from raylab.methods.clear.config import ClearConfig, bucket_settings, make_strategy
from raylab.models.backbones import load_backbone

log = logging.getLogger("raylab")

#: The run's stream service, by this name in the worker context.
STREAM = "stream"
#: An optional service: a row store already decoded (benchmarks running many runs over one
#: stream); without it each task decodes the stream itself.
ROW_STORE = "rows"


def learner_model(cfg: ClearConfig, num_classes: int, feature_dim: int | None = None
                  ) -> nn.Module:
    """What trains: the timm network ``cfg.model`` from scratch, or (with ``cfg.features``)
    a linear classifier over ``feature_dim``-wide frozen features."""
    if cfg.features:
        return nn.Linear(int(feature_dim), num_classes)
    import timm

    return timm.create_model(cfg.model, pretrained=False, num_classes=num_classes)


def build_learner(cfg: ClearConfig, num_classes: int, input_size: int,
                  device: torch.device | str) -> tuple[nn.Module, Any]:
    """The trainable model and the row store: a timm network over images, or a linear
    classifier over a frozen DINO teacher's cached features."""
    images = ImageRows(cfg.data, input_size)
    if not cfg.features:
        return learner_model(cfg, num_classes), images
    embed = FrozenEmbedding(load_backbone(cfg.features), device)
    dim = int(embed(torch.zeros(1, 3, input_size, input_size, dtype=torch.uint8)).shape[-1])
    return learner_model(cfg, num_classes, dim), FeatureRows(images, embed)


def bucket_metrics(split: str, index: int, accuracies: dict[int, float],
                   finished_rows: list[list[float | None]]) -> dict[str, Any]:
    """Metrics of one finished bucket, with running means over the rows of R so far.

    ``finished_rows``: the rows of R of the buckets finished before this one.
    """
    key = lambda name: metric_key(split, name)  # noqa: E731
    row = [accuracies[b] for b in sorted(accuracies)]
    rows = [list(r) for r in finished_rows] + [row]
    nexts = [r[k + 1] for k, r in enumerate(rows) if k + 1 < len(r)]
    seen = [r[j] for k, r in enumerate(rows) for j in range(k + 1)]
    out = {key("in_domain_acc"): row[index], key("seen_acc"): sum(seen) / len(seen)}
    out.update({key(f"acc_bucket_{b}"): a for b, a in sorted(accuracies.items())})
    if index + 1 < len(row):
        out[key("next_acc")] = row[index + 1]
    if nexts:
        out[key("next_domain")] = sum(nexts) / len(nexts)
    return out


def checkpoint_bucket(state: dict[str, Any] | None) -> int | None:
    """The bucket a checkpoint was taken after (None: no checkpoint)."""
    return None if state is None else int(state["extra"]["stream"]["bucket"])


def catch_up(stream: dict[str, Any], state: dict[str, Any] | None, run_dir: str | None,
             model: nn.Module) -> dict[str, Any] | None:
    """Reconcile the stream with the checkpoint a (re)started worker restored.

    Each bucket is checkpointed (rank 0 writes the folder synchronously) before the stream
    is told it is finished, but Ray Train registers a checkpoint only when its controller
    takes in the report, which a worker lost right after the report never sees. The stream
    may then be ahead of the checkpoint Ray Train hands back: training on from there would
    silently skip the buckets in between. So when the stream has finished a bucket later
    than ``state`` covers, the run folder's own checkpoint of that bucket (written, not
    registered) is loaded into ``model`` and returned; None when ``state`` is current.

    Raises:
        StreamError: The stream is ahead and no checkpoint of its last bucket exists.
    """
    finished, order = stream["finished"], stream["buckets"]
    covered = checkpoint_bucket(state)
    done = 0 if covered is None else order.index(covered) + 1
    if len(finished) <= done:
        return None  # the checkpoint is as far as the stream, or one bucket further
    want = finished[-1]
    for path in list_checkpoints(run_dir) if run_dir else []:  # newest first
        try:
            candidate = load_checkpoint(path)
            check_compatible(candidate, where=path, model=model)
        except CheckpointError:
            continue
        if checkpoint_bucket(candidate) == want:
            restore_checkpoint(candidate, where=path, model=model)
            return candidate
    raise StreamError(f"the stream has finished buckets {finished} but the newest checkpoint "
                      f"of {run_dir} covers only {finished[:done]}; the checkpoint of bucket "
                      f"{want} is missing, so the run cannot continue exactly: start a new "
                      "run (another --name)")


class ClearTask(Task):
    """One CLEAR learner: epoch ``i`` of the engine is the stream's bucket ``i``.

    ``run`` (plain data from the driver): ``split`` (``test``, or ``val`` for a validating
    stream), ``num_classes``, ``input_size``, ``buckets`` (how many labelled buckets),
    ``run_dir`` (the run folder, for :func:`catch_up`; None when unknown) and
    ``checkpoint_meta``. The stream is the context's service :data:`STREAM`.
    """

    sum_keys = ("loss",)
    throughput_key = "samples_per_s"
    checkpoint_every = 1

    def __init__(self, cfg: ClearConfig, run: dict[str, Any], ctx: WorkerContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.split: str = run["split"]
        self.epochs = int(run["buckets"])
        self.meta = run["checkpoint_meta"]
        self.run_dir: str | None = run.get("run_dir")
        self.settings = bucket_settings(cfg)
        self.client = ctx.service(STREAM)
        model, self.rows = self.build_learner(run)
        self.model = ctx.prepare_model(model)
        self.strategy = make_strategy(cfg)
        self.strategy.all_reduce = ctx.all_reduce_sum if ctx.world_size > 1 else None
        self.prepare = Prepare(ctx.device, cfg.padding)
        self.per_worker = per_worker_batch(self.settings.batch_size, ctx.world_size)
        self.info: dict[str, Any] = {}
        self.accuracies: dict[int, float] = {}
        self.trainer: BucketTrainer | None = None
        self._batches: Any = None
        self._t0 = 0.0

    def build_learner(self, run: dict[str, Any]) -> tuple[nn.Module, Any]:
        """The trainable model and the row store (:func:`build_learner`, or the context's
        decoded row store :data:`ROW_STORE` when it has one)."""
        try:
            rows = self.ctx.service(ROW_STORE)
        except KeyError:
            return build_learner(self.cfg, run["num_classes"], run["input_size"],
                                 self.ctx.device)
        dim = None
        if self.cfg.features:  # the width of the cached features
            first = self.client.test_ids(self.client.state()["buckets"][0])[0]
            dim = int(rows.fetch([first])[0].shape[-1])
        return learner_model(self.cfg, run["num_classes"], dim), rows

    # ------------------------------------------------------------------ checkpoint state

    def state_objects(self) -> dict[str, Any]:
        return {"model": self.model}

    def state_extra(self) -> dict[str, Any]:
        return {"strategy": self.strategy.state_dict(),
                "stream": {"bucket": int(self.info["bucket"]),
                           "accuracies": {str(b): a for b, a in self.accuracies.items()}}}

    def on_restore(self, saved: dict[str, Any] | None, state: TrainState
                   ) -> dict[str, Any] | None:
        adopted = catch_up(self.client.state(), saved, self.run_dir, self.model)
        if adopted is not None:
            # Its report never reached Ray Train: report it now, which also registers it.
            saved = adopted
            state.epoch = int(adopted["epoch"]) + 1
            extra = {k: v for k, v in adopted["extra"].items() if k != "last_metrics"}
            self.ctx.report(dict(adopted["extra"]["last_metrics"]),
                            {"model": self.model, "epoch": adopted["epoch"], "meta": self.meta,
                             "extra": extra})
        if saved is not None:
            self.strategy.load_state_dict(saved["extra"]["strategy"])
            resume = saved["extra"]["stream"]
            accuracies = {int(j): float(a) for j, a in resume["accuracies"].items()}
            out = self.client.finish_bucket(int(resume["bucket"]), accuracies)
            log.info("resumed after bucket %s (%s)", resume["bucket"],
                     "the stream had recorded it" if out.get("replayed") else "recorded it now")
        return saved

    # ------------------------------------------------------------------ one bucket

    def start_epoch(self, epoch: int) -> None:
        ctx, s = self.ctx, self.settings
        info = self.client.next_bucket(ctx.rank, ctx.world_size)
        if info is None or int(info["index"]) != epoch:
            got = "nothing" if info is None else f"bucket index {info['index']}"
            raise StreamError(f"the stream released {got} for bucket index {epoch}; its "
                              "state belongs to another run: start a new run (another --name)")
        self.info = info
        t = int(info["bucket"])
        counts = {int(k): int(v) for k, v in info["class_counts"].items()}
        optimizer = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad],
                                    lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
        self._batches = train_batches(self.rows, info["train_ids"], self.per_worker,
                                      self.prepare, s.seed, t, ctx.rank)
        self.trainer = BucketTrainer(
            self.model, self.strategy, optimizer, ctx.device, s.precision,
            bucket=Bucket(int(info["index"]), counts),
            replay=replay_sampler(self.rows, info["replay_ids"], self.prepare, s.seed, t,
                                  ctx.rank))
        self._t0 = time.perf_counter()

    def batches(self, epoch: int) -> Any:
        for _ in range(self.settings.epochs):
            yield from self._batches()

    def train_step(self, batch: Any, state: TrainState, last: bool) -> dict[str, float]:
        assert self.trainer is not None
        loss, n, _ = self.trainer.step(batch)
        state.step += 1
        return {"samples": n, "loss": loss * n}

    def end_epoch(self, epoch: int, state: TrainState) -> dict[str, Any]:
        assert self.trainer is not None
        self.trainer.finish(self._batches)
        replayed = self.ctx.all_reduce_sum(torch.tensor([float(self.trainer.replayed)]))
        return {"bucket": int(self.info["bucket"]), "replay_samples": int(replayed.item()),
                "bucket_seconds": time.perf_counter() - self._t0}

    def evaluate(self, epoch: int, last: bool) -> dict[str, Any]:
        ctx = self.ctx
        self.accuracies, scored = evaluate_buckets(
            self.model, self.rows, self.client, self.info["eval_buckets"], self.prepare,
            self.settings, ctx.device, ctx.rank, ctx.world_size, ctx.all_reduce_sum)
        finished = self.client.metrics()["matrix"][:epoch]
        metrics = bucket_metrics(self.split, epoch, self.accuracies, finished)
        metrics[metric_key(self.split, ROWS)] = scored
        return metrics

    def after_report(self, epoch: int, metrics: dict[str, Any]) -> None:
        # A collective as a barrier: no worker tells the stream before every worker's
        # report returned, i.e. before rank 0's checkpoint is fully written (Ray Train's
        # report does not wait for the other ranks).
        self.ctx.barrier()
        self.client.finish_bucket(int(self.info["bucket"]), self.accuracies)
