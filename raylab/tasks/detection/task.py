"""Mask R-CNN detection on a worker: the engine's hooks for torchvision's detector.

Training: batches arrive jittered, as uint8 pixels with bit-packed masks
(:mod:`raylab.tasks.detection.data`); a step sums the five Mask R-CNN losses, with AdamW,
layer-wise lr decay, a per-iteration warm-up + step (or cosine) lr, AMP and gradient
clipping. Evaluation: each worker predicts on its share of the evaluation rows, maps boxes
and masks back to the original images and encodes the masks as COCO RLE; the detections
and the rows' ground truth are gathered to the chief, which runs COCOeval
(:func:`raylab.metrics.detection.coco_eval`) and broadcasts box and mask AP.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from raylab.data.coco import encode_masks
from raylab.engine.batching import per_worker_batch
from raylab.engine.context import WorkerContext
from raylab.engine.keys import ROWS, TRAIN, metric_key
from raylab.engine.loop import Task, TrainState
from raylab.engine.precision import autocast
from raylab.engine.schedules import cosine_schedule, set_lr, step_schedule
from raylab.engine.shards import EpochBatches, EvalBatches
from raylab.metrics.detection import coco_eval
from raylab.models.detection import build_detector
from raylab.optim import build_optimizer
from raylab.tasks.detection.config import DetectionConfig
from raylab.tasks.detection.data import GT_PREFIX, keep_numpy
from raylab.transforms.detection import unscale_boxes, unscale_masks
from raylab.transforms.detection_batch import contiguous_label_map, to_torchvision_targets

#: torchvision's Mask R-CNN losses, each reported as ``train_<name>``.
LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
             "loss_rpn_box_reg")
IOU_TYPES = ("bbox", "segm")


def lr_schedule(cfg: DetectionConfig, steps_per_epoch: int) -> np.ndarray:
    """The lr of every iteration: warm-up, then ViTDet's step decay (or a cosine to 0)."""
    o = cfg.optim
    if o.schedule == "step":
        return step_schedule(o.effective_lr, o.epochs, steps_per_epoch, o.milestones,
                             warmup_iters=o.warmup_iters)
    total = o.epochs * steps_per_epoch
    warm = min(o.warmup_iters, total)
    ramp = step_schedule(o.effective_lr, 1, total, (), warmup_iters=warm)[:warm]
    if warm == total:
        return ramp
    return np.concatenate((ramp, cosine_schedule(o.effective_lr, 0.0, 1, total - warm)))


def build_model(cfg: DetectionConfig, num_classes: int) -> nn.Module:
    """The configured Mask R-CNN with ``num_classes`` (categories + background)."""
    model = build_detector(cfg.detector_config(num_classes))
    model.roi_heads.score_thresh = cfg.score_threshold
    return model


