"""Image benchmarks for `raylab bench` (figures in BENCHMARKS.md), each with its baseline.

- ``ingest-images``: images/s decoded + augmented (timm train transform: RandAugment,
  random erasing, bicubic) through the Ray Data pipeline the ConvNeXt method trains from,
  vs a torch DataLoader running the same transform over the same shards with as many
  worker processes as Ray Data may use CPUs.
- ``convnext-cifar``: top-1 of ``convnext_atto`` trained from scratch for a fixed number of
  epochs with the recipe scaled to the budget, next to a plain ResNet-18 under the same
  epochs, recipe and data (the CIFAR-10 subset when present).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raylab import config as cfglib


def image_shards(data: str | None, tmp: Path) -> str:
    """A shard folder: ``data`` itself, ``data`` converted from an ImageFolder, or CIFAR."""
    from raylab.data.imagefolder import convert_imagefolder, write_image_sample

    if data and (Path(data) / "manifest.json").is_file():
        return str(Path(data).resolve())
    src: Path
    if data:
        src = Path(data)
    else:
        root = Path(os.environ.get("RAYLAB_DATA", Path(__file__).parents[2] / "shared" / "data"))
        src = root / "cifar10"
        if not src.is_dir():
            src = write_image_sample(tmp / "raw", classes=10, train_per_class=200,
                                     test_per_class=50)
    convert_imagefolder(src, tmp / "image_shards")
    return str(tmp / "image_shards")


def _config(shards: str, **overrides: Any) -> Any:
    from raylab.methods.convnext import ConvNeXtConfig

    return cfglib.apply_overrides(ConvNeXtConfig(), {"data": shards, **overrides})


class _ShardImages(torch.utils.data.IterableDataset):
    """The hand-written baseline: each DataLoader worker reads its own shard files and
    applies the same timm transform row by row."""

    def __init__(self, paths: list[str], input_size: int, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.paths, self.input_size, self.kwargs = paths, input_size, kwargs

    def __iter__(self):
        import pyarrow.parquet as pq

        from raylab.transforms.images import build_transform, decode_image

        transform = build_transform(True, self.input_size, **self.kwargs)
        info = torch.utils.data.get_worker_info()
        mine = self.paths[info.id::info.num_workers] if info else self.paths
        for path in mine:
            table = pq.read_table(path, columns=["image", "label"])
            images = table.column("image").to_pylist()
            labels = table.column("label").to_pylist()
            for i in np.random.permutation(len(labels)):
                yield transform(decode_image(images[i])), labels[i]


def bench_ingest_images(shards: str, epochs: int, tmp: Path, processes: int = 2,
                        input_size: int = 32, batch: int = 64) -> dict[str, Any]:
    import ray.data

    from raylab.data.imagefolder import split_paths
    from raylab.methods.convnext import _transform_kwargs, image_dataset
    from raylab.runtime.cluster import ensure_ray
    from raylab.transforms.images import DeviceNormalize

    cfg = _config(shards, input_size=input_size)
    paths = split_paths(shards, cfg.train_split)
    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        cpu=processes)
    ds = image_dataset(paths, cfg, training=True)
    # The consumer finishes what the uint8 loader leaves to the worker (normalise, random
    # erasing), so both sides deliver the same normalised, erased float batches.
    prepare = DeviceNormalize(cfg.aug.re_prob)
    ray_rates, dl_rates, n = [], [], 0
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for b in ds.iter_torch_batches(batch_size=batch):
            prepare(b["image"])
            n += len(b["label"])
        ray_rates.append(n / (time.perf_counter() - t0))
    loader = torch.utils.data.DataLoader(
        _ShardImages(paths, input_size, _transform_kwargs(cfg)), batch_size=batch,
        num_workers=processes)
    for _ in range(epochs):
        t0, m = time.perf_counter(), 0
        for _x, y in loader:
            m += len(y)
        dl_rates.append(m / (time.perf_counter() - t0))
    ray_rate, dl_rate = statistics.median(ray_rates[1:]), statistics.median(dl_rates[1:])
    return {"bench": "ingest-images", "images_per_epoch": n, "epochs": epochs,
            "input_size": input_size, "processes": processes,
            "loader_dtype": cfg.loader_dtype, "materialized": cfg.materialize_mb > 0,
            "ray_data_images_per_s": round(ray_rate, 1),
            "dataloader_images_per_s": round(dl_rate, 1), "ratio": round(ray_rate / dl_rate, 3)}


#: The ImageNet recipe scaled to a short CPU run: lr for the actual batch and a one-epoch
#: warm-up; augmentation, Mixup/CutMix, smoothing and weight decay as in the paper.
CIFAR_BUDGET = {"input_size": 32, "optim.batch_size": 128, "optim.reference_batch": 128,
                "optim.lr": 2e-3, "optim.warmup_epochs": 1}


def bench_convnext_cifar(shards: str, epochs: int, tmp: Path, input_size: int = 32
                         ) -> dict[str, Any]:
    from raylab.methods.convnext import ConvNeXtMethod
    from raylab.runtime.cluster import ensure_ray
    from raylab.runtime.options import RunOptions

    ensure_ray()
    out: dict[str, Any] = {"bench": "convnext-cifar", "epochs": epochs,
                           "budget": dict(CIFAR_BUDGET, input_size=input_size)}
    for model in ("convnext_atto", "resnet18"):
        cfg = _config(shards, model=model, **dict(CIFAR_BUDGET, input_size=input_size),
                      **{"optim.epochs": epochs, "checkpoint_every": 1000})
        t0 = time.perf_counter()
        summary = ConvNeXtMethod().train(cfg, RunOptions(workers=1), str(tmp / "runs"), model)
        out[model] = {"top1": round(summary["top1"], 4), "top5": round(summary["top5"], 4),
                      "params": summary["params"], "gmacs": round(summary["gmacs"], 4),
                      "train_img_per_s": round(summary["train_img_per_s"], 1),
                      "wall_s": round(time.perf_counter() - t0, 1)}
    return out


BENCHES = {"ingest-images": bench_ingest_images, "convnext-cifar": bench_convnext_cifar}
