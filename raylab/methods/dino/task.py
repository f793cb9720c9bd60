"""DINO on a worker: the engine's hooks for self-distillation with a multi-crop batch.

One iteration, as in the reference: the student sees every crop, the teacher the two
global ones; the loss uses the teacher's centred, sharpened output; the center moves with
the global batch mean (all-reduced); per-parameter clipping; the head's last layer is
frozen during the first epoch(s); AdamW with per-iteration lr and weight-decay schedules;
the teacher follows the student by EMA with a cosine momentum schedule. Rank 0 evaluates
the teacher's features with a weighted k-NN (and a linear probe after the last epoch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from raylab.engine.batching import per_worker_batch
from raylab.engine.context import WorkerContext
from raylab.engine.keys import ROWS, metric_key
from raylab.engine.loop import Task, TrainState
from raylab.engine.precision import autocast
from raylab.engine.schedules import cosine_schedule, set_lr, set_weight_decay
from raylab.engine.shards import EpochBatches, EvalBatches
from raylab.losses.dino import dino_loss, teacher_temperature_schedule, update_center
from raylab.methods.dino.config import DINOConfig
from raylab.metrics.knn import knn_classify, linear_probe
from raylab.models.backbones import backbone_from_config
from raylab.models.dino import (
    DINOHead,
    MultiCropWrapper,
    cancel_last_layer_grad,
    clip_gradients,
)
from raylab.optim import ModelEma, param_groups
from raylab.transforms.images import DeviceNormalize

#: The datasets rank 0 reads whole for the k-NN evaluation.
KNN_BANK = "knn_bank"
KNN_QUERY = "knn_query"
EVAL_BATCH = 256


def build_student_teacher(cfg: DINOConfig) -> tuple[nn.Module, nn.Module]:
    """Student (drop-path) and an architecture-identical teacher, both random init."""
    from raylab.config import to_dict

    def make(drop_path: float) -> nn.Module:
        backbone = backbone_from_config(to_dict(cfg), drop_path_rate=drop_path)
        head = DINOHead(backbone.num_features, cfg.out_dim, hidden_dim=cfg.hidden_dim,
                        bottleneck_dim=cfg.bottleneck_dim, norm_last_layer=cfg.norm_last_layer)
        return MultiCropWrapper(backbone, head)

    return make(cfg.drop_path), make(0.0)


@torch.no_grad()
def extract_features(backbone: nn.Module, batches: Any, device: torch.device,
                     precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and labels of every batch (CPU float32)."""
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
    with autocast(device, precision):
        with torch.no_grad():
            teacher_out = teacher(crops[:2])
        student_out = student(crops)
    loss = dino_loss(student_out.float(), teacher_out.float(), center, student_temp,
                     teacher_temp, n_global_crops=2)
    new_center = update_center(center, teacher_out.float().detach(), center_momentum,
                               all_reduce=all_reduce)
    return loss, new_center


