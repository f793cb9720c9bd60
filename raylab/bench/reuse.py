"""Frozen-backbone reuse (figures in BENCHMARKS.md): one saved backbone, several tasks.

The backbone is a ResNet-18 (BatchNorm, so that frozen statistics matter) trained by
``raylab train convnext`` on half of the CIFAR-10 subset's classes (the *source* task). Then,
under the same budget and from that one checkpoint:

- ``cifar``: the other five classes (the *target* task) with ``raylab train reuse``: from
  scratch (the same network, random init), fine-tuned (``freeze=none``), frozen with its
  norm layers training (``backbone``), frozen (``backbone+norms``), frozen + residual
  adapters beside every block;
- ``detection``: the synthetic detection sample with ``raylab train detection`` on the
  ResNet-18 + FPN Mask R-CNN: from scratch, fine-tuned, frozen, frozen + adapters, and
  frozen + a bigger detector (``fpn_layers``, ``head_convs``).

Each row: top-1 or box/mask AP, trainable parameters, the memory a training step holds
(fp32 weights, the trainable ones' gradients and AdamW moments, and the activations saved
for the backward pass of one batch, measured with autograd's saved-tensor hooks), and the
training img/s. The from-scratch row is what a user gets without a pretrained backbone;
fine-tuning is the paper's reference point.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raylab import config as cfglib
from raylab.bench import BenchOptions, local_options, say_data, shared_data
from raylab.data.imagefolder import convert_imagefolder, write_image_sample
from raylab.runtime.cluster import ensure_ray

BACKBONE = "resnet18"
#: The source task's recipe (the backbone) and the target task's (every row): light
#: augmentation, as in the other CIFAR benchmarks at a CPU budget.
SOURCE = {"model": BACKBONE, "input_size": 32, "optim.batch_size": 128,
          "optim.reference_batch": 128, "optim.lr": 2e-3, "optim.warmup_epochs": 1,
          "drop_path": 0.0, "aug.auto_augment": "", "aug.mixup": 0.0, "aug.cutmix": 0.0,
          "aug.re_prob": 0.0, "aug.scale": [0.5, 1.0], "checkpoint_every": 1000}
TARGET = {"input_size": 32, "optim.batch_size": 128, "optim.reference_batch": 128,
          "optim.lr": 2e-3, "optim.warmup_epochs": 1, "checkpoint_every": 1000}
CLASSIFICATION_ROWS = {
    "from scratch": {"from_scratch": True, "freeze": "none"},
    "fine-tuned": {"freeze": "none"},
    "frozen, norms train": {"freeze": "backbone"},
    "frozen": {"freeze": "backbone+norms"},
    "frozen + adapters": {"freeze": "backbone+norms", "adapters.every": 1,
                          "adapters.dim": 0},
}
DETECTION_ROWS = {
    "from scratch": {"freeze": "none", "backbone_checkpoint": ""},
    "fine-tuned": {"freeze": "none"},
    "frozen": {"freeze": "backbone+norms"},
    "frozen + adapters": {"freeze": "backbone+norms", "adapters.every": 1,
                          "adapters.dim": 0},
    "frozen + bigger detector": {"freeze": "backbone+norms", "fpn_layers": 2,
                                 "head_convs": 6},
}


def split_classes(src: Path, dst: Path) -> tuple[Path, Path, list[str]]:
    """Two ImageFolders of symlinks: the first half of ``src``'s classes (source task)
    and the second half (target task), each with its train and test splits."""
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    half = len(classes) // 2
    out = []
    for name, chosen in (("source", classes[:half]), ("target", classes[half:])):
        for split in ("train", "test"):
            (dst / name / split).mkdir(parents=True, exist_ok=True)
            for c in chosen:
                link = dst / name / split / c
                if not link.exists():
                    link.symlink_to((src / split / c).resolve(), target_is_directory=True)
        out.append(dst / name)
    return out[0], out[1], classes


def step_memory_mb(model: nn.Module, run_step: Any) -> dict[str, float]:
    """What one training step holds: fp32 weights, the trainable parameters' gradients and
    AdamW moments, and the activations autograd saves for the backward pass (each storage
    counted once), measured by running ``run_step(model)`` (forward + backward) under
    saved-tensor hooks."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_step(model)
    weights = sum(p.numel() * 4 for p in params)
    state = sum(p.numel() * 4 * 3 for p in trainable)
    return {"weights_mb": round(weights / 2**20, 1),
            "grads_and_adamw_mb": round(state / 2**20, 1),
            "saved_activations_mb": round(sum(seen.values()) / 2**20, 1),
            "step_memory_mb": round((weights + state + sum(seen.values())) / 2**20, 1)}


def _classifier_memory(cfg: Any, classes: int) -> dict[str, float]:
    from raylab.methods.reuse.models import build_reuse_model

    model, _ = build_reuse_model(cfg, classes)
    model.train()
    x = torch.randn(cfg.optim.batch_size, 3, cfg.input_size, cfg.input_size)
    y = torch.randint(0, classes, (cfg.optim.batch_size,))
    return step_memory_mb(model, lambda m: nn.functional.cross_entropy(m(x), y).backward())


def _detector_memory(cfg: Any, num_classes: int, data: str) -> dict[str, float]:
    from raylab.tasks.detection.data import load_detection_data, read_batch, train_transform
    from raylab.tasks.detection.task import LOSS_KEYS, build_model
    from raylab.transforms.detection_batch import (
        detection_batch_transform,
        to_torchvision_targets,
    )

    loaded = load_detection_data(cfg)
    batch = read_batch(loaded.train_folder)
    rows = {k: v[: cfg.optim.batch_size] for k, v in batch.items()}
    jittered = detection_batch_transform(rows, train_transform(cfg),
                                         label_map=loaded.label_map, seed=0)
    images, targets = to_torchvision_targets(jittered)
    model = build_model(cfg, num_classes)
    model.train()
    torch.manual_seed(0)
    return step_memory_mb(model, lambda m: sum(
        v for k, v in m(images, targets).items() if k in LOSS_KEYS).backward())


