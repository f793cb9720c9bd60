"""Each method's task on the engine with small, deterministic in-memory data.

A scenario builds a method's real worker-side task (the code Ray Train workers run) over
:class:`~raylab.engine.shards.InMemoryShard` data, with every source of per-process
randomness turned off (dropout, drop-path, Mixup, random erasing), so that data-parallel
runs can be compared with one process bit for bit, and a resumed run with an
uninterrupted one. Used by tests/unit/test_engine_properties.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raylab import config as cfglib
from raylab.engine.context import LocalContext
from raylab.engine.keys import TEST
from raylab.engine.loop import build_and_run
from raylab.engine.shards import InMemoryShard


@dataclass
class Scenario:
    """A method's config overrides, its task, its run arguments and its data."""

    config_class: type
    task: type
    overrides: dict[str, Any]
    run: dict[str, Any]
    train: dict[str, torch.Tensor]
    #: Evaluation datasets by name, and which of them only the chief reads (whole).
    evaluate: dict[str, dict[str, torch.Tensor]]
    whole: tuple[str, ...] = ()
    #: Datasets every worker reads whole (e.g. STEGO's feature bank).
    replicated: tuple[str, ...] = ()

    def config(self, **more: Any) -> Any:
        return cfglib.apply_overrides(self.config_class(), {**self.overrides, **more})


def _images(n: int, size: int, classes: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (n, 3, size, size), generator=g,
                                   dtype=torch.uint8),
            "label": torch.randint(0, classes, (n,), generator=g)}


def skill() -> Scenario:
    from raylab.methods.skill import SkillConfig
    from raylab.methods.skill.task import SkillTask

    g = torch.Generator().manual_seed(0)
    # 70 training windows: 4 global batches of 16 and a short one of 6 (3 per worker).
    train = {"x": torch.randn(70, 30, 76, generator=g),
             "y": torch.randint(0, 3, (70,), generator=g),
             "trial_idx": torch.arange(70) % 5}
    # 23 evaluation windows: not divisible by 2 workers.
    test = {"x": torch.randn(23, 30, 76, generator=g),
            "y": torch.randint(0, 3, (23,), generator=g),
            "trial_idx": torch.arange(23) % 5}
    return Scenario(SkillConfig, SkillTask, {
        "window": 30, "model.channels": [8, 8, 8], "model.fc_dim": 16,
        "model.dropout_conv": 0.0, "model.dropout_fc": 0.0, "optim.batch_size": 16,
        "optim.epochs": 3, "cache_mb": 0, "shuffle_buffer": 64, "checkpoint_every": 1},
        {"split": TEST, "eval_trial_labels": [0, 1, 2, 0, 1],
         "checkpoint_meta": {"method": "skill"}}, train, {TEST: test})


def convnext() -> Scenario:
    from raylab.methods.convnext import ConvNeXtConfig
    from raylab.tasks.classification.task import ClassificationTask

    # 36 training images: 9 micro-batches of 4 rows, an odd number, so with grad_accum=2
    # every epoch ends on a short accumulation group.
    return Scenario(ConvNeXtConfig, ClassificationTask, {
        "model": "convnext_atto", "input_size": 32, "drop_path": 0.0,
        "optim.batch_size": 8, "optim.reference_batch": 8, "optim.lr": 2e-3,
        "optim.epochs": 3, "optim.warmup_epochs": 1, "aug.mixup": 0.0, "aug.cutmix": 0.0,
        "aug.re_prob": 0.0, "ema": True, "ema_decay": 0.9, "cache_mb": 0,
        "shuffle_buffer": 64, "checkpoint_every": 1},
        {"split": TEST, "num_classes": 4, "train_rows": 36,
         "checkpoint_meta": {"method": "convnext"}},
        _images(36, 32, 4, 1), {TEST: _images(13, 32, 4, 2)})


