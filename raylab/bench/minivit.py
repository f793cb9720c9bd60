"""MiniViT on CIFAR (figures in BENCHMARKS.md): the paper's ablation layout at a CPU budget.

Four rows under the same data, recipe and epochs, top-1 after the last epoch:

- the teacher: a plain ViT-Small-width network (384 wide, 6 heads), 6 blocks;
- the plain student: a ViT-Tiny-width network (192 wide, 3 heads), 6 blocks, unshared
  (what a user would train without MiniViT: the baseline);
- the multiplexed student: the same, sharing every 2 blocks with weight transformation,
  trained on the labels alone;
- the multiplexed and distilled student: the same, with L_pred + L_attn + 0.1 L_hddn from
  the teacher (equal token counts: both use 8 px patches at 32 px);

and the distilled run again on 2 Train workers (its img/s and top-1 next to 1 worker).

``--only convnext-teacher`` replaces the ViT teacher by one trained to a clear lead: the
ConvNeXt run of ``raylab bench convnext-cifar`` (convnext_atto, the short-budget recipe,
15 epochs), and distils the multiplexed student from its predictions (L_pred alone: the
relation terms need a ViT teacher, as in the paper), next to the plain and multiplexed
students trained in the same session.
"""

from __future__ import annotations

import time
from typing import Any

from raylab import config as cfglib
from raylab.bench import BenchOptions
from raylab.bench.images import CIFAR_SHORT_RECIPE, image_shards
from raylab.methods.convnext import ConvNeXtConfig, ConvNeXtMethod
from raylab.methods.minivit import MiniViTConfig, MiniViTMethod
from raylab.runtime.cluster import ensure_ray
from raylab.runtime.options import RunOptions, parse_cpus

#: Light augmentation: a ViT from scratch on 5,000 images in a few epochs learns little
#: under the full DeiT recipe (RandAugment, Mixup, CutMix), as ConvNeXt did (BENCHMARKS.md).
BUDGET = {"input_size": 32, "patch_size": 8, "depth": 6, "optim.batch_size": 128,
          "optim.reference_batch": 128, "optim.lr": 1e-3, "optim.warmup_epochs": 1,
          "drop_path": 0.0, "aug.auto_augment": "", "aug.mixup": 0.0, "aug.cutmix": 0.0,
          "aug.re_prob": 0.0, "aug.scale": [0.5, 1.0], "checkpoint_every": 1000}
TEACHER = {"model": "vit_small_patch16_224", "sharing": "none", "transform": False}
STUDENT = {"model": "vit_tiny_patch16_224"}
ROWS = {
    "plain student": {**STUDENT, "sharing": "none", "transform": False},
    "multiplexed": {**STUDENT, "sharing": "every-2", "transform": True},
    "multiplexed + distilled": {**STUDENT, "sharing": "every-2", "transform": True},
}


def _run(shards: str, name: str, overrides: dict[str, Any], workers: int, root: str
         ) -> dict[str, Any]:
    cfg = cfglib.apply_overrides(MiniViTConfig(), {"data": shards, **BUDGET, **overrides})
    t0 = time.perf_counter()
    # What `raylab train` gives the workers on this machine (--cpus-per-worker auto).
    cpus = parse_cpus("auto", workers, joins_cluster=False, tuning=False)
    s = MiniViTMethod().train(cfg, RunOptions(workers=workers, cpus_per_worker=cpus), root, name)
    return {"params": s["params"], "plain_params": s["plain_params"],
            "gmacs": round(s["gmacs"], 4), "top1": round(s["top1"], 4),
            "top5": round(s["top5"], 4), "teacher_top1": s.get("teacher_top1"),
            "train_img_per_s": round(s["train_img_per_s"], 1),
            "wall_s": round(time.perf_counter() - t0, 1)}


#: Epochs of the ConvNeXt teacher: those of the convnext-cifar figures in BENCHMARKS.md.
CONVNEXT_TEACHER_EPOCHS = 15


def _convnext_teacher(shards: str, root: str) -> tuple[dict[str, Any], str]:
    cfg = cfglib.apply_overrides(ConvNeXtConfig(), {
        "data": shards, **CIFAR_SHORT_RECIPE, "optim.epochs": CONVNEXT_TEACHER_EPOCHS,
        "checkpoint_every": 1000})
    t0 = time.perf_counter()
    cpus = parse_cpus("auto", 1, joins_cluster=False, tuning=False)
    s = ConvNeXtMethod().train(cfg, RunOptions(workers=1, cpus_per_worker=cpus), root,
                               "convnext_teacher")
    row = {"model": cfg.model, "epochs": CONVNEXT_TEACHER_EPOCHS, "params": s.get("params"),
           "top1": round(s["top1"], 4), "top5": round(s["top5"], 4),
           "train_img_per_s": round(s["train_img_per_s"], 1),
           "wall_s": round(time.perf_counter() - t0, 1)}
    return row, f"{root}/convnext_teacher/run/model"


def _with_convnext_teacher(shards: str, epochs: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {"bench": "minivit-cifar", "variant": "convnext-teacher",
                           "epochs": epochs, "budget": BUDGET, "student": STUDENT}
    out["teacher"], model = _convnext_teacher(shards, root)
    every = {"optim.epochs": epochs}
    for row in ("plain student", "multiplexed"):
        out[row] = _run(shards, row.replace(" ", "_"), {**ROWS[row], **every}, 1, root)
    out["multiplexed + distilled"] = _run(
        shards, "distilled_from_convnext",
        {**ROWS["multiplexed + distilled"], "teacher": model, **every}, 1, root)
    return out


def bench_minivit_cifar(opts: BenchOptions) -> dict[str, Any]:
    epochs, tmp = max(opts.epochs, 2), opts.tmp
    shards = image_shards(opts.data, tmp)
    ensure_ray()
    root = str(tmp / "runs")
    if "convnext-teacher" in (opts.only or []):
        return _with_convnext_teacher(shards, epochs, root)
    out: dict[str, Any] = {"bench": "minivit-cifar", "epochs": epochs,
                           "budget": BUDGET, "teacher_config": TEACHER, "student": STUDENT}
    every = {"optim.epochs": epochs}
    out["teacher"] = _run(shards, "teacher", {**TEACHER, **every}, 1, root)
    teacher = {"teacher": str(tmp / "runs" / "teacher" / "run" / "model")}
    for row, overrides in ROWS.items():
        extra = teacher if "distilled" in row else {}
        out[row] = _run(shards, row.replace(" ", "_").replace("+", "and"),
                        {**overrides, **extra, **every}, 1, root)
    if opts.workers > 1 or "2-workers" in (opts.only or []):
        out["multiplexed + distilled, 2 workers"] = _run(
            shards, "distilled_2w", {**ROWS["multiplexed + distilled"], **teacher, **every},
            2, root)
    return out