def pretrain_backbone(source: Path, tmp: Path, epochs: int) -> tuple[str, dict[str, Any]]:
    """``raylab train convnext`` of ResNet-18 on the source task; its model folder."""
    from raylab.methods.convnext import ConvNeXtConfig, ConvNeXtMethod

    convert_imagefolder(source, tmp / "source_shards")
    cfg = cfglib.apply_overrides(ConvNeXtConfig(), {
        "data": str(tmp / "source_shards"), **SOURCE, "optim.epochs": epochs})
    t0 = time.perf_counter()
    s = ConvNeXtMethod().train(cfg, local_options(), str(tmp / "runs"), "backbone")
    return str(tmp / "runs" / "backbone" / "run" / "model"), {
        "model": BACKBONE, "epochs": epochs, "source_top1": round(s["top1"], 4),
        "wall_s": round(time.perf_counter() - t0, 1)}


def bench_reuse_cifar(opts: BenchOptions, backbone: str, target: Path, epochs: int,
                      classes: int) -> dict[str, Any]:
    from raylab.methods.reuse import ReuseConfig, ReuseMethod

    convert_imagefolder(target, opts.tmp / "target_shards")
    rows: dict[str, Any] = {}
    for row, overrides in CLASSIFICATION_ROWS.items():
        cfg = cfglib.apply_overrides(ReuseConfig(), {
            "data": str(opts.tmp / "target_shards"), "backbone_checkpoint": backbone,
            **TARGET, **overrides, "optim.epochs": epochs})
        t0 = time.perf_counter()
        s = ReuseMethod().train(cfg, local_options(), str(opts.tmp / "runs"),
                                "cls_" + row.replace(" ", "_").replace(",", "").replace("+",
                                                                                      "and"))
        rows[row] = {"top1": round(s["top1"], 4), "params": s["params"],
                     "trainable_params": s["trainable_params"],
                     "adapter_params": s["adapter_params"],
                     **_classifier_memory(cfg, classes),
                     "train_img_per_s": round(s["train_img_per_s"], 1),
                     "wall_s": round(time.perf_counter() - t0, 1)}
    return rows


def bench_reuse_detection(opts: BenchOptions, backbone: str, epochs: int) -> dict[str, Any]:
    from raylab.bench.detection import SAMPLE_BUDGET
    from raylab.data.detection_sample import convert_sample, write_detection_sample
    from raylab.methods.detection import DetectionConfig, DetectionMethod

    raw = write_detection_sample(opts.tmp / "det_raw", images=128, val_images=32, size=128,
                                 classes=3)
    data = str(convert_sample(raw, opts.tmp / "det_shards"))
    rows: dict[str, Any] = {}
    for row, overrides in DETECTION_ROWS.items():
        cfg = cfglib.apply_overrides(DetectionConfig(), {
            "data": data, **SAMPLE_BUDGET, "backbone": "cnn", "model": BACKBONE,
            "backbone_checkpoint": backbone, "report_images": 0, **overrides,
            "optim.epochs": epochs, "eval_every": epochs})
        t0 = time.perf_counter()
        s = DetectionMethod().train(cfg, local_options(), str(opts.tmp / "runs"),
                                    "det_" + row.replace(" ", "_").replace("+", "and"))
        rows[row] = {"box_AP": _round(s["bbox"]["AP"]), "box_AP50": _round(s["bbox"]["AP50"]),
                     "mask_AP": _round(s["segm"]["AP"]), "params": s["params"],
                     "trainable_params": s["trainable_params"],
                     **_detector_memory(cfg, len(s["classes"]) + 1, data),
                     "train_img_per_s": round(s["train_img_per_s"], 2),
                     "wall_s": round(time.perf_counter() - t0, 1)}
    return rows


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def bench_reuse(opts: BenchOptions) -> dict[str, Any]:
    """``--only cifar`` / ``--only detection`` for one half; ``--epochs`` each row's."""
    epochs, tmp = max(opts.epochs, 2), opts.tmp
    src = Path(opts.data) if opts.data else shared_data() / "cifar10"
    if src.is_dir():
        what = f"ImageFolder {src}" if opts.data else f"the real CIFAR-10 subset at {src}"
        say_data(f"{what} (its classes split in two tasks)")
    else:
        say_data(f"SYNTHETIC shapes (no CIFAR-10 at {src}; set RAYLAB_DATA)")
        src = write_image_sample(tmp / "raw", classes=10, train_per_class=200,
                                 test_per_class=50)
    source, target, classes = split_classes(src, tmp / "tasks")
    ensure_ray()
    backbone, info = pretrain_backbone(source, tmp, 2 * epochs)
    out: dict[str, Any] = {"bench": "reuse", "epochs": epochs, "backbone": info,
                           "source_classes": classes[:len(classes) // 2],
                           "target_classes": classes[len(classes) // 2:]}
    only = opts.only or ["cifar", "detection"]
    if "cifar" in only:
        out["cifar"] = bench_reuse_cifar(opts, backbone, target, epochs,
                                         len(classes) - len(classes) // 2)
    if "detection" in only:
        out["detection"] = bench_reuse_detection(opts, backbone, epochs)
    return out