class DINOTask(Task):
    """Student, EMA teacher, center and schedules on the engine's loop.

    ``run`` (plain data from the driver): ``split`` (the queries' split name),
    ``num_classes``, ``train_rows`` (sizes the per-iteration schedules) and
    ``checkpoint_meta``. The k-NN bank and queries are whole datasets that only rank 0
    reads (:data:`KNN_BANK`, :data:`KNN_QUERY`).
    """

    sum_keys = ("loss",)
    throughput_key = "img_per_s"

    def __init__(self, cfg: DINOConfig, run: dict[str, Any], ctx: WorkerContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        o = cfg.optim
        self.split: str = run["split"]
        self.num_classes: int = run["num_classes"]
        self.epochs = o.epochs
        self.checkpoint_every = cfg.checkpoint_every
        self.meta = run["checkpoint_meta"]
        student, _ = build_student_teacher(cfg)
        self.student = ctx.prepare_model(student)
        self.inner = getattr(self.student, "module", self.student)
        # The teacher starts as a copy of the student and never gets gradients; it is only
        # ever an EMA of the student (drop-path is off in its eval mode).
        self.teacher = ModelEma(self.inner, decay=cfg.momentum_teacher)
        self.optimizer = torch.optim.AdamW(param_groups(
            self.inner, weight_decay=o.weight_decay, exempt_tokens=not o.decay_tokens))
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.precision == "fp16")
        iters = max(1, run["train_rows"] // o.batch_size)
        self.batches_per_epoch = iters
        self.lr_s = cosine_schedule(cfg.effective_lr, o.min_lr, o.epochs, iters,
                                    o.warmup_epochs)
        self.wd_s = cosine_schedule(o.weight_decay, o.weight_decay_end, o.epochs, iters)
        self.mom_s = cosine_schedule(cfg.momentum_teacher, 1.0, o.epochs, iters)
        self.temp_s = teacher_temperature_schedule(
            cfg.warmup_teacher_temp, cfg.teacher_temp,
            min(cfg.warmup_teacher_temp_epochs, o.epochs), o.epochs)
        self.center = torch.zeros(1, cfg.out_dim, device=ctx.device)
        self.n_crops = 2 + cfg.n_local_crops
        self.prepare = DeviceNormalize()
        self.train = EpochBatches(ctx.shard("train"),
                                  per_worker_batch(o.batch_size, ctx.world_size),
                                  seed=cfg.seed, rank=ctx.rank,
                                  shuffle_buffer=cfg.shuffle_buffer, drop_last=True)
        self.bank = self.queries = None
        if ctx.is_chief:  # only the chief reads the (whole) evaluation datasets
            cache = cfg.cache_mb << 20
            self.bank = EvalBatches(ctx.shard(KNN_BANK), EVAL_BATCH, cache)
            self.queries = EvalBatches(ctx.shard(KNN_QUERY), EVAL_BATCH, cache)
        self._epoch = 0

    def state_objects(self) -> dict[str, Any]:
        return {"model": self.student, "optimizer": self.optimizer, "scaler": self.scaler,
                "ema": self.teacher.module}

    def state_extra(self) -> dict[str, Any]:
        return {"center": self.center.detach().cpu(),
                "lr_schedule": torch.from_numpy(np.asarray(self.lr_s)),
                "wd_schedule": torch.from_numpy(np.asarray(self.wd_s)),
                "momentum_schedule": torch.from_numpy(np.asarray(self.mom_s))}

    def on_restore(self, saved: dict[str, Any] | None, state: TrainState
                   ) -> dict[str, Any] | None:
        if saved is not None and "center" in saved.get("extra", {}):
            self.center = saved["extra"]["center"].to(self.ctx.device)
        return saved

    def start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self.student.train()

    def batches(self, epoch: int) -> Any:
        return self.train.epoch(epoch)

    def train_step(self, batch: Any, state: TrainState, last: bool) -> dict[str, float]:
        cfg, device = self.cfg, self.ctx.device
        it = min(state.step, len(self.lr_s) - 1)
        set_lr(self.optimizer, float(self.lr_s[it]))
        set_weight_decay(self.optimizer, float(self.wd_s[it]))
        crops = [self.prepare(batch[f"crop{i}"].to(device, non_blocking=True))
                 for i in range(self.n_crops)]
        loss, self.center = dino_step(
            self.student, self.teacher.module, crops, self.center,
            student_temp=cfg.student_temp, teacher_temp=float(self.temp_s[self._epoch]),
            center_momentum=cfg.center_momentum, all_reduce=self.ctx.all_reduce_sum,
            precision=cfg.precision, device=device)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.optim.clip_grad:
            self.scaler.unscale_(self.optimizer)
            clip_gradients(self.inner, cfg.optim.clip_grad)
        cancel_last_layer_grad(self.inner, self._epoch, cfg.optim.freeze_last_layer)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.teacher.update(self.inner, state.step, decay=float(self.mom_s[it]))
        state.step += 1
        n = batch["crop0"].shape[0]
        return {"samples": n, "loss": loss.item() * n}

    def end_epoch(self, epoch: int, state: TrainState) -> dict[str, Any]:
        # Every worker must hold the same center (it is updated from the all-reduced batch
        # mean); the largest gap to the workers' mean center is reported as a check.
        center = self.center.detach().double().cpu()
        mean_center = self.ctx.all_reduce_sum(center) / self.ctx.world_size
        done = max(min(state.step, len(self.lr_s)) - 1, 0)
        return {"lr": float(self.lr_s[done]),
                "teacher_temp": float(self.temp_s[epoch]),
                "teacher_momentum": float(self.mom_s[min(done, len(self.mom_s) - 1)]),
                "center_spread": float((center - mean_center).abs().max())}

    def evaluate(self, epoch: int, last: bool) -> dict[str, Any]:
        """Rank 0 embeds the bank and the queries with the teacher (and the student, with
        ``knn_student``); the other workers report nothing here (Ray Train keeps rank 0's
        metrics) and wait in the report."""
        if not (last or (epoch + 1) % self.cfg.eval_every == 0) or not self.ctx.is_chief:
            return {}
        cfg, key = self.cfg, lambda name: metric_key(self.split, name)  # noqa: E731

        def embed_and_score(net: nn.Module) -> tuple[float, tuple[torch.Tensor, ...]]:
            """k-NN top-1 of ``net``'s features, and the features with their labels (each
            pass keeps its own labels: a re-streamed pass may come in another order)."""
            bank_x, bank_y = extract_features(net, self.bank(), self.ctx.device,
                                              cfg.precision)
            query_x, query_y = extract_features(net, self.queries(), self.ctx.device,
                                                cfg.precision)
            pred = knn_classify(bank_x, bank_y, query_x, k=cfg.knn_k, T=cfg.knn_temperature,
                                num_classes=self.num_classes)
            return float((pred == query_y).float().mean()), (bank_x, bank_y, query_x,
                                                              query_y)

        top1, (bank_x, bank_y, query_x, query_y) = embed_and_score(
            self.teacher.module.backbone)
        out: dict[str, Any] = {key("knn_top1"): top1, key(ROWS): int(len(query_y))}
        if cfg.knn_student:
            out[key("knn_top1_student")] = embed_and_score(self.inner.backbone)[0]
        if last and cfg.linear_probe_epochs:
            probe = linear_probe(bank_x, bank_y, query_x, query_y, self.num_classes,
                                 epochs=cfg.linear_probe_epochs, seed=cfg.seed)
            out[key("linear_top1")] = float(probe["top1"])
        return out
