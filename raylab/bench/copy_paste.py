"""Simple Copy-Paste benchmarks (BENCHMARKS.md, "Simple Copy-Paste"; issue 16).

- ``copy-paste``: the paper's low-data regime on the SYNTHETIC detection sample: a small
  ViTDet Mask R-CNN from random init on few labeled images, same budget and seeds,
  (a) LSJ alone vs (b) LSJ + copy-paste, box and mask AP on held-out images over
  ``--seeds`` seeds (mean and spread); then self-training: the seed-0 (b) model labels
  an unlabeled pool (a Ray Data job, ``raylab predict detection --pseudo-labels``) and
  (c) labeled + pseudo-labeled and (d) the same + copy-paste train with the same number
  of optimizer steps as (a)/(b) (one seed each: :data:`PSEUDO_SEEDS`).
- ``ingest-detection``: decode + LSJ + copy-paste as Ray Data tasks (what ``raylab train
  detection`` runs) against the same Python function in a torch DataLoader with the same
  number of processes, images/s over whole epochs after a warm-up epoch.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from raylab import config as cfglib
from raylab.bench import BenchOptions, say_data, shared_data
from raylab.bench.detection import JitterCollate
from raylab.data.coco import convert_coco
from raylab.data.detection_sample import convert_sample, write_detection_sample
from raylab.data.shards import MANIFEST
from raylab.methods.detection import DetectionConfig, DetectionMethod
from raylab.runtime.cluster import ensure_ray
from raylab.runtime.options import RunOptions
from raylab.tasks.detection.data import (
    load_detection_data,
    read_batch,
    train_dataset,
)
from raylab.tasks.detection.pseudo import pseudo_label

#: 64 px images, a ViT-Tiny-wide ViTDet of 4 blocks with 8 px patches (an 8 x 8 token
#: grid, windows of 4), from random init: lr 1e-3 at batch 8, cosine, no layer decay.
#: Scale jitter 0.5-1.5 (as the detection-sample bench): the paper's LSJ 0.1-2.0 is for
#: 1024 px; at 64 px its low end leaves images of 6 px, whose objects vanish (a first run
#: with it reached box AP 0.4-0.7 % after 30 epochs, nothing to compare).
BUDGET = {"image_size": 64, "backbone": "vitdet", "model": "vit_tiny_patch16_224",
          "model_kwargs": {"depth": 4, "patch_size": 8}, "window_size": 4,
          "global_blocks": [1, 3], "channels": 64, "drop_path": 0.0,
          "optim.batch_size": 8, "optim.reference_batch": 8, "optim.lr": 1e-3,
          "optim.layer_decay": None, "optim.warmup_iters": 20, "optim.schedule": "cosine",
          "aug.jitter": "lsj", "aug.scale_range": [0.5, 1.5], "report_images": 0,
          "checkpoint_every": 1000,
          "rpn_proposals_train": 300, "rpn_proposals_test": 200, "roi_batch_size": 128}
#: The low-data regime: labeled training images, an unlabeled pool, held-out images.
LABELED, UNLABELED, HELD_OUT = 32, 64, 32
#: Seeds of the self-training arms (each needs the teacher's pseudo-labels; the CPU
#: budget allows one), while the labeled-only arms run ``--seeds``.
PSEUDO_SEEDS = 1
#: Copy-paste on every image, blended (the paper's default). The occlusion rule's
#: thresholds scaled from the paper's 1024 px (10 px of box shift, 300 px of area left)
#: to the bench's 64 px: unscaled, a 64 px image's objects (a few hundred px each) were
#: removed once their box moved by 10 px with their visible rest taught as background,
#: and copy-paste lost 6 box / 9 mask AP more at 80 epochs (BENCHMARKS.md).
COPY_PASTE = {"aug.copy_paste.prob": 1.0, "aug.copy_paste.blend": True,
              "aug.copy_paste.box_thr": 1, "aug.copy_paste.area_thr": 2}
#: Detections at least this confident become pseudo-labels.
PSEUDO_THRESHOLD = 0.5


def _sample(tmp: Path) -> tuple[Path, Path]:
    """The labeled set (train + val shards) and the unlabeled pool (a train split drawn
    with another seed; its annotations are never read)."""
    labeled = convert_sample(write_detection_sample(
        tmp / "raw", images=LABELED, val_images=HELD_OUT, size=64, classes=3, seed=0),
        tmp / "shards")
    pool_raw = write_detection_sample(tmp / "raw_pool", images=UNLABELED, val_images=1,
                                      size=64, classes=3, seed=1)
    pool = tmp / "pool"
    convert_coco(pool_raw / "images" / "train", pool_raw / "annotations" /
                 "instances_train.json", pool)
    return labeled, pool


def _run(cfg: DetectionConfig, storage: Path, name: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    # In-process (--workers 0): the Ray Data pipeline (jitter, paste) still runs in Ray
    # tasks; the arms differ only in their data, and a Train worker's start-up per run
    # would cost more than some runs.
    summary = DetectionMethod().train(cfg, RunOptions(workers=0), str(storage), name)
    return {"box_AP": summary["bbox"]["AP"], "box_AP50": summary["bbox"]["AP50"],
            "mask_AP": summary["segm"]["AP"], "mask_AP50": summary["segm"]["AP50"],
            "train_loss": summary["train_loss"], "train_images": summary["train_images"],
            "pseudo_images": summary["pseudo_images"],
            "wall_s": round(time.perf_counter() - t0, 1)}


def _spread(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": runs}
    for key in ("box_AP", "box_AP50", "mask_AP", "mask_AP50"):
        values = [r[key] for r in runs]
        out[key] = {"mean": round(statistics.fmean(values), 4),
                    "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}
    return out


def bench_copy_paste(opts: BenchOptions) -> dict[str, Any]:
    """``--epochs`` of the labeled-only arms (default 40); ``--seeds``; ``--only``: any of
    ``lsj``, ``copy-paste``, ``pseudo``, ``pseudo+copy-paste``."""
    epochs = opts.epochs if opts.epochs > 3 else 40
    seeds = max(opts.seeds, 1)
    say_data(f"the SYNTHETIC detection sample at 64 px: {LABELED} labeled, {UNLABELED} "
             f"unlabeled, {HELD_OUT} held-out images")
    shards, pool = _sample(opts.tmp)
    ensure_ray()
    base = cfglib.apply_overrides(DetectionConfig(), {
        "data": str(shards), **BUDGET, "optim.epochs": epochs, "eval_every": epochs})
    # Self-training sees LABELED + UNLABELED images an epoch: as many optimizer steps as
    # the labeled-only arms take fewer, longer epochs.
    pseudo_epochs = max(1, round(epochs * LABELED / (LABELED + UNLABELED)))
    arms = {"lsj": {}, "copy-paste": COPY_PASTE, "pseudo": {}, "pseudo+copy-paste": COPY_PASTE}
    only = opts.only or list(arms)
    out: dict[str, Any] = {"bench": "copy-paste", "epochs": epochs,
                           "pseudo_epochs": pseudo_epochs, "seeds": seeds, "budget": BUDGET,
                           "pseudo_threshold": PSEUDO_THRESHOLD}
    storage = opts.tmp / "runs"
    pseudo: Path | None = None
    for arm in only:
        if arm.startswith("pseudo") and pseudo is None:
            teacher = storage / "copy-paste-0" / "run" / "model"
            if not teacher.exists():
                _run(cfglib.apply_overrides(base, {**COPY_PASTE, "seed": 0}), storage,
                     "copy-paste-0")
            pseudo = opts.tmp / "pseudo"
            t0 = time.perf_counter()
            manifest = pseudo_label(teacher, pool, pseudo, threshold=PSEUDO_THRESHOLD,
                                    actors=1)
            out["pseudo_labels"] = {**manifest["extra"]["counts"],
                                    "seconds": round(time.perf_counter() - t0, 1)}
        runs = []
        for seed in range(PSEUDO_SEEDS if arm.startswith("pseudo") else seeds):
            extra = {**arms[arm], "seed": seed}
            if arm.startswith("pseudo"):
                extra.update({"pseudo": str(pseudo), "optim.epochs": pseudo_epochs,
                              "eval_every": pseudo_epochs})
            runs.append(_run(cfglib.apply_overrides(base, extra), storage, f"{arm}-{seed}"))
            print(f"{arm} seed {seed}: {runs[-1]}", flush=True)
        out[arm] = _spread(runs)
    return out


def bench_ingest_detection(opts: BenchOptions, processes: int = 2, size: int = 512,
                           batch: int = 8) -> dict[str, Any]:
    """coco128's training images (the synthetic sample without ``../shared/data``; or
    ``--data``: a coco128-style root, or coco shards with a ``train`` split) at ``size``
    px with LSJ + copy-paste: Ray Data tasks vs a DataLoader, ``processes`` each
    (``--processes``); the median of the epochs after the first, the arms taking turns."""
    epochs = max(opts.epochs, 3)
    processes = opts.processes or processes
    root = Path(opts.data) if opts.data else shared_data() / "coco128"
    if (root / "train" / MANIFEST).is_file():
        say_data(f"the coco shards at {root}")
        shards = root
    elif (root / "images" / "train2017").is_dir():
        say_data(f"coco128 train2017 at {root}")
        shards = opts.tmp / "coco128"
        convert_coco(root / "images" / "train2017",
                     root / "annotations" / "instances_train2017.json", shards / "train")
        convert_coco(root / "images" / "train2017",
                     root / "annotations" / "instances_train2017.json", shards / "val")
    else:
        say_data("the SYNTHETIC detection sample (128 images, 128 px): no coco128 found")
        shards = convert_sample(write_detection_sample(opts.tmp / "raw", images=128,
                                                       size=128), opts.tmp / "shards")
    cfg = cfglib.apply_overrides(DetectionConfig(), {
        "data": str(shards), "image_size": size, "aug.jitter": "lsj",
        "aug.copy_paste.prob": 1.0})
    data = load_detection_data(cfg)
    # A local cluster of exactly as many CPUs as the loader has processes: Ray Data's
    # tasks run on no more (a CPU cap in Ray Data's own limits would also turn on its
    # allocator, which a small held split runs without: runtime.datasets).
    ensure_ray(num_cpus=processes)
    # Held in the object store (a small split's default) and streamed from the shard
    # files every epoch (a split larger than materialize_mb, or remote).
    held = train_dataset(data.train_paths, cfg, data.label_map)
    streamed = train_dataset(data.train_paths, replace(cfg, materialize_mb=0), data.label_map)
    rows = read_batch(data.train_folder)
    # Batches of the pipeline's own map size.
    loader = torch.utils.data.DataLoader(
        range(len(rows["image_id"])), batch_size=batch, shuffle=True,
        num_workers=processes, persistent_workers=True,
        collate_fn=JitterCollate(rows, cfg, data.label_map))
    arms: dict[str, Any] = {
        "ray_data": lambda: held.iter_batches(batch_size=batch, batch_format="numpy"),
        "ray_data_streamed": lambda: streamed.iter_batches(batch_size=batch,
                                                           batch_format="numpy"),
        "dataloader": lambda: iter(loader)}
    rates: dict[str, list[float]] = {arm: [] for arm in arms}
    # One epoch of each arm per round, in an order that rotates every round: a drift of
    # the machine (other load, caches, Ray's own background work) touches all arms alike
    # instead of whichever ran last.
    names = list(arms)
    for r in range(epochs):
        for arm in names[r % len(names):] + names[:r % len(names)]:
            t0, n = time.perf_counter(), 0
            for b in arms[arm]():
                n += len(b["image_id"])
            rates[arm].append(n / (time.perf_counter() - t0))
    median = {arm: statistics.median(r[1:]) for arm, r in rates.items()}
    return {"bench": "ingest-detection", "images_per_epoch": n, "epochs": epochs,
            "image_size": size, "processes": processes,
            **{f"{arm}_images_per_s": round(rate, 2) for arm, rate in median.items()},
            "ratio": round(median["ray_data"] / median["dataloader"], 3),
            "ratio_streamed": round(median["ray_data_streamed"] / median["dataloader"], 3),
            **{f"{arm}_epochs": [round(r, 1) for r in r_] for arm, r_ in rates.items()}}
