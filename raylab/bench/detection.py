"""Detection benchmarks on a CPU: learning on the synthetic sample, and coco128.

- ``detection-sample``: a small ViTDet and a small CNN + FPN Mask R-CNN trained by
  ``raylab train detection`` (1 Train worker, LSJ in Ray Data tasks) on the SYNTHETIC
  detection sample for a stated budget; box and mask AP on its held-out images. Baseline in
  the same run: the same model and step in a plain PyTorch loop fed by a DataLoader that
  decodes and jitters in a loader process (what a user writes without raylab); the ratio
  of images/s over the same epochs (2 to 1 + PLAIN_EPOCHS) in both: a Mask R-CNN step gets
  dearer as training goes on (more positive proposals reach the mask head), so a late
  epoch of one against early epochs of the other is not a fair pair.
- ``detection-coco128``: ``../shared/data/coco128`` converted (both splits) and a short CPU
  run of the CNN detector from random init; its AP, reported as it is.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from raylab import config as cfglib
from raylab.bench import BenchOptions, local_options, say_data, shared_data
from raylab.data.coco import convert_coco
from raylab.data.detection_sample import convert_sample, write_detection_sample
from raylab.engine.schedules import set_lr
from raylab.errors import DataError
from raylab.methods.detection import DetectionConfig, DetectionMethod
from raylab.optim import build_optimizer
from raylab.runtime.cluster import ensure_ray
from raylab.tasks.detection.data import load_detection_data, read_batch, train_transform
from raylab.tasks.detection.task import LOSS_KEYS, build_model, lr_schedule
from raylab.transforms.detection_batch import (
    detection_batch_transform,
    to_torchvision_targets,
    with_partners,
)

#: A CPU budget on the 128 px sample: what each model trains with (besides its own keys).
#: From random init, so no layer-wise lr decay (a fine-tuning device) and a larger lr.
SAMPLE_BUDGET = {"image_size": 128, "optim.batch_size": 8, "optim.reference_batch": 8,
                 "optim.lr": 1e-3, "optim.layer_decay": None, "optim.warmup_iters": 20,
                 "optim.schedule": "cosine",
                 "aug.scale_range": [0.5, 1.5], "eval_every": 5, "checkpoint_every": 1000,
                 "channels": 64, "drop_path": 0.0, "report_images": 4,
                 # The paper's 2000 proposals and 512 RoIs per image are sized for 1024 px
                 # COCO images with dozens of objects; a 128 px image holds a few.
                 "rpn_proposals_train": 300, "rpn_proposals_test": 200,
                 "roi_batch_size": 128}
MODELS = {
    # ViT-Tiny width, 6 blocks, 8 px patches: a 16x16 token grid at 128 px, windows of 8.
    "vitdet": {"backbone": "vitdet", "model": "vit_tiny_patch16_224",
               "model_kwargs": {"depth": 6, "patch_size": 8}, "window_size": 8,
               "global_blocks": [2, 5]},
    "cnn": {"backbone": "cnn", "model": "resnet18"},
}


def _config(data: str, epochs: int, model: str, **more: Any) -> DetectionConfig:
    return cfglib.apply_overrides(DetectionConfig(), {
        "data": data, **SAMPLE_BUDGET, **MODELS[model], "optim.epochs": epochs, **more})


class JitterCollate:
    """DataLoader collate: decode + jitter (+ copy-paste when the config asks) + pack the
    batch's rows in a loader worker: the function Ray Data's tasks run for raylab."""

    def __init__(self, batch: dict[str, Any], cfg: DetectionConfig,
                 label_map: dict[int, int]) -> None:
        self.batch, self.transform, self.label_map = batch, train_transform(cfg), label_map
        self.copy_paste = cfg.aug.copy_paste.params()

    def __call__(self, rows: list[int]) -> dict[str, Any]:
        picked = {k: v[rows] for k, v in self.batch.items()}
        if self.copy_paste is not None:
            # Each image's partner drawn from the whole split, as a Dataset that loads a
            # second random image per sample does.
            picked = with_partners(picked, self.batch, prob=self.copy_paste.prob, seed=None)
        return detection_batch_transform(picked, self.transform, label_map=self.label_map,
                                         seed=None, copy_paste=self.copy_paste)


def plain_rate(cfg: DetectionConfig, epochs: int = 3) -> float:
    """Images/s of what a user writes without raylab: the same model and step in a plain
    loop fed by a torch DataLoader (one loader process decoding and jittering, as Ray Data
    tasks do for raylab), whole epochs timed after a first warm-up epoch."""
    data = load_detection_data(cfg)
    batch = read_batch(data.train_folder)
    size = cfg.optim.batch_size
    loader = torch.utils.data.DataLoader(
        range(len(batch["image_id"])), batch_size=size, shuffle=True, drop_last=True, num_workers=1,
        persistent_workers=True, collate_fn=JitterCollate(batch, cfg, data.label_map))
    model = build_model(cfg, data.num_classes)
    model.train()
    optimizer = build_optimizer(model, "adamw", lr=cfg.optim.effective_lr,
                                weight_decay=cfg.optim.weight_decay,
                                layer_decay=cfg.optim.layer_decay)
    lr = lr_schedule(cfg, len(loader))
    step, images, seconds = 0, 0, 0.0
    for epoch in range(1 + epochs):
        t0 = time.perf_counter()
        for jittered in loader:
            images_in, targets = to_torchvision_targets(jittered)
            set_lr(optimizer, float(lr[min(step, len(lr) - 1)]))
            losses = model(images_in, targets)
            loss = sum(losses[k] for k in LOSS_KEYS)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if epoch:
                images += len(targets)
        if epoch:
            seconds += time.perf_counter() - t0
    return images / seconds


#: Epochs the plain loop times after its warm-up epoch (raylab's rate is taken over the
#: same epochs of its run).
PLAIN_EPOCHS = 3


def _same_epochs_rate(run_dir: Path) -> float | None:
    """raylab's images/s over epochs 2 .. 1 + PLAIN_EPOCHS (the plain loop's timed epochs):
    equal images per epoch, so the harmonic mean of the epochs' rates."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["img_per_s"] for r in rows if 2 <= r["epoch"] <= 1 + PLAIN_EPOCHS]
    return len(rates) / sum(1 / r for r in rates) if len(rates) == PLAIN_EPOCHS else None