def dino() -> Scenario:
    from raylab.methods.dino import DINOConfig
    from raylab.methods.dino.task import KNN_BANK, KNN_QUERY, DINOTask

    g = torch.Generator().manual_seed(3)
    crops = {f"crop{i}": torch.randint(0, 256, (24, 3, size, size), generator=g,
                                       dtype=torch.uint8)
             for i, size in enumerate((16, 16, 8))}
    return Scenario(DINOConfig, DINOTask, {
        "arch": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 8, "depth": 1,
        "drop_path": 0.0, "out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8,
        "n_local_crops": 1, "momentum_teacher": 0.99, "warmup_teacher_temp_epochs": 1,
        "optim.batch_size": 8, "optim.epochs": 3, "optim.warmup_epochs": 1,
        "eval_every": 1, "knn_k": 5, "linear_probe_epochs": 3, "cache_mb": 0,
        "shuffle_buffer": 64, "checkpoint_every": 1},
        {"split": TEST, "num_classes": 4, "train_rows": 24,
         "checkpoint_meta": {"method": "dino"}},
        crops, {KNN_BANK: _images(20, 16, 4, 4), KNN_QUERY: _images(9, 16, 4, 5)},
        whole=(KNN_BANK, KNN_QUERY))


def _detection_rows(split: str, transform: Any, evaluation: bool) -> dict[str, Any]:
    """A synthetic detection split as the Ray Data pipeline delivers it (numpy columns,
    per-row boxes and masks as object arrays), jittered once with a fixed seed."""
    import tempfile

    from raylab.data.detection_sample import convert_sample, write_detection_sample
    from raylab.tasks.detection.data import eval_batch, read_batch
    from raylab.transforms.detection_batch import contiguous_label_map, detection_batch_transform

    global _DETECTION_SAMPLE
    if _DETECTION_SAMPLE is None:
        import atexit
        import shutil

        root = Path(tempfile.mkdtemp(prefix="raylab-detection-scenario-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        write_detection_sample(root / "raw", images=12, val_images=5, size=64, classes=2)
        _DETECTION_SAMPLE = convert_sample(root / "raw", root / "shards")
    batch = read_batch(_DETECTION_SAMPLE / split)
    labels = contiguous_label_map([1, 2])
    if evaluation:
        return eval_batch(batch, transform, labels)
    return detection_batch_transform(batch, transform, label_map=labels, seed=0)


_DETECTION_SAMPLE: Path | None = None


def detection() -> Scenario:
    from raylab.tasks.detection.config import DetectionConfig
    from raylab.tasks.detection.task import DetectionTask
    from raylab.transforms.detection import ResizePad, ScaleJitter

    # 12 training images: 3 global batches of 4; 5 evaluation images (odd for 2 workers).
    return Scenario(DetectionConfig, DetectionTask, {
        "backbone": "vitdet", "model": "vit_tiny_patch16_224", "image_size": 64,
        "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
        "window_size": 4, "global_blocks": [1], "channels": 16, "drop_path": 0.0,
        "roi_batch_size": 64, "rpn_proposals_train": 100, "rpn_proposals_test": 50,
        "optim.batch_size": 4, "optim.epochs": 3, "optim.warmup_iters": 2,
        "optim.reference_batch": 4, "optim.lr": 1e-3, "eval_every": 1, "eval_batch": 2,
        "cache_mb": 0, "shuffle_buffer": 16, "checkpoint_every": 1},
        {"split": TEST, "categories": [{"id": 1, "name": "circle"},
                                       {"id": 2, "name": "square"}],
         "train_rows": 12, "checkpoint_meta": {"method": "detection"},
         # AP by class frequency, one category per bin.
         "ap_bins": {"rare": [1], "frequent": [2]}},
        _detection_rows("train", ScaleJitter(64, (0.5, 1.5)), False),
        {TEST: _detection_rows("val", ResizePad(64), True)})


def minivit() -> Scenario:
    """A 2-layer ViT-Tiny student sharing all layers, with weight transformation, distilled
    from a 12-layer ViT-Tiny (weights in a local file) by all three MiniViT losses."""
    import tempfile

    import timm

    from raylab.methods.minivit import MiniViTConfig
    from raylab.methods.minivit.task import MiniViTTask

    global _MINIVIT_TEACHER
    if _MINIVIT_TEACHER is None:
        import atexit
        import shutil

        root = Path(tempfile.mkdtemp(prefix="raylab-minivit-scenario-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        torch.manual_seed(7)
        teacher = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=4)
        _MINIVIT_TEACHER = root / "teacher.pth"
        torch.save(teacher.state_dict(), _MINIVIT_TEACHER)
    return Scenario(MiniViTConfig, MiniViTTask, {
        "model": "vit_tiny_patch16_224", "input_size": 32, "depth": 2, "drop_path": 0.0,
        "sharing": "all", "teacher": "vit_tiny_patch16_224",
        "teacher_weights": str(_MINIVIT_TEACHER), "distill.gt": 0.5,
        "optim.batch_size": 8, "optim.reference_batch": 8, "optim.lr": 2e-3,
        "optim.epochs": 3, "optim.warmup_epochs": 1, "aug.mixup": 0.0, "aug.cutmix": 0.0,
        "aug.re_prob": 0.0, "cache_mb": 0, "shuffle_buffer": 64, "checkpoint_every": 1},
        {"split": TEST, "num_classes": 4, "train_rows": 24, "class_names": list("abcd"),
         "checkpoint_meta": {"method": "minivit"}},
        _images(24, 32, 4, 6), {TEST: _images(13, 32, 4, 7)})


_MINIVIT_TEACHER: Path | None = None


def reuse_backbone() -> Path:
    """A ``raylab train convnext`` checkpoint of a ResNet-10-T (BatchNorm statistics moved
    off their init), written once per process."""
    global _REUSE_BACKBONE
    if _REUSE_BACKBONE is None:
        import atexit
        import shutil
        import tempfile

        import timm

        from raylab.engine.checkpoint import save_checkpoint

        root = Path(tempfile.mkdtemp(prefix="raylab-reuse-scenario-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        torch.manual_seed(11)
        model = timm.create_model("resnet10t", num_classes=5)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 1.5)
        _REUSE_BACKBONE = save_checkpoint(root / "model", model=model, meta={
            "method": "convnext", "config": {"model": "resnet10t", "input_size": 32},
            "class_names": list("abcde")})
    return _REUSE_BACKBONE


def reuse() -> Scenario:
    """A saved ResNet-10-T, frozen with its BatchNorm statistics, an adapter beside its
    one shape-keeping block (layer1.0; the other stages open with a downsampling block),
    a new 4-class head."""
    from raylab.methods.reuse import ReuseConfig
    from raylab.methods.reuse.task import ReuseTask

    return Scenario(ReuseConfig, ReuseTask, {
        "backbone_checkpoint": str(reuse_backbone()), "freeze": "backbone+norms",
        "adapters.every": 1, "adapters.dim": 8, "input_size": 32,
        "optim.batch_size": 8, "optim.reference_batch": 8, "optim.lr": 2e-3,
        "optim.epochs": 3, "optim.warmup_epochs": 1, "aug.re_prob": 0.0, "cache_mb": 0,
        "shuffle_buffer": 64, "checkpoint_every": 1},
        {"split": TEST, "num_classes": 4, "train_rows": 24,
         "checkpoint_meta": {"method": "reuse"}},
        _images(24, 32, 4, 8), {TEST: _images(13, 32, 4, 9)})


_REUSE_BACKBONE: Path | None = None

def stego_features(n: int, seed: int, classes: int = 3, size: int = 8
                   ) -> dict[str, torch.Tensor]:
    """Feature maps (12 x 4 x 4, float16) of images whose left half is one class and right
    half another, each class a fixed direction in feature space plus noise; labels at
    ``size`` px."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.eye(12)[:classes] * 3
    feats, labels = [], []
    for _ in range(n):
        a, b = torch.randperm(classes, generator=g)[:2].tolist()
        cls = torch.tensor([a, a, b, b]).repeat(4, 1)  # (h, w): columns 0-1 a, 2-3 b
        feats.append(directions[cls].permute(2, 0, 1) + 0.3 * torch.randn(12, 4, 4,
                                                                           generator=g))
        labels.append(cls.repeat_interleave(size // 4, 0).repeat_interleave(size // 4, 1))
    return {"feats": torch.stack(feats).half(), "label": torch.stack(labels).to(torch.uint8)}


def stego() -> Scenario:
    """STEGO's head and probes on 24 training images' cached features (3 global batches of
    8), partners among each image's 3 nearest neighbours, 10 evaluation images."""
    from raylab.methods.stego import StegoConfig
    from raylab.methods.stego.task import BANK, EVAL, StegoTask

    train = stego_features(24, 0)
    keys = torch.nn.functional.normalize(train["feats"].float().mean((2, 3)), dim=1)
    knn = (keys @ keys.T).fill_diagonal_(-2).topk(3, dim=1).indices
    index = torch.arange(24)
    return Scenario(StegoConfig, StegoTask, {
        "code_dim": 8, "eval_every": 1, "kmeans_iters": 10, "shuffle_buffer": 64,
        "cache_mb": 0, "checkpoint_every": 1, "loss.feature_samples": 4,
        "optim.epochs": 3, "optim.batch_size": 8},
        {"split": TEST, "num_classes": 3, "feature_shape": [12, 4, 4], "img_size": 8,
         "knn": knn.numpy(), "checkpoint_meta": {"method": "stego"}},
        {"index": index, **train},
        {BANK: {"index": index, "feats": train["feats"]}, EVAL: stego_features(10, 1)},
        whole=(EVAL,), replicated=(BANK,))


SCENARIOS = {"skill": skill, "convnext": convnext, "dino": dino, "detection": detection,
             "minivit": minivit, "reuse": reuse, "stego": stego}


def context(scenario: Scenario, run_dir: str | Path | None = None,
            context_class: type[LocalContext] = LocalContext) -> LocalContext:
    """A worker context over the scenario's data; in a process group, this rank's share
    (the whole evaluation sets only on rank 0)."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() \
        else (0, 1)
    shards = {"train": InMemoryShard(scenario.train, rank, world)}
    for name, columns in scenario.evaluate.items():
        if name in scenario.replicated:
            shards[name] = InMemoryShard(columns, 0, 1, shuffle=False, split="eval")
        elif name in scenario.whole:
            if rank == 0:
                shards[name] = InMemoryShard(columns, 0, 1, split="eval")
        else:
            shards[name] = InMemoryShard(columns, rank, world, split="eval")
    return context_class(shards, run_dir=run_dir)


def weights(task: Any) -> dict[str, torch.Tensor]:
    """The task's checkpointed tensors (model, EMA/teacher), unwrapped, on the CPU."""
    from raylab.engine.checkpoint import unwrap_model

    out = {}
    for key, obj in task.state_objects().items():
        if key in ("model", "ema") and obj is not None:
            for name, value in unwrap_model(obj).state_dict().items():
                out[f"{key}.{name}"] = value.detach().cpu().clone()
    return out


def train(name: str, overrides: dict[str, Any] | None = None,
          run_dir: str | None = None, context_class: type[LocalContext] = LocalContext
          ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Train scenario ``name`` (in a process group: this rank's part); returns the final
    weights and the reports. Module-level, so that :func:`tests.ddp.run_ranks` can run it."""
    scenario = SCENARIOS[name]()
    cfg = scenario.config(**(overrides or {}))
    ctx = context(scenario, run_dir, context_class)
    task = build_and_run(lambda c: scenario.task(cfg, dict(scenario.run, name=name), c),
                         ctx, cfg.seed)
    return weights(task), ctx.reports


# ----------------------------------------------------------------------------- CLEAR


class TinyNet(torch.nn.Module):
    """A small CNN without batch norm (whose statistics would differ between 1 and 2
    workers); the CLEAR tests' learner."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(),
                                        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.fc = torch.nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def clear_steps(strategy: str, steps: int = 6) -> dict[str, torch.Tensor]:
    """One bucket of ``steps`` global batches of 8 rows through the CLEAR learner's step
    (:class:`~raylab.continual.loop.BucketTrainer`); in a process group each rank takes
    every ``world``-th row of each global batch. Returns the final weights."""
    import torch.distributed as dist

    from raylab.continual.loop import BucketTrainer
    from raylab.continual.strategies import build_strategy
    from raylab.engine.context import LocalContext
    from raylab.engine.loop import seed_everything

    ctx = LocalContext()
    seed_everything(0)
    model = ctx.prepare_model(TinyNet())
    learner = build_strategy(strategy)
    learner.all_reduce = ctx.all_reduce_sum if dist.is_initialized() else None
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g))
               for _ in range(steps)]
    mine = [(x[ctx.rank::ctx.world_size], y[ctx.rank::ctx.world_size]) for x, y in batches]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = BucketTrainer(model, learner, optimizer, "cpu")
    for batch in mine:
        trainer.step(batch)
    trainer.finish(lambda: iter(mine))
    return {k: v.detach().clone() for k, v in getattr(model, "module", model).state_dict().items()}


def clear_learner(stream: str, state_dir: str, strategy: str
                  ) -> tuple[dict[str, torch.Tensor], list[list[float | None]]]:
    """This rank's CLEAR learner through the whole tiny stream, on the engine's loop, with
    its own stream service (every rank's service takes the same decisions from the same
    seed). Returns the final weights and R as this rank's service recorded it."""
    import torch.distributed as dist

    from raylab.continual.rows import ImageRows, stream_rows
    from raylab.continual.stream import StreamService, strategy_flags
    from raylab.methods.clear import ClearConfig, make_strategy
    from raylab.methods.clear.task import STREAM, ClearTask

    class TinyClearTask(ClearTask):
        def build_learner(self, run: dict) -> tuple[torch.nn.Module, Any]:
            return TinyNet(), ImageRows(self.cfg.data, 16)

    rank = dist.get_rank() if dist.is_initialized() else 0
    cfg = cfglib.apply_overrides(ClearConfig(), {
        "data": stream, "strategy": strategy, "optim.epochs": 2, "optim.batch_size": 8,
        "optim.lr": 0.05, "seed": 3})
    service = StreamService(Path(state_dir) / f"rank{rank}.json",
                            bucket_rows=stream_rows(stream, [1, 2, 3, 4]), protocol="iid",
                            seed=0, **strategy_flags(make_strategy(cfg), 20))
    ctx = LocalContext(services={STREAM: service})
    run = {"name": "clear", "split": TEST, "num_classes": 4, "input_size": 16, "buckets": 4,
           "checkpoint_meta": {"method": "clear"}}
    task = build_and_run(lambda c: TinyClearTask(cfg, run, c), ctx, cfg.seed)
    return weights(task), service.metrics()["matrix"]


_STEGO_BACKBONE: Path | None = None


def stego_backbone() -> Path:
    """A ``raylab train dino`` checkpoint of a 2-block ViT with 8-px patches at 32 px
    (random weights: the tests check the wiring, not the features), written once per
    process."""
    global _STEGO_BACKBONE
    if _STEGO_BACKBONE is None:
        import atexit
        import shutil
        import tempfile

        from raylab.engine.checkpoint import save_checkpoint
        from raylab.methods.dino.config import DINOConfig
        from raylab.methods.dino.task import build_student_teacher

        root = Path(tempfile.mkdtemp(prefix="raylab-stego-scenario-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        torch.manual_seed(5)
        cfg = cfglib.from_dict(DINOConfig, {
            "arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 2,
            "out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8})
        student, teacher = build_student_teacher(cfg)
        _STEGO_BACKBONE = save_checkpoint(root / "model", model=student, ema=teacher, meta={
            "method": "dino", "config": cfglib.to_dict(cfg), "class_names": []})
    return _STEGO_BACKBONE
