"""STEGO against the paper's baseline on the same frozen backbone (BENCHMARKS.md, "STEGO").

For CamVid (11 classes, void ignored) and coco128 (the 27 coarse COCO-Stuff classes):

- the backbone: ``raylab train dino`` on the segmentation images themselves (CamVid train
  + coco128 train2017, unlabeled; an ImageFolder of links with one dummy class, so DINO's
  k-NN monitor is meaningless there and is not reported), and the same ViT at random init;
- (a) the paper's baseline: cosine k-means on the raw features (unsupervised mIoU and
  accuracy after Hungarian matching) and a linear probe on them;
- (b) STEGO: ``raylab train stego`` on the same features: its cluster probe (unsupervised)
  and its linear probe.

Training images are five-cropped (ratio 0.5) as in the reference; scores are on CamVid's
test split and coco128's val2017 at the backbone's input resolution.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from raylab import config as cfglib
from raylab.bench import BenchOptions, local_options, say_data, shared_data
from raylab.runtime.cluster import ensure_ray

#: DINO on the segmentation images: the measured CIFAR recipe (jobs/configs/dino/
#: cifar_cpu.yaml) at 64 px, i.e. 8 x 8 tokens of 8 px, with a batch of 32 and twice the
#: lr per 256 images: 467 images make only 15 steps an epoch.
DINO_RECIPE = {"arch": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 8, "depth": 6,
               "drop_path": 0.0, "n_local_crops": 0, "out_dim": 1024, "hidden_dim": 1024,
               "bottleneck_dim": 128, "momentum_teacher": 0.99, "warmup_teacher_temp": 0.04,
               "teacher_temp": 0.04, "warmup_teacher_temp_epochs": 0,
               "linear_probe_epochs": 0, "knn_k": 5, "eval_every": 1000,
               "checkpoint_every": 1000, "optim.lr": 2e-3, "optim.batch_size": 32,
               "optim.warmup_epochs": 2}
#: STEGO's training at this budget (the reference's loss; batch as the reference's 32).
STEGO_RECIPE = {"optim.batch_size": 32, "eval_every": 1000, "checkpoint_every": 1000}
#: (dataset, raw images, raw masks, class map, split folders, eval split).
DATASETS = {
    "camvid": ("camvid", "camvid", "camvid", {"train": "train", "test": "test"}, "test"),
    "coco128": ("coco128/images", "coco128/semantic",
                "coco128/annotations/panoptic_categories.json",
                {"train": "train2017", "val": "val2017"}, "val"),
}


def _link_images(folders: list[Path], dst: Path) -> Path:
    """An ImageFolder of links (``train``/``test``, one class) for DINO: it trains on the
    images without labels."""
    for split in ("train", "test"):
        out = dst / split / "scene"
        out.mkdir(parents=True, exist_ok=True)
        for folder in folders:
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png"))
            if split == "test":
                files = files[:20]  # DINO's k-NN monitor needs a test split; unused here
            for f in files:
                link = out / f"{folder.parent.name}_{folder.name}_{f.name}"
                if not link.exists():
                    os.symlink(f.resolve(), link)
    return dst


def pretrain_dino(images: list[Path], tmp: Path, epochs: int) -> tuple[str, dict[str, Any]]:
    from raylab.data.imagefolder import convert_imagefolder
    from raylab.methods.dino import DINOConfig, DINOMethod

    shards = tmp / "dino_shards"
    convert_imagefolder(_link_images(images, tmp / "dino_images"), shards)
    cfg = cfglib.apply_overrides(DINOConfig(), {"data": str(shards), **DINO_RECIPE,
                                                "optim.epochs": epochs})
    t0 = time.perf_counter()
    s = DINOMethod().train(cfg, local_options(), str(tmp / "runs"), "dino")
    return str(tmp / "runs" / "dino" / "run" / "model"), {
        "epochs": epochs, "train_images": s["knn_rows"], "img_per_s": round(s["img_per_s"], 1),
        "wall_s": round(time.perf_counter() - t0, 1)}


def random_backbone(tmp: Path) -> str:
    """The same ViT as the DINO run's, at random init, saved as a DINO checkpoint."""
    import torch

    from raylab.engine.checkpoint import save_checkpoint
    from raylab.methods.dino import DINOConfig
    from raylab.methods.dino.task import build_student_teacher

    torch.manual_seed(0)
    cfg = cfglib.apply_overrides(DINOConfig(), {"data": "", **DINO_RECIPE})
    student, teacher = build_student_teacher(cfg)
    return str(save_checkpoint(tmp / "random_vit", model=student, ema=teacher, meta={
        "method": "dino", "config": cfglib.to_dict(cfg), "class_names": []}))


