"""STEGO's config: the reference's defaults (mhamilton723/STEGO ``train_config.yml``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from raylab import config as cfglib

#: The three correspondence terms: an image with itself, with a KNN partner, with a
#: random image (the reference's pos_intra, pos_inter and neg_inter).
PAIRS = ("self", "knn", "rand")


@dataclass
class StegoLossConfig:
    """Weights (lambda) and shifts (b) of the three pairs: the reference's cocostuff
    values."""

    self_weight: float = 0.67
    knn_weight: float = 0.25
    rand_weight: float = 0.63
    self_shift: float = 0.18
    knn_shift: float = 0.12
    rand_shift: float = 0.46
    #: Points sampled per side of each feature map (11 -> 11x11 points).
    feature_samples: int = 11
    #: Centre the feature correlation per point (the reference's default).
    pointwise: bool = True
    #: Clamp the code correlation at 0 (the reference's default).
    zero_clamp: bool = True

    def validate(self) -> None:
        weights = self.weights()
        for name, w in zip(PAIRS, weights):
            cfglib.require(w >= 0, f"loss.{name}_weight", ">= 0", w)
        cfglib.require(any(weights), "loss.self_weight",
                       "at least one of the three weights > 0", weights)
        cfglib.require(self.feature_samples >= 1, "loss.feature_samples", "an integer >= 1",
                       self.feature_samples)

    def weights(self) -> tuple[float, float, float]:
        return (self.self_weight, self.knn_weight, self.rand_weight)

    def shifts(self) -> tuple[float, float, float]:
        return (self.self_shift, self.knn_shift, self.rand_shift)


@dataclass
class StegoOptimConfig:
    """Adam for the segmentation head; the probes learn 10x faster (the reference's)."""

    lr: float = 5e-4
    probe_lr: float = 5e-3
    #: Global batch over all workers (each worker needs >= 2: the random-image pairs
    #: are drawn within a worker's batch).
    batch_size: int = 32
    epochs: int = 20

    def validate(self) -> None:
        cfglib.require(self.lr > 0, "optim.lr", "a positive number", self.lr)
        cfglib.require(self.probe_lr > 0, "optim.probe_lr", "a positive number",
                       self.probe_lr)
        cfglib.require(self.batch_size >= 2, "optim.batch_size", "an integer >= 2",
                       self.batch_size)
        cfglib.require(self.epochs >= 1, "optim.epochs", "an integer >= 1", self.epochs)


@dataclass
class StegoConfig(cfglib.EpochConfig):
    """A segmentation head on a frozen DINO backbone; the data is a segmentation shard
    folder (``raylab data convert segmentation``)."""

    train_split: str = "train"
    eval_split: str = "val"
    #: A ``raylab train dino`` checkpoint folder (its teacher is the frozen backbone).
    backbone: str = ""
    #: ``teacher`` (the paper's) or ``student``.
    backbone_weights: str = "teacher"
    #: The backbone's input size: the shorter side is resized to it, then centre-cropped;
    #: 0 takes the DINO run's ``img_size`` (a ViT's position embeddings are sized for it).
    img_size: int = 0
    code_dim: int = 70
    dropout: float = 0.1
    #: Each image's KNN partner is one of its ``knn_k`` nearest neighbours by global
    #: feature (cosine), drawn anew every epoch.
    knn_k: int = 7
    loss: StegoLossConfig = field(default_factory=StegoLossConfig)
    #: Where the frozen features and neighbour lists are cached ("" = ``<data>/stego``).
    feature_cache: str = ""
    #: Feature-extraction actors of the Ray Data job (each holds one backbone; one GPU
    #: each when the run uses GPUs).
    feature_actors: int = 1
    feature_batch: int = 32
    #: Evaluate every N epochs (and always after the last).
    eval_every: int = 5
    #: Iterations of the cosine k-means baseline on the raw features (0: no baseline).
    kmeans_iters: int = 30
    #: Feature vectors the k-means baseline is fitted on (a seeded sample).
    kmeans_points: int = 50000
    shuffle_buffer: int = 256
    optim: StegoOptimConfig = field(default_factory=StegoOptimConfig)

    def validate(self) -> None:
        super().validate()
        cfglib.require(self.backbone_weights in ("teacher", "student"), "backbone_weights",
                       "teacher or student", self.backbone_weights)
        cfglib.require(self.img_size == 0 or self.img_size >= 8, "img_size",
                       "0 (the DINO run's) or an integer >= 8", self.img_size)
        cfglib.require(self.code_dim >= 1, "code_dim", "an integer >= 1", self.code_dim)
        cfglib.require(0 <= self.dropout < 1, "dropout", "in [0, 1)", self.dropout)
        cfglib.require(self.knn_k >= 1, "knn_k", "an integer >= 1", self.knn_k)
        for key in ("feature_actors", "feature_batch", "eval_every", "kmeans_points"):
            cfglib.require(getattr(self, key) >= 1, key, "an integer >= 1", getattr(self, key))
        cfglib.require(self.kmeans_iters >= 0, "kmeans_iters", "an integer >= 0",
                       self.kmeans_iters)
        cfglib.require(self.train_split != self.eval_split, "eval_split",
                       f"a split other than train_split={self.train_split!r}", self.eval_split)
