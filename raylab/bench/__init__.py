"""`raylab bench NAME`: the figures in BENCHMARKS.md, each against a baseline in the same run.

One registry, :data:`BENCHES`: a benchmark's name, the function that runs it (imported
only when it runs) and what it compares. Every function takes a :class:`BenchOptions` and
returns a JSON-able dict; :func:`run` adds the date and prints it.

- :mod:`.skill`: the platform figures on JIGSAWS (train overhead, ingest, latency,
  scaling) against plain torch loops, DataLoaders and torch DDP;
- :mod:`.images`: image ingest, ConvNeXt and DINO on CIFAR, DINO scaling;
- :mod:`.clear`: the CLEAR Table 1;
- :mod:`.detection`: Mask R-CNN learning on the synthetic detection sample, and coco128;
- :mod:`.copy_paste`: Simple Copy-Paste and self-training in the low-data regime, and
  its ingest against a DataLoader;
- :mod:`.curate`: CLIP embedding of an image pool (CLEAR-style curation) against a
  plain loop, and curating again from the cache;
- :mod:`.stego`: STEGO against k-means on raw DINO features, CamVid and coco128;
- :mod:`.gpu`: step benchmarks on a GPU without Ray (``python -m raylab.bench.gpu``).
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raylab.runtime.options import RunOptions

#: Set by the CLI as early as possible: "time from command start" is measured from here.
COMMAND_START = time.time()


@dataclass
class BenchOptions:
    """What ``raylab bench`` passes to every benchmark (each uses what it needs)."""

    data: str | None = None
    epochs: int = 3
    workers: int = 1
    features: str | None = None
    seeds: int = 3
    #: Alternations of a benchmark and its baseline (each bench has its own default).
    rounds: int | None = None
    #: Loader processes on each side of an ingest benchmark (each bench has its default).
    processes: int | None = None
    out: str | None = None
    only: list[str] | None = None
    tmp: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))


def shared_data() -> Path:
    """The real-data folder: ``$RAYLAB_DATA``, else ``shared/data`` beside the checkout
    (``../shared/data`` from the repository's root)."""
    default = Path(__file__).resolve().parents[3] / "shared" / "data"
    return Path(os.environ.get("RAYLAB_DATA", default))


def local_options(workers: int = 1) -> RunOptions:
    """The RunOptions ``raylab train --workers N`` uses on this machine (``--cpus-per-worker
    auto``: the cores shared between the workers), so a bench measures what a user runs."""
    from raylab.runtime.options import RunOptions, parse_cpus

    return RunOptions(workers=workers, cpus_per_worker=parse_cpus(
        "auto", workers, joins_cluster=False, tuning=False))


def say_data(what: str) -> None:
    """Print which data a benchmark measures on (a fallback must never be silent)."""
    print(f"bench data: {what}", flush=True)


@dataclass(frozen=True)
class Bench:
    target: str  # "module:function" under raylab.bench
    about: str


BENCHES: dict[str, Bench] = {
    "train-overhead": Bench("skill:bench_train_overhead",
                            "skill samples/s in a TorchTrainer vs a plain loop; start-up"),
    "ingest": Bench("skill:bench_ingest", "Ray Data windows/s vs a torch DataLoader"),
    "latency": Bench("skill:bench_latency", "per-window inference latency, 1 thread"),
    "scaling": Bench("skill:bench_scaling", "2 Train workers vs 1, next to plain torch DDP"),
    "loso": Bench("skill:bench_loso", "a whole LOSO run vs a plain PyTorch script"),
    "startup": Bench("skill:bench_startup",
                     "first step of raylab's run vs a bare TorchTrainer's"),
    "ingest-images": Bench("images:bench_ingest_images",
                           "Ray Data images/s vs a torch DataLoader (timm transform)"),
    "convnext-cifar": Bench("images:bench_convnext_cifar", "ConvNeXt top-1 on CIFAR"),
    "dino-cifar": Bench("images:bench_dino_cifar",
                        "DINO k-NN vs random init and supervised, same network"),
    "dino-scaling": Bench("images:bench_dino_scaling", "DINO img/s with 1 vs 2 workers"),
    "clear-table": Bench("clear:bench_clear_table", "the CLEAR paper's Table 1"),
    "detection-sample": Bench("detection:bench_detection_sample",
                              "ViTDet and CNN Mask R-CNN AP on the synthetic sample; "
                              "img/s vs a plain loop"),
    "detection-coco128": Bench("detection:bench_detection_coco128",
                               "a short CPU run on coco128: its AP"),
    "minivit-cifar": Bench("minivit:bench_minivit_cifar",
                           "MiniViT: teacher, plain, multiplexed and distilled student"),
    "reuse": Bench("reuse:bench_reuse",
                   "frozen backbone reuse: scratch, fine-tuned, frozen, adapters, bigger "
                   "detector (CIFAR + detection sample)"),
    "gpu-steps": Bench("gpu:bench_steps",
                       "ConvNeXt, DINO and ViTDet steps on a GPU vs plain steps"),
    "copy-paste": Bench("copy_paste:bench_copy_paste",
                        "LSJ vs LSJ + copy-paste, and self-training, on few labeled "
                        "images (AP over seeds)"),
    "ingest-detection": Bench("copy_paste:bench_ingest_detection",
                              "LSJ + copy-paste in Ray Data tasks vs a torch DataLoader"),
    "curate": Bench("curate:bench_curate",
                    "CLIP embedding as a Ray Data actor pool (1, 2 actors) vs a plain loop; "
                    "curating again from cached embeddings"),
    "stego": Bench("stego:bench_stego",
                   "STEGO vs k-means on the same frozen DINO features (CamVid, coco128)"),
}


def run(name: str, options: BenchOptions | None = None) -> dict[str, Any]:
    """Run benchmark ``name`` in a temporary folder; print its figures as JSON, return them."""
    bench = BENCHES[name]
    module, function = bench.target.split(":")
    fn = getattr(importlib.import_module(f"raylab.bench.{module}"), function)
    options = options or BenchOptions()
    with tempfile.TemporaryDirectory(prefix="raylab-bench-") as tmp:
        options.tmp = Path(tmp)
        result = fn(options)
    result["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps({k: v for k, v in result.items() if k != "markdown"}, indent=2))
    return result


__all__ = ["BENCHES", "COMMAND_START", "Bench", "BenchOptions", "local_options", "run",
           "say_data", "shared_data"]
