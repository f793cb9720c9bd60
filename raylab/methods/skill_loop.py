"""The skill model's per-worker train loop (runs inside Ray Train workers).

Kept apart from :mod:`raylab.methods.skill` so that the driver-side code, which builds
datasets and reports, reads on one screen and the loop can be benchmarked on its own.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raylab.models.skillnet import SkillNet


def build_model(cfg: Any, num_classes: int = 3, in_channels: int = 76) -> SkillNet:
    m = cfg.model
    return SkillNet(in_channels=in_channels, window=cfg.window, num_classes=num_classes,
                    channels=tuple(m.channels), kernel_size=m.kernel_size, pool=m.pool,
                    fc_dim=m.fc_dim, dropout_conv=m.dropout_conv, dropout_fc=m.dropout_fc)


def lr_lambda(schedule: str, epochs: int):
    """Per-epoch multiplier: constant, or cosine from 1 to 0 over the run."""
    if schedule == "constant":
        return lambda epoch: 1.0
    return lambda epoch: 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / epochs))


def train_epoch(model, optimizer, batches, device, precision: str, all_reduce) -> dict:
    """One pass over ``batches``; returns the global mean loss/accuracy and sample count."""
    from raylab.runtime.worker import autocast

    model.train()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    first_step_time = None
    for batch in batches:
        x = batch["x"].to(device, non_blocking=True)
        y = batch["y"].to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if first_step_time is None:
            first_step_time = time.time()
        n = y.numel()
        totals += torch.tensor([loss.item() * n, (logits.argmax(1) == y).sum().item(), n],
                               dtype=torch.float64)
    totals = all_reduce(totals)
    count = max(totals[2].item(), 1.0)
    return {"train_loss": totals[0].item() / count, "train_accuracy": totals[1].item() / count,
            "train_samples": int(totals[2].item()), "first_step_time": first_step_time}


@torch.no_grad()
def evaluate(model, batches, device, n_trials: int, num_classes: int, precision: str,
             all_reduce) -> dict:
    """Loss, confusion counts and per-trial window votes summed over all workers."""
    from raylab.runtime.worker import autocast

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
    total = max(confusion.sum().item(), 1.0)
    return {
        "loss": loss_sum.item() / total,
        "accuracy": confusion.diagonal().sum().item() / total,
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


def train_loop(loop_config: dict[str, Any]) -> None:
    """Per-worker entry point: build, restore, train, evaluate and report every epoch."""
    import ray.train

    from raylab.config import from_dict
    from raylab.methods.skill import SkillConfig
    from raylab.runtime import worker as W
    from raylab.runtime.batch_cache import BatchCache

    cfg = from_dict(SkillConfig, loop_config["config"])
    eval_split: str = loop_config["eval_split"]
    trial_labels: list[int] = loop_config["eval_trial_labels"]
    info = W.worker_info()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = W.prepare_model(build_model(cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.optim.schedule, cfg.optim.epochs))
    start_epoch, step, state = W.restore_latest(model=model, optimizer=optimizer,
                                                scheduler=scheduler)
    if W.finished_already(state, start_epoch, cfg.optim.epochs):
        return
    # The global batch is the config's; each worker takes its share, so 2 workers see the
    # same optimisation problem as 1.
    per_worker_batch = max(1, cfg.optim.batch_size // info.world_size)
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard(eval_split)
    # Windows are the same every epoch: stream them once, then replay from memory.
    train_cache = BatchCache(cfg.cache_mb << 20)
    eval_cache = BatchCache(cfg.cache_mb << 20)
    meta = loop_config["checkpoint_meta"]
    for epoch in range(start_epoch, cfg.optim.epochs):
        t0 = time.perf_counter()
        seed = cfg.seed * 100_003 + epoch * 101 + info.rank
        batches = train_cache.epoch(
            lambda seed=seed: train_shard.iter_torch_batches(
                batch_size=per_worker_batch,
                local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                local_shuffle_seed=seed),
            per_worker_batch, shuffle_seed=seed)
        metrics: dict[str, Any] = train_epoch(model, optimizer, batches, info.device,
                                              cfg.precision, W.all_reduce_sum)
        train_seconds = time.perf_counter() - t0
        first_step = metrics.pop("first_step_time")
        if epoch == start_epoch and first_step is not None:
            metrics["first_step_unix_time"] = first_step  # start-up cost, see `raylab bench`
        scheduler.step()
        step += 1
        eval_batches = eval_cache.epoch(lambda: eval_shard.iter_torch_batches(batch_size=512),
                                        512)
        result = evaluate(model, eval_batches, info.device,
                          len(trial_labels), 3, cfg.precision, W.all_reduce_sum)
        metrics.update({
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "samples_per_s": metrics["train_samples"] / max(train_seconds, 1e-9),
            f"{eval_split}_loss": result["loss"],
            f"{eval_split}_accuracy": result["accuracy"],
            f"{eval_split}_trial_accuracy": trial_vote_accuracy(result["votes"], trial_labels),
        })
        last = epoch + 1 == cfg.optim.epochs
        if last:
            metrics[f"{eval_split}_confusion"] = result["confusion"]
            metrics[f"{eval_split}_votes"] = result["votes"]
        checkpoint = None
        if last or (epoch + 1) % cfg.checkpoint_every == 0:
            checkpoint = {"model": model, "optimizer": optimizer, "scheduler": scheduler,
                          "epoch": epoch, "step": step, "meta": meta}
        W.report(metrics, checkpoint)
