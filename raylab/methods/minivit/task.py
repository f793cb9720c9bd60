"""MiniViT on a worker: the classification task with a multiplexed student and a teacher.

The classification step calls :meth:`MiniViTTask.loss` (the task's distillation hook): the
teacher runs in eval mode under ``no_grad`` on the same (mixed, normalised) batch, and the
loss is ``gt * CE + pred * L_pred + beta * L_attn + gamma * L_hddn``; the relation terms
apply when student and teacher are both ViTs, or both Swins, whose last blocks see the
same windows of tokens (predictions only otherwise, e.g. from a CNN teacher).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raylab.engine.context import WorkerContext
from raylab.engine.keys import metric_key
from raylab.engine.loop import TrainState
from raylab.losses.distill import attention_relation_loss, hidden_relation_loss, prediction_loss
from raylab.methods.minivit.config import MiniViTConfig
from raylab.methods.minivit.models import (
    RelationTap,
    build_student,
    init_weights,
    load_teacher,
    uses_relations,
)
from raylab.tasks.classification.task import ClassificationTask


class MiniViTTask(ClassificationTask):
    """``run`` as the classification task's, plus ``class_names`` (to check the teacher's)."""

    def __init__(self, cfg: MiniViTConfig, run: dict[str, Any], ctx: WorkerContext) -> None:
        self.class_names: list[str] = run["class_names"]
        self.teacher: nn.Module | None = None
        self.parts: dict[str, float] = {}
        super().__init__(cfg, run, ctx)
        if not cfg.teacher:
            return
        teacher, _ = load_teacher(cfg, self.class_names)
        self.teacher = teacher.to(ctx.device)
        d = cfg.distill
        self.relations = uses_relations(cfg, self.inner, self.teacher)
        if self.relations:
            self.student_tap, self.teacher_tap = RelationTap(self.inner), RelationTap(self.teacher)
        self.sum_keys = ("loss", *(["loss_gt"] if d.gt > 0 else []), "loss_pred",
                         *(["loss_attn", "loss_hidden"] if self.relations else []))

    def build_model(self) -> nn.Module:
        return build_student(self.cfg, self.num_classes,
                             init_weights(self.cfg, self.class_names))

    def loss(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.teacher is None:
            return super().loss(model, x, target)
        d = self.cfg.distill
        logits = model(x)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        parts = {"loss_gt": self.criterion(logits.float(), target) if d.gt > 0 else None,
                 "loss_pred": prediction_loss(logits, teacher_logits, d.temperature)}
        if self.relations:
            qkv_s, hidden_s = self.student_tap.take()
            qkv_t, hidden_t = self.teacher_tap.take()
            parts["loss_attn"] = attention_relation_loss(qkv_s, qkv_t, d.relation_heads)
            parts["loss_hidden"] = hidden_relation_loss(hidden_s, hidden_t)
        weights = {"loss_gt": d.gt, "loss_pred": d.pred, "loss_attn": d.beta,
                   "loss_hidden": d.gamma}
        total = sum(weights[k] * v for k, v in parts.items() if v is not None and weights[k])
        used = {k: v.detach() for k, v in parts.items() if v is not None}
        # One device sync for all the terms (the step already syncs once for the loss).
        self.parts = dict(zip(used, torch.stack(list(used.values())).tolist()))
        return total, logits

    def train_step(self, batch: Any, state: TrainState, last: bool) -> dict[str, float]:
        self.parts = {}  # one micro-batch per call: its terms, weighed like the loss
        out = super().train_step(batch, state, last)
        for k, v in self.parts.items():
            out[k] = v * out["samples"]
        return out

    def evaluate(self, epoch: int, last: bool) -> dict[str, Any]:
        metrics = super().evaluate(epoch, last)
        if last and self.teacher is not None:  # the teacher's own top-1, once, for the report
            metrics[metric_key(self.split, "teacher_top1")] = self._evaluate(self.teacher)["top1"]
        return metrics