def convert(name: str, root: Path, tmp: Path) -> Path:
    from raylab.data.segmentation import convert_segmentation

    images, masks, classes, splits, _ = DATASETS[name]
    dst = tmp / f"{name}_shards"
    if not dst.exists():
        classes_arg = classes if classes == "camvid" else str(root / classes)
        convert_segmentation(root / images, root / masks, dst, classes=classes_arg,
                             splits=splits, five_crop=0.5)
    return dst


def stego_rows(shards: Path, eval_split: str, backbone: str, epochs: int, tmp: Path,
               name: str) -> dict[str, Any]:
    from raylab.methods.stego import StegoConfig, StegoMethod

    cfg = cfglib.apply_overrides(StegoConfig(), {
        "data": str(shards), "backbone": backbone, "eval_split": eval_split,
        "feature_cache": str(tmp / "stego_cache"), **STEGO_RECIPE, "optim.epochs": epochs})
    t0 = time.perf_counter()
    s = StegoMethod().train(cfg, local_options(), str(tmp / "runs"), name)
    r = lambda v: round(float(v), 1)  # noqa: E731
    return {
        "(a) k-means on raw features": {"miou": r(s["kmeans_miou"]),
                                        "accuracy": r(s["kmeans_accuracy"])},
        "(a) linear probe on raw features": {"miou": r(s["raw_linear_miou"]),
                                             "accuracy": r(s["raw_linear_accuracy"])},
        "(b) STEGO cluster probe": {"miou": r(s["cluster_miou"]),
                                    "accuracy": r(s["cluster_accuracy"])},
        "(b) STEGO linear probe": {"miou": r(s["linear_miou"]),
                                   "accuracy": r(s["linear_accuracy"])},
        "train_rows": s["train_rows"], "eval_rows": s["eval_rows"],
        "feature_shape": s["feature_shape"], "wall_s": round(time.perf_counter() - t0, 1),
    }


def bench_stego(opts: BenchOptions) -> dict[str, Any]:
    """``--epochs``: STEGO's epochs (DINO trains 5x as many); ``--only camvid|coco128``."""
    root = Path(opts.data) if opts.data else shared_data()
    names = [n for n in (opts.only or list(DATASETS)) if n in DATASETS]
    present = [n for n in names if (root / DATASETS[n][0]).is_dir()]
    tmp = opts.tmp
    if present:
        say_data(f"the real {', '.join(present)} at {root}")
        shards = {n: convert(n, root, tmp) for n in present}
        train_folders = [root / DATASETS[n][0] / DATASETS[n][3]["train"] for n in present]
    else:
        from raylab.data.segmentation import convert_segmentation, write_segmentation_sample

        say_data(f"SYNTHETIC segmentation sample (no CamVid/coco128 at {root}; set "
                 "RAYLAB_DATA)")
        raw = write_segmentation_sample(tmp / "seg_raw", train_images=64, val_images=16)
        present = ["sample"]
        shards = {"sample": tmp / "sample_shards"}
        convert_segmentation(raw / "images", raw / "masks", shards["sample"],
                             classes=raw / "classes.yaml", five_crop=0.5)
        train_folders = [raw / "images" / "train"]
    epochs = max(opts.epochs, 1)
    ensure_ray()
    dino, info = pretrain_dino(train_folders, tmp, 5 * epochs)
    backbones = {"DINO on the segmentation images": dino, "random init": random_backbone(tmp)}
    out: dict[str, Any] = {"bench": "stego", "stego_epochs": epochs, "dino": info,
                           "dino_recipe": DINO_RECIPE, "results": {}}
    for name in present:
        eval_split = DATASETS[name][4] if name in DATASETS else "val"
        for label, backbone in backbones.items():
            tag = f"{name}_{'dino' if backbone == dino else 'random'}"
            out["results"][f"{name}, {label}"] = stego_rows(shards[name], eval_split,
                                                            backbone, epochs, tmp, tag)
    return out