class DetectionTask(Task):
    """A torchvision Mask R-CNN on COCO shards.

    ``run`` (plain data from the driver): ``split`` (the evaluation dataset's name),
    ``categories`` (the COCO category table), ``train_rows`` (sizes the lr schedule) and
    ``checkpoint_meta``.
    """

    sum_keys = ("loss", *LOSS_KEYS)
    throughput_key = "img_per_s"

    def __init__(self, cfg: DetectionConfig, run: dict[str, Any], ctx: WorkerContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.split: str = run["split"]
        self.categories: list[dict[str, Any]] = run["categories"]
        #: Bin name -> COCO category ids, for AP by class frequency (None: not asked).
        self.ap_bins: dict[str, list[int]] | None = run.get("ap_bins")
        label_map = contiguous_label_map(c["id"] for c in self.categories)
        self.category_of = {label: cid for cid, label in label_map.items()}
        o = cfg.optim
        self.epochs = o.epochs
        self.checkpoint_every = cfg.checkpoint_every
        self.meta = run["checkpoint_meta"]
        #: Sets the epoch the Ray Data augmentation draws for (None: unseeded draws).
        self.epoch_clock = run.get("epoch_clock")
        self.model = ctx.prepare_model(build_model(cfg, len(self.categories) + 1))
        self.inner = getattr(self.model, "module", self.model)
        self.optimizer = build_optimizer(self.inner, "adamw", lr=o.effective_lr,
                                         weight_decay=o.weight_decay, betas=tuple(o.betas),
                                         layer_decay=o.layer_decay)
        self.scaler = torch.amp.GradScaler(enabled=cfg.precision == "fp16"
                                           and ctx.device.type == "cuda")
        steps_per_epoch = max(1, run["train_rows"] // o.batch_size)
        self.batches_per_epoch = steps_per_epoch
        self.lr = lr_schedule(cfg, steps_per_epoch)
        self.step = 0
        micro = per_worker_batch(o.batch_size, ctx.world_size)
        # Jittered batches change every epoch: never cached. Per-row boxes and masks differ
        # in count, so batches stay numpy until the step moves them to the device.
        self.train = EpochBatches(ctx.shard(TRAIN), micro, seed=cfg.seed, rank=ctx.rank,
                                  shuffle_buffer=cfg.shuffle_buffer, drop_last=True,
                                  collate_fn=keep_numpy)
        self.eval = EvalBatches(ctx.shard(self.split), cfg.eval_batch, collate_fn=keep_numpy)

    # ------------------------------------------------------------------ engine hooks

    def state_objects(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler}

    def on_restore(self, saved: dict[str, Any] | None, state: TrainState
                   ) -> dict[str, Any] | None:
        self.step = state.step
        return saved

    def start_epoch(self, epoch: int) -> None:
        self.model.train()
        if self.epoch_clock is not None:  # before any worker asks for the epoch's rows
            if self.ctx.is_chief:
                self.epoch_clock.set(epoch)
            self.ctx.barrier()

    def batches(self, epoch: int) -> Any:
        return self.train.epoch(epoch)

    def train_step(self, batch: Any, state: TrainState, last: bool) -> dict[str, float]:
        images, targets = to_torchvision_targets(batch, self.ctx.device)
        set_lr(self.optimizer, float(self.lr[min(self.step, len(self.lr) - 1)]))
        with autocast(self.ctx.device, self.cfg.precision):
            losses = self.model(images, targets)
        loss = sum(losses[k] for k in LOSS_KEYS)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.inner.parameters(), self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        state.step = self.step
        n = len(images)
        sums = {k: float(losses[k].detach()) * n for k in LOSS_KEYS}
        return {"samples": n, "loss": float(loss.detach()) * n, **sums}

    def end_epoch(self, epoch: int, state: TrainState) -> dict[str, Any]:
        return {"lr": float(self.lr[min(max(self.step - 1, 0), len(self.lr) - 1)])}

    def evaluate(self, epoch: int, last: bool) -> dict[str, Any]:
        if not last and (epoch + 1) % self.cfg.eval_every:
            return {}
        detections, images, annotations = self.predict_shard()
        gathered = self.ctx.all_gather_objects((detections, images, annotations))
        metrics: dict[str, Any] | None = None
        if self.ctx.is_chief:
            all_images = [i for _, imgs, _ in gathered for i in imgs]
            ground_truth = {"images": all_images,
                            "annotations": [a for _, _, anns in gathered for a in anns],
                            "categories": self.categories}
            results = coco_eval(ground_truth, [d for dets, _, _ in gathered for d in dets],
                                IOU_TYPES, frequency_bins=self.ap_bins)
            # A size range (or frequency bin) without ground truth has no AP (COCOeval's
            # -1): not reported.
            metrics = {metric_key(self.split, f"{kind}_{k}"): float(v)
                       for kind in IOU_TYPES for k, v in results[kind].items()
                       if math.isfinite(v)}
            metrics[metric_key(self.split, ROWS)] = len(all_images)
        return self.ctx.broadcast_object(metrics)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def predict_shard(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                     list[dict[str, Any]]]:
        """This worker's detections (COCO results, original pixels), and the images and
        annotations of the rows it scored (COCO ground truth)."""
        # The bare model: DDP's forward would wait for workers with fewer rows.
        self.inner.eval()
        detections: list[dict[str, Any]] = []
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for batch in self.eval():
            pixels, _ = to_torchvision_targets(batch, self.ctx.device, with_masks=False)
            with autocast(self.ctx.device, self.cfg.precision):
                outputs = self.inner(pixels)
            for i, out in enumerate(outputs):
                image_id = int(batch["image_id"][i])
                size = (int(batch["height"][i]), int(batch["width"][i]))
                detections += self.coco_results(out, image_id, batch["scale"][i], size)
                images.append({"id": image_id, "height": size[0], "width": size[1]})
                annotations += ground_truth_rows(batch, i, size)
        return detections, images, annotations

    def coco_results(self, out: dict[str, torch.Tensor], image_id: int, scale: Any,
                     size: tuple[int, int]) -> list[dict[str, Any]]:
        """One image's predictions as COCO result dicts in original pixels."""
        boxes = unscale_boxes(out["boxes"].float().cpu(), scale, size).numpy()
        masks = unscale_masks(out["masks"].float().cpu(), scale, size)[:, 0] > 0.5
        rles = encode_masks(masks.numpy().astype(np.uint8))
        scores = out["scores"].float().cpu().tolist()
        labels = out["labels"].cpu().tolist()
        return [{"image_id": image_id, "category_id": self.category_of[int(label)],
                 "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                 "score": float(score),
                 "segmentation": {"size": list(size), "counts": rle.decode("ascii")}}
                for (x0, y0, x1, y1), score, label, rle in zip(boxes, scores, labels, rles)]


def ground_truth_rows(batch: dict[str, Any], i: int, size: tuple[int, int]
                      ) -> list[dict[str, Any]]:
    """Row ``i``'s original annotations (``gt_*`` columns) as COCO annotation dicts."""
    image_id = int(batch["image_id"][i])
    col = {k: batch[GT_PREFIX + k][i] for k in ("ann_ids", "category_ids", "boxes", "areas",
                                                "iscrowd", "masks")}
    boxes = np.asarray(col["boxes"], dtype=np.float64).reshape(-1, 4)
    out = []
    for j, ann_id in enumerate(np.asarray(col["ann_ids"]).reshape(-1)):
        counts = col["masks"][j]
        out.append({
            "id": int(ann_id), "image_id": image_id,
            "category_id": int(np.asarray(col["category_ids"]).reshape(-1)[j]),
            "bbox": [float(v) for v in boxes[j]],
            "area": float(np.asarray(col["areas"]).reshape(-1)[j]),
            "iscrowd": int(np.asarray(col["iscrowd"]).reshape(-1)[j]),
            "segmentation": {"size": list(size), "counts": counts.decode("ascii")
                             if isinstance(counts, bytes) else str(counts)},
        })
    return out
