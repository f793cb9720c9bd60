"""The skill model's training on a worker: the engine's hooks for SkillNet on windows.

Each step trains on this worker's share of a global batch of windows; each evaluation
scores this worker's share of the held-out windows and all-reduces the confusion counts,
the loss and a fixed-size ``[n_trials, 3]`` table of per-trial window votes, so every
worker holds the same (global) result.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raylab.engine.batching import per_worker_batch
from raylab.engine.context import WorkerContext
from raylab.engine.keys import ROWS, metric_key
from raylab.engine.loop import Task, TrainState
from raylab.engine.precision import autocast
from raylab.engine.shards import EpochBatches, EvalBatches
from raylab.methods.skill.config import CLASS_NAMES, SkillConfig
from raylab.models.skillnet import SkillNet

EVAL_BATCH = 512


def build_model(cfg: SkillConfig, num_classes: int = 3, in_channels: int = 76) -> SkillNet:
    m = cfg.model
    return SkillNet(in_channels=in_channels, window=cfg.window, num_classes=num_classes,
                    channels=tuple(m.channels), kernel_size=m.kernel_size, pool=m.pool,
                    fc_dim=m.fc_dim, dropout_conv=m.dropout_conv, dropout_fc=m.dropout_fc)


def lr_lambda(schedule: str, epochs: int):
    """Per-epoch multiplier: constant, or cosine from 1 to 0 over the run."""
    if schedule == "constant":
        return lambda epoch: 1.0
    return lambda epoch: 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / epochs))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               batch: dict[str, torch.Tensor], device: torch.device, precision: str
               ) -> dict[str, float]:
    """One AdamW step on a batch of windows; sums of loss and correct predictions."""
    x = batch["x"].to(device, non_blocking=True)
    y = batch["y"].to(device, non_blocking=True)
    with autocast(device, precision):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    n = y.numel()
    return {"samples": n, "loss": loss.item() * n,
            "accuracy": float((logits.argmax(1) == y).sum().item())}


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Any, device: torch.device, n_trials: int,
             num_classes: int, precision: str, all_reduce: Any) -> dict[str, Any]:
    """Loss, confusion counts and per-trial window votes summed over all workers."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    votes = torch.zeros(max(n_trials, 1), num_classes, dtype=torch.float64)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    for batch in batches:
        x = batch["x"].to(device, non_blocking=True)
        y = batch["y"].to(device)
        with autocast(device, precision):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        pred = logits.argmax(1).cpu()
        yc = y.cpu()
        confusion.index_put_((yc, pred), torch.ones_like(pred, dtype=torch.float64),
                             accumulate=True)
        votes.index_put_((batch["trial_idx"].cpu(), pred),
                         torch.ones_like(pred, dtype=torch.float64), accumulate=True)
    confusion = all_reduce(confusion)
    votes = all_reduce(votes)
    loss_sum = all_reduce(loss_sum)
    total = confusion.sum().item()
    return {
        "rows": int(total),
        "loss": loss_sum.item() / max(total, 1.0),
        "accuracy": confusion.diagonal().sum().item() / max(total, 1.0),
        "confusion": confusion.long().tolist(),
        "votes": votes.long().tolist(),
    }


def vote_predictions(votes: list[list[int]], n_trials: int) -> np.ndarray:
    """Each trial's majority-vote class from its window votes (ties -> lowest index)."""
    return np.asarray(votes)[:n_trials].argmax(1)


def trial_vote_accuracy(votes: list[list[int]], trial_labels: list[int]) -> float:
    """Majority vote of windows per trial vs the trial label, over trials with windows."""
    has_windows = np.asarray(votes)[: len(trial_labels)].sum(1) > 0
    if not has_windows.any():
        return float("nan")
    pred = vote_predictions(votes, len(trial_labels))
    return float((pred == np.asarray(trial_labels))[has_windows].mean())


class SkillTask(Task):
    """SkillNet on windows: AdamW, a per-epoch cosine (or constant) lr, cross-entropy.

    ``run`` (plain data from the driver): ``split`` (the evaluation split's name),
    ``eval_trial_labels`` (label of each evaluated trial, by index) and
    ``checkpoint_meta``. Windows are the same every epoch, so both shards are replayed
    from memory after the first pass when they fit (``cache_mb``).
    """

    sum_keys = ("loss", "accuracy")
    throughput_key = "samples_per_s"

    def __init__(self, cfg: SkillConfig, run: dict[str, Any], ctx: WorkerContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.split: str = run["split"]
        self.trial_labels: list[int] = run["eval_trial_labels"]
        self.epochs = cfg.optim.epochs
        self.checkpoint_every = cfg.checkpoint_every
        self.meta = run["checkpoint_meta"]
        self.model = ctx.prepare_model(build_model(cfg))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr,
                                           weight_decay=cfg.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.optim.schedule, cfg.optim.epochs))
        cache = cfg.cache_mb << 20
        self.train = EpochBatches(ctx.shard("train"),
                                  per_worker_batch(cfg.optim.batch_size, ctx.world_size),
                                  seed=cfg.seed, rank=ctx.rank,
                                  shuffle_buffer=cfg.shuffle_buffer, cache_bytes=cache,
                                  agree=ctx.any_worker)
        self.eval = EvalBatches(ctx.shard(self.split), EVAL_BATCH, cache, ctx.any_worker)

    def state_objects(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}

    def start_epoch(self, epoch: int) -> None:
        self.model.train()

    def batches(self, epoch: int) -> Any:
        return self.train.epoch(epoch)

    def train_step(self, batch: Any, state: TrainState, last: bool) -> dict[str, float]:
        out = train_step(self.model, self.optimizer, batch, self.ctx.device,
                         self.cfg.precision)
        state.step += 1
        return out

    def end_epoch(self, epoch: int, state: TrainState) -> dict[str, Any]:
        lr = self.optimizer.param_groups[0]["lr"]  # what this epoch trained with
        self.scheduler.step()
        return {"lr": lr}

    def evaluate(self, epoch: int, last: bool) -> dict[str, Any]:
        result = evaluate(self.model, self.eval(), self.ctx.device, len(self.trial_labels),
                          len(CLASS_NAMES), self.cfg.precision, self.ctx.all_reduce_sum)
        key = lambda name: metric_key(self.split, name)  # noqa: E731
        metrics = {key("loss"): result["loss"], key("accuracy"): result["accuracy"],
                   key(ROWS): result["rows"],
                   key("trial_accuracy"): trial_vote_accuracy(result["votes"],
                                                              self.trial_labels)}
        if last:
            metrics[key("confusion")] = result["confusion"]
            metrics[key("votes")] = result["votes"]
        return metrics
