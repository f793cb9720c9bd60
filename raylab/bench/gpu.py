"""GPU step benchmarks without Ray: ``python -m raylab.bench.gpu [convnext|dino|vitdet|all]``.

The GPU machines lent to this project have torch and timm but no Ray, so this measures
the worker-side step functions directly, each against a plain baseline in the same run:

- ``convnext``: training img/s of ``convnext_tiny`` at 224, bf16, channels_last, with
  and without ``torch.compile``: raylab's :class:`ClassificationStep` (Mixup/CutMix,
  smoothing, AdamW with per-iteration lr) vs timm's own train step as its ``train.py``
  does it (Mixup, SoftTargetCrossEntropy, autocast, backward, step) on the same batches.
- ``dino``: ViT-S/16 DINO step time at batch 64 with 2x224 + 6x96 crops, bf16: raylab's
  ``dino_step`` + clipping + EMA teacher vs the same step written plainly (student and
  teacher called per crop, the loss as the paper's double loop).

- ``vitdet``: ViTDet-B Mask R-CNN at 1024 px, batch 4, bf16: raylab's detection step
  (unpacking the batch as Ray Data ships it, AdamW with layer-wise decay, the lr
  schedule) vs the same model stepped plainly on targets already on the GPU.

Batches are synthetic tensors already on the device: this times the step, not the input
pipeline. Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

DEVICE = "cuda"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _time(step: Callable[[], Any], warmup: int, iters: int) -> float:
    """Mean seconds per step after ``warmup`` steps (compilation happens in the warm-up)."""
    for _ in range(warmup):
        step()
    _sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync()
    return (time.perf_counter() - t0) / iters


def _convnext(memory_format: torch.memory_format = torch.channels_last) -> torch.nn.Module:
    import timm

    model = timm.create_model("convnext_tiny", drop_path_rate=0.1).to(DEVICE)
    return model.to(memory_format=memory_format)


def _raylab_convnext_step(x: torch.Tensor, y: torch.Tensor, compiled: bool, warmup: int,
                          iters: int) -> float:
    import numpy as np

    from raylab.losses.classification import train_criterion
    from raylab.optim import build_optimizer
    from raylab.tasks.classification.step import ClassificationStep
    from raylab.transforms.images import build_mixup

    model = _convnext()
    opt = build_optimizer(model, "adamw", lr=4e-3, weight_decay=0.05)
    step = ClassificationStep(torch.compile(model) if compiled else model, opt,
                              criterion=train_criterion(True, 0.1), device=torch.device(DEVICE),
                              lr_schedule=np.full(10_000, 1e-3),
                              mixup=build_mixup(num_classes=1000), precision="bf16",
                              channels_last=True)
    return _time(lambda: step(x, y), warmup, iters)


def _timm_convnext_step(x: torch.Tensor, y: torch.Tensor, compiled: bool, warmup: int,
                        iters: int) -> float:
    """timm's train.py inner step: Mixup, autocast, SoftTargetCrossEntropy, backward, step."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    model = _convnext()
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=1000)
    criterion = SoftTargetCrossEntropy()

    def step() -> None:
        xi, yi = mix(x.clone(), y)
        xi = xi.contiguous(memory_format=torch.channels_last)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = criterion(forward(xi), yi)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _time(step, warmup, iters)


def bench_convnext(batch: int = 128, iters: int = 20, warmup: int = 5) -> dict[str, Any]:
    x = torch.randn(batch, 3, 224, 224, device=DEVICE)
    y = torch.randint(0, 1000, (batch,), device=DEVICE)
    out: dict[str, Any] = {"model": "convnext_tiny", "batch": batch, "precision": "bf16",
                           "channels_last": True}
    for compiled in (False, True):
        ours = _raylab_convnext_step(x, y, compiled, warmup, iters)
        theirs = _timm_convnext_step(x, y, compiled, warmup, iters)
        out["compile" if compiled else "eager"] = {
            "raylab_img_per_s": round(batch / ours, 1),
            "timm_img_per_s": round(batch / theirs, 1),
            "ratio": round(theirs / ours, 3)}
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return out


