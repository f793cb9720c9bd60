"""DINO's config: the reference's ViT-S/16 recipe (facebookresearch/dino ``main_dino.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raylab import config as cfglib
from raylab.models.timm_names import check_timm_model
from raylab.tasks.classification.config import ImageDataConfig


@dataclass
class DINOOptimConfig:
    """The reference's defaults (ViT-S/16 recipe); lr is per 256 images."""

    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    #: Global batch over all workers.
    batch_size: int = 64
    epochs: int = 100
    #: Per-parameter gradient-norm clip (0 turns it off).
    clip_grad: float = 3.0
    #: Epochs during which the head's last layer gets no update.
    freeze_last_layer: int = 1
    #: Weight decay on position embeddings and the class token too: the reference decays
    #: every parameter that is not a bias or 1-D (timm's convention exempts them: false).
    decay_tokens: bool = True

    def validate(self) -> None:
        cfglib.require(self.lr > 0, "optim.lr", "a positive number", self.lr)
        cfglib.require(self.min_lr >= 0, "optim.min_lr", ">= 0", self.min_lr)
        cfglib.require(self.batch_size >= 2, "optim.batch_size", "an integer >= 2",
                       self.batch_size)
        cfglib.require(self.epochs >= 1, "optim.epochs", "an integer >= 1", self.epochs)
        cfglib.require(0 <= self.warmup_epochs <= self.epochs, "optim.warmup_epochs",
                       f"in [0, epochs={self.epochs}]", self.warmup_epochs)
        cfglib.require(self.weight_decay >= 0 and self.weight_decay_end >= 0,
                       "optim.weight_decay", ">= 0", self.weight_decay)
        cfglib.require(self.clip_grad >= 0, "optim.clip_grad", ">= 0", self.clip_grad)
        cfglib.require(self.freeze_last_layer >= 0, "optim.freeze_last_layer", ">= 0",
                       self.freeze_last_layer)


@dataclass
class DINOConfig(ImageDataConfig):
    """The reference's recipe for ViT-S/16 at 224 px; jobs/configs/dino/cifar_cpu.yaml is a
    measured recipe for 32 px images on a CPU budget."""

    #: Any timm vit_* / deit_* / resnet* name; random init.
    arch: str = "vit_small_patch16_224"
    #: Global crop size; local crops scale with it (96 at 224, 16 at 32).
    img_size: int = 224
    #: Overrides the ViT's patch size (e.g. 4 for 32 px images).
    patch_size: int | None = None
    #: Overrides the ViT's depth (blocks), e.g. 6 for a CPU budget; null keeps the name's.
    depth: int | None = None
    drop_path: float = 0.1
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    n_local_crops: int = 6
    global_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    momentum_teacher: float = 0.996
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    student_temp: float = 0.1
    center_momentum: float = 0.9
    # The split DINO trains on (labels unused; e.g. ``bucket_00`` of a CLEAR stream, its
    # unlabeled pre-training bucket) is ``train_split``; the labelled split the k-NN
    # accuracy and the linear probe are measured on is ``eval_split``.
    #: Labelled split forming the k-NN bank and the linear probe's training set; "" uses
    #: ``train_split`` (which must then be labelled), e.g. ``bucket_01`` of a CLEAR stream.
    knn_split: str = ""
    #: Share of the k-NN split held out (by a hash of the image path) as Tune's queries.
    val_fraction: float = 0.1
    #: Use only the first N training rows (0 = all), for training and, when the k-NN
    #: split is the train split, as the k-NN bank.
    max_train_rows: int = 0
    knn_k: int = 20
    knn_temperature: float = 0.07
    #: k-NN evaluation every N epochs (and always after the last).
    eval_every: int = 5
    #: Also score the student's features with the k-NN (``*_knn_top1_student``). The
    #: teacher is the reference's feature extractor; in short runs it lags the student
    #: by the EMA's horizon, and this shows by how much.
    knn_student: bool = False
    linear_probe_epochs: int = 100
    shuffle_buffer: int = 512
    optim: DINOOptimConfig = field(default_factory=DINOOptimConfig)

    def validate(self) -> None:
        super().validate()
        cfglib.require(self.img_size >= 8, "img_size", "an integer >= 8", self.img_size)
        cfglib.require(self.depth is None or self.depth >= 1, "depth", "null or >= 1",
                       self.depth)
        cfglib.require(0 <= self.drop_path < 1, "drop_path", "in [0, 1)", self.drop_path)
        for key in ("out_dim", "hidden_dim", "bottleneck_dim"):
            cfglib.require(getattr(self, key) >= 1, key, "an integer >= 1", getattr(self, key))
        cfglib.require(self.n_local_crops >= 0, "n_local_crops", ">= 0", self.n_local_crops)
        for key in ("global_scale", "local_scale"):
            v = getattr(self, key)
            cfglib.require(len(v) == 2 and 0 < v[0] <= v[1] <= 1, key,
                           "[lo, hi] with 0 < lo <= hi <= 1", v)
        cfglib.require(0 <= self.momentum_teacher < 1, "momentum_teacher", "in [0, 1)",
                       self.momentum_teacher)
        for key in ("warmup_teacher_temp", "teacher_temp", "student_temp"):
            cfglib.require(getattr(self, key) > 0, key, "> 0", getattr(self, key))
        cfglib.require(0 <= self.center_momentum < 1, "center_momentum", "in [0, 1)",
                       self.center_momentum)
        cfglib.require(self.knn_k >= 1, "knn_k", "an integer >= 1", self.knn_k)
        cfglib.require(self.knn_temperature > 0, "knn_temperature", "> 0", self.knn_temperature)
        cfglib.require(self.eval_every >= 1, "eval_every", ">= 1", self.eval_every)
        for key in ("linear_probe_epochs", "warmup_teacher_temp_epochs"):
            cfglib.require(getattr(self, key) >= 0, key, "an integer >= 0", getattr(self, key))
        check_timm_model(self.arch, "arch")

    @property
    def effective_lr(self) -> float:
        """The reference's linear scaling: lr x global batch / 256."""
        return self.optim.lr * self.optim.batch_size / 256

    def backbone_kwargs(self) -> dict[str, Any]:
        """Further ``timm.create_model`` arguments of the backbone."""
        return {} if self.depth is None else {"depth": self.depth}
