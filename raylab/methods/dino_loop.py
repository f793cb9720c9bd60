"""DINO's per-worker train loop (runs inside Ray Train workers, or in-process).

One iteration, as in the reference: student sees every crop, teacher the two global ones;
loss with the teacher's centered, sharpened output; the center moves with the global
batch mean (all-reduced); per-parameter clipping; the head's last layer is frozen during
the first epoch(s); AdamW with per-iteration lr and weight-decay schedules; the teacher
follows the student by EMA with a cosine momentum schedule.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def extract_features(backbone: nn.Module, batches: Any, device: torch.device,
                     precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and labels of every batch (CPU float32)."""
    from raylab.runtime.precision import autocast
    from raylab.transforms.images import DeviceNormalize

    prepare = DeviceNormalize()
    backbone.eval()
    feats, labels = [], []
    for batch in batches:
        x = prepare(batch["image"].to(device, non_blocking=True))
        with autocast(device, precision):
            f = backbone(x)
        feats.append(f.float().cpu())
        labels.append(batch["label"].cpu())
    if not feats:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def dino_step(student: nn.Module, teacher: nn.Module, crops: list[torch.Tensor],
              center: torch.Tensor, *, student_temp: float, teacher_temp: float,
              center_momentum: float, all_reduce: Any, precision: str,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward both networks and the loss; returns (loss, new center). No optimizer step."""
    from raylab.losses.dino import dino_loss, update_center
    from raylab.runtime.precision import autocast

    with autocast(device, precision):
        with torch.no_grad():
            teacher_out = teacher(crops[:2])
        student_out = student(crops)
    loss = dino_loss(student_out.float(), teacher_out.float(), center, student_temp,
                     teacher_temp, n_global_crops=2)
    new_center = update_center(center, teacher_out.float().detach(), center_momentum,
                               all_reduce=all_reduce)
    return loss, new_center


def train_loop(loop_config: dict[str, Any]) -> None:
    import ray.train

    from raylab.config import from_dict
    from raylab.losses.dino import teacher_temperature_schedule
    from raylab.methods.dino import DINOConfig, build_student_teacher, effective_lr
    from raylab.metrics.knn import knn_classify, linear_probe
    from raylab.models.dino import cancel_last_layer_grad, clip_gradients
    from raylab.optim import ModelEma, param_groups
    from raylab.runtime import worker as W
    from raylab.runtime.batch_cache import BatchCache
    from raylab.runtime.schedules import cosine_schedule, set_lr, set_weight_decay
    from raylab.transforms.images import DeviceNormalize

    cfg = from_dict(DINOConfig, loop_config["config"])
    o = cfg.optim
    num_classes: int = loop_config["num_classes"]
    query: str = loop_config["query_name"]
    info = W.worker_info()
    torch.manual_seed(cfg.seed)
    student, _ = build_student_teacher(cfg)
    student = W.prepare_model(student)
    inner = getattr(student, "module", student)
    # The teacher starts as a copy of the student and never gets gradients; it is only
    # ever an EMA of the student (drop-path is off in its eval mode).
    teacher = ModelEma(inner, decay=cfg.momentum_teacher)
    optimizer = torch.optim.AdamW(param_groups(inner, weight_decay=o.weight_decay))
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.precision == "fp16")
    iters = max(1, loop_config["train_rows"] // o.batch_size)
    lr_s = cosine_schedule(effective_lr(cfg), o.min_lr, o.epochs, iters, o.warmup_epochs)
    wd_s = cosine_schedule(o.weight_decay, o.weight_decay_end, o.epochs, iters)
    mom_s = cosine_schedule(cfg.momentum_teacher, 1.0, o.epochs, iters)
    temp_s = teacher_temperature_schedule(cfg.warmup_teacher_temp, cfg.teacher_temp,
                                          min(cfg.warmup_teacher_temp_epochs, o.epochs),
                                          o.epochs)
    center = torch.zeros(1, cfg.out_dim, device=info.device)
    start_epoch, step, state = W.restore_latest(model=student, optimizer=optimizer,
                                                scaler=scaler, ema=teacher.module)
    if W.finished_already(state, start_epoch, o.epochs):
        return
    if state is not None and "center" in state.get("extra", {}):
        center = state["extra"]["center"].to(info.device)
    per_worker = o.batch_size // info.world_size
    n_crops = 2 + cfg.n_local_crops
    prepare = DeviceNormalize()
    train_shard = ray.train.get_dataset_shard("train")
    bank_cache, query_cache = BatchCache(cfg.cache_mb << 20), BatchCache(cfg.cache_mb << 20)
    meta = loop_config["checkpoint_meta"]
    for epoch in range(start_epoch, o.epochs):
        student.train()
        t0 = time.perf_counter()
        totals = torch.zeros(2, dtype=torch.float64)
        first_step = None
        batches = train_shard.iter_torch_batches(
            batch_size=per_worker, drop_last=True,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed * 100_003 + epoch * 101 + info.rank)
        for batch in batches:
            it = min(step, len(lr_s) - 1)
            set_lr(optimizer, float(lr_s[it]))
            set_weight_decay(optimizer, float(wd_s[it]))
            crops = [prepare(batch[f"crop{i}"].to(info.device, non_blocking=True))
                     for i in range(n_crops)]
            loss, center = dino_step(
                student, teacher.module, crops, center, student_temp=cfg.student_temp,
                teacher_temp=float(temp_s[epoch]), center_momentum=cfg.center_momentum,
                all_reduce=W.all_reduce_sum, precision=cfg.precision, device=info.device)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"DINO loss is {loss.item()} at epoch {epoch + 1}, "
                                         f"step {step}; lower optim.lr or use fp32")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if o.clip_grad:
                scaler.unscale_(optimizer)
                clip_gradients(inner, o.clip_grad)
            cancel_last_layer_grad(inner, epoch, o.freeze_last_layer)
            scaler.step(optimizer)
            scaler.update()
            teacher.update(inner, step, decay=float(mom_s[it]))
            step += 1
            if first_step is None:
                first_step = time.time()
            n = batch["crop0"].shape[0]
            totals += torch.tensor([loss.item() * n, n], dtype=torch.float64)
        seconds = time.perf_counter() - t0
        totals = W.all_reduce_sum(totals)
        # Every worker must hold the same center (it is updated from the all-reduced batch
        # mean); the largest gap to the workers' mean center is reported as a check.
        mean_center = W.all_reduce_sum(center.detach().double().cpu()) / info.world_size
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": totals[0].item() / max(totals[1].item(), 1.0),
            "img_per_s": totals[1].item() / max(seconds, 1e-9),
            "lr": float(lr_s[min(step, len(lr_s)) - 1]),
            "teacher_temp": float(temp_s[epoch]),
            "teacher_momentum": float(mom_s[min(step, len(mom_s)) - 1]),
            "center_spread": float((center.detach().double().cpu() - mean_center).abs().max()),
        }
        if epoch == start_epoch and first_step is not None:
            metrics["first_step_unix_time"] = first_step
        last = epoch + 1 == o.epochs
        if last or (epoch + 1) % cfg.eval_every == 0:
            student_backbone = inner.backbone if cfg.knn_student else None
            metrics.update(_evaluate(teacher.module.backbone, bank_cache, query_cache, cfg,
                                     info, query, num_classes, last, knn_classify,
                                     linear_probe, student_backbone))
        checkpoint = None
        if last or (epoch + 1) % cfg.checkpoint_every == 0:
            checkpoint = {"model": student, "optimizer": optimizer, "scaler": scaler,
                          "ema": teacher.module, "epoch": epoch, "step": step, "meta": meta,
                          "extra": {"center": center.detach().cpu(),
                                    "lr_schedule": torch.from_numpy(np.asarray(lr_s)),
                                    "wd_schedule": torch.from_numpy(np.asarray(wd_s)),
                                    "momentum_schedule": torch.from_numpy(np.asarray(mom_s))}}
        W.report(metrics, checkpoint)


def _evaluate(backbone: nn.Module, bank_cache: Any, query_cache: Any, cfg: Any, info: Any,
              query: str, num_classes: int, with_probe: bool, knn_classify: Any,
              linear_probe: Any, student_backbone: nn.Module | None = None
              ) -> dict[str, float]:
    """Rank 0 embeds the bank and the queries with the teacher (and the student, when
    given, for its k-NN only); others report nothing.

    Only the chief reads the (unsplit) evaluation datasets; every worker still calls
    ``report`` afterwards, so the others simply wait there.
    """
    import ray.train

    if not info.is_chief:
        return {}
    bank_shard = ray.train.get_dataset_shard("knn_bank")
    query_shard = ray.train.get_dataset_shard("knn_query")
    # Each call is one pass (a generator): streamed and recorded the first time, then
    # replayed from memory, or streamed again when the split is too big to cache.
    def bank() -> Any:
        return bank_cache.epoch(lambda: bank_shard.iter_torch_batches(batch_size=256), 256)

    def queries() -> Any:
        return query_cache.epoch(lambda: query_shard.iter_torch_batches(batch_size=256), 256)

    def embed_and_score(net: nn.Module) -> tuple[float, tuple[torch.Tensor, ...]]:
        """k-NN top-1 of ``net``'s features, and the features with their labels (each
        pass keeps its own labels: a re-streamed pass may come in another order)."""
        bank_x, bank_y = extract_features(net, bank(), info.device, cfg.precision)
        query_x, query_y = extract_features(net, queries(), info.device, cfg.precision)
        pred = knn_classify(bank_x, bank_y, query_x, k=cfg.knn_k, T=cfg.knn_temperature,
                            num_classes=num_classes)
        return float((pred == query_y).float().mean()), (bank_x, bank_y, query_x, query_y)

    top1, (bank_x, bank_y, query_x, query_y) = embed_and_score(backbone)
    out = {f"{query}_knn_top1": top1}
    if student_backbone is not None:
        out[f"{query}_knn_top1_student"] = embed_and_score(student_backbone)[0]
    if with_probe and cfg.linear_probe_epochs:
        probe = linear_probe(bank_x, bank_y, query_x, query_y, num_classes,
                             epochs=cfg.linear_probe_epochs, seed=cfg.seed)
        out[f"{query}_linear_top1"] = float(probe["top1"])
    return out