def _train(cfg: DetectionConfig, storage: Path, name: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    # What `raylab train` gives one worker on this machine (--cpus-per-worker auto: all
    # cores, so as many torch threads as the plain loop has).
    summary = DetectionMethod().train(cfg, local_options(1), str(storage), name)
    return {"box": {k: _round(v) for k, v in summary["bbox"].items()},
            "mask": {k: _round(v) for k, v in summary["segm"].items()},
            "params": summary["params"], "train_img_per_s": summary["train_img_per_s"],
            "img_per_s_same_epochs": _same_epochs_rate(storage / name / "run"),
            "final_train_loss": _round(summary["train_loss"]),
            "wall_s": round(time.perf_counter() - t0, 1)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def bench_detection_sample(opts: BenchOptions) -> dict[str, Any]:
    epochs, tmp = max(opts.epochs, 1 + PLAIN_EPOCHS), opts.tmp
    if opts.data:
        data = opts.data
        say_data(f"detection shards {data}")
    else:
        say_data("the SYNTHETIC detection sample (128 train / 32 val images, 128 px)")
        raw = write_detection_sample(tmp / "raw", images=128, val_images=32, size=128,
                                     classes=3)
        data = str(convert_sample(raw, tmp / "shards"))
    ensure_ray()
    out: dict[str, Any] = {"bench": "detection-sample", "epochs": epochs, "data": data,
                           "budget": SAMPLE_BUDGET}
    only = opts.only or list(MODELS)
    for model in only:
        cfg = _config(data, epochs, model)
        result = _train(cfg, tmp / "runs", model)
        torch.set_num_threads(os.cpu_count() or 1)
        result["plain_loop_img_per_s"] = round(plain_rate(cfg, PLAIN_EPOCHS), 2)
        same = result["img_per_s_same_epochs"]
        result["ratio"] = None if same is None else round(
            same / result["plain_loop_img_per_s"], 3)
        result["config"] = MODELS[model]
        out[model] = result
    return out


def bench_detection_coco128(opts: BenchOptions) -> dict[str, Any]:
    epochs, tmp = max(opts.epochs, 1), opts.tmp
    root = Path(opts.data) if opts.data else shared_data() / "coco128"
    if not root.is_dir():
        raise DataError(f"no coco128 at {root}: set RAYLAB_DATA or pass --data", path=root)
    say_data(f"coco128 at {root}")
    shards = tmp / "coco128"
    for split in ("train2017", "val2017"):
        convert_coco(root / "images" / split, root / "annotations" / f"instances_{split}.json",
                     shards / split)
    ensure_ray()
    cfg = _config(str(shards), epochs, "cnn", **{
        "train_split": "train2017", "eval_split": "val2017", "image_size": 256,
        "channels": 128, "optim.batch_size": 4, "optim.reference_batch": 4,
        "aug.scale_range": [0.8, 1.25], "eval_every": epochs})
    result = _train(cfg, tmp / "runs", "coco128")
    return {"bench": "detection-coco128", "epochs": epochs, **result,
            "config": {"model": "resnet18 + FPN, random init", "image_size": 256}}