def bench_dino(batch: int = 64, iters: int = 10, warmup: int = 3) -> dict[str, Any]:
    from raylab.methods.dino.task import dino_step
    from raylab.models.dino import DINOHead, MultiCropWrapper, build_backbone, clip_gradients
    from raylab.optim import ModelEma, param_groups

    dev = torch.device(DEVICE)
    crops = [torch.randn(batch, 3, 224, 224, device=dev) for _ in range(2)] + \
        [torch.randn(batch, 3, 96, 96, device=dev) for _ in range(6)]

    def make(drop: float) -> torch.nn.Module:
        bb = build_backbone("vit_small_patch16_224", 224, drop_path_rate=drop)
        return MultiCropWrapper(bb, DINOHead(bb.num_features, 65536)).to(dev)

    student = make(0.1)
    teacher = ModelEma(student, decay=0.996)
    opt = torch.optim.AdamW(param_groups(student, weight_decay=0.04), lr=5e-4)
    center = torch.zeros(1, 65536, device=dev)

    def ours() -> None:
        nonlocal center
        loss, center = dino_step(student, teacher.module, crops, center, student_temp=0.1,
                                 teacher_temp=0.04, center_momentum=0.9, all_reduce=None,
                                 precision="bf16", device=dev)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(student, 3.0)
        opt.step()
        teacher.update(student, 0, decay=0.996)

    t_ours = _time(ours, warmup, iters)
    # The same step written plainly, as a first implementation would.
    s2, t2 = make(0.1), make(0.0)
    t2.load_state_dict(s2.state_dict())
    opt2 = torch.optim.AdamW(s2.parameters(), lr=5e-4, weight_decay=0.04)
    c2 = torch.zeros(1, 65536, device=dev)

    def plain() -> None:
        nonlocal c2
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            with torch.no_grad():
                t_out = [t2.head(t2.backbone(c)) for c in crops[:2]]
            s_out = [s2.head(s2.backbone(c)) for c in crops]
        loss, n = 0.0, 0
        for i, t in enumerate(t_out):
            q = F.softmax((t.float() - c2) / 0.04, dim=-1)
            for j, s in enumerate(s_out):
                if i == j:
                    continue
                loss = loss + torch.sum(-q * F.log_softmax(s.float() / 0.1, dim=-1), -1).mean()
                n += 1
        loss = loss / n
        c2 = c2 * 0.9 + 0.1 * torch.cat(t_out).float().mean(0, keepdim=True)
        opt2.zero_grad(set_to_none=True)
        loss.backward()
        for p in s2.parameters():
            if p.grad is not None:
                norm = p.grad.norm()
                if norm > 3.0:
                    p.grad.mul_(3.0 / (norm + 1e-6))
        opt2.step()
        with torch.no_grad():
            for pt, ps in zip(t2.parameters(), s2.parameters()):
                pt.mul_(0.996).add_(ps.detach(), alpha=0.004)

    t_plain = _time(plain, warmup, iters)
    return {"model": "vit_small_patch16_224", "batch": batch, "crops": "2x224 + 6x96",
            "precision": "bf16", "raylab_step_s": round(t_ours, 4),
            "plain_step_s": round(t_plain, 4), "ratio": round(t_plain / t_ours, 3),
            "raylab_img_per_s": round(batch / t_ours, 1)}


def _shape_batch(batch: int, size: int, instances: int = 8, seed: int = 0) -> dict[str, Any]:
    """A detection batch as Ray Data delivers it: uint8 pixels, per-image boxes, labels
    and bit-packed masks of random rectangles (the step's cost does not depend on them)."""
    import numpy as np

    from raylab.transforms.detection_batch import pack_masks

    rng = np.random.default_rng(seed)
    cols: dict[str, list[Any]] = {k: [] for k in ("boxes", "labels", "iscrowd", "masks",
                                                   "mask_windows")}
    for _ in range(batch):
        xy = rng.integers(0, size // 2, (instances, 2))
        wh = rng.integers(size // 16, size // 2, (instances, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        masks = np.zeros((instances, size, size), np.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.astype(int)):
            m[y1:y2, x1:x2] = 1
        data, windows = pack_masks(masks, boxes)
        for key, value in (("boxes", boxes.reshape(-1)),
                           ("labels", rng.integers(1, 81, instances)),
                           ("iscrowd", np.zeros(instances, np.uint8)), ("masks", data),
                           ("mask_windows", windows.reshape(-1))):
            cols[key].append(value)
    out: dict[str, Any] = {"image": rng.integers(0, 255, (batch, size, size, 3), np.uint8),
                           "image_id": np.arange(batch)}
    for key, values in cols.items():
        arr = np.empty(batch, dtype=object)
        arr[:] = values
        out[key] = arr
    return out


def bench_vitdet(batch: int = 4, size: int = 1024, iters: int = 10,
                 warmup: int = 3) -> dict[str, Any]:
    """ViTDet-B Mask R-CNN at 1024, bf16: raylab's detection step (unpacking the Ray Data
    batch onto the GPU, the five losses, AdamW with layer-wise decay and the lr schedule)
    vs the same model stepped plainly on targets already on the GPU."""
    from raylab import config as cfglib
    from raylab.engine.context import LocalContext
    from raylab.engine.loop import TrainState
    from raylab.engine.shards import InMemoryShard
    from raylab.tasks.detection.config import DetectionConfig
    from raylab.tasks.detection.task import LOSS_KEYS, DetectionTask, build_model
    from raylab.transforms.detection_batch import to_torchvision_targets

    dev = torch.device(DEVICE)
    cfg = cfglib.apply_overrides(DetectionConfig(), {
        "image_size": size, "precision": "bf16", "optim.batch_size": batch,
        "optim.warmup_iters": 0})
    data = _shape_batch(batch, size)
    categories = [{"id": i, "name": str(i)} for i in range(1, 81)]
    shards = {"train": InMemoryShard(data), "test": InMemoryShard(data, split="eval")}
    task = DetectionTask(cfg, {"split": "test", "categories": categories,
                               "train_rows": 1000, "checkpoint_meta": {}},
                         LocalContext(shards, device=dev))
    task.start_epoch(0)
    state = TrainState()
    def ours() -> None:
        task.train_step(data, state, False)

    t_ours = _time(ours, warmup, iters)
    params = sum(p.numel() for p in task.inner.parameters())
    task.model = task.inner = task.optimizer = None  # free its memory for the plain model
    torch.cuda.empty_cache()

    model = build_model(cfg, 81).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    images, targets = to_torchvision_targets(data, dev)

    def plain() -> None:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            losses = model(images, targets)
        loss = sum(losses[k] for k in LOSS_KEYS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_plain = _time(plain, warmup, iters)
    return {"model": "ViTDet-B (vit_base_patch16_224) Mask R-CNN", "params": params,
            "batch": batch, "image_size": size, "precision": "bf16",
            "raylab_step_s": round(t_ours, 4), "plain_step_s": round(t_plain, 4),
            "ratio": round(t_plain / t_ours, 3), "raylab_img_per_s": round(batch / t_ours, 2),
            "plain_img_per_s": round(batch / t_plain, 2),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def steps(which: str = "all") -> dict[str, Any]:
    """The step figures of ``which`` (``convnext``, ``dino`` or ``all``) on this GPU."""
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0),
                              "torch": torch.__version__}
    if which in ("convnext", "all"):
        result["convnext"] = bench_convnext()
    if which in ("dino", "all"):
        result["dino"] = bench_dino()
    if which in ("vitdet", "all"):
        result["vitdet"] = bench_vitdet()
    return result


def bench_steps(opts: Any) -> dict[str, Any]:
    """``raylab bench gpu-steps [--only convnext|dino|vitdet]``."""
    from raylab.errors import RaylabError

    if not torch.cuda.is_available():
        raise RaylabError("bench gpu-steps: no CUDA device on this machine")
    return steps((opts.only or ["all"])[0])


def main(argv: list[str] | None = None) -> int:
    which = (argv if argv is not None else sys.argv[1:]) or ["all"]
    if not torch.cuda.is_available():
        print("raylab.bench.gpu: no CUDA device", file=sys.stderr)
        return 2
    print(json.dumps(steps(which[0]), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
