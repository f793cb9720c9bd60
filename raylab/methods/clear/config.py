"""CLEAR's config: the strategy, the protocol, the buffer and the per-bucket optimiser."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from raylab import config as cfglib
from raylab.continual.buffers import BUFFERS
from raylab.continual.runner import BucketSettings
from raylab.continual.strategies import STRATEGIES, build_strategy
from raylab.errors import ConfigError
from raylab.models.timm_names import check_timm_model


@dataclass
class ClearOptimConfig:
    """SGD per bucket, a fresh optimizer each bucket (the CLEAR authors' avalanche runs)."""

    #: Passes over each bucket's training rows.
    epochs: int = 5
    #: Rows per step over all workers (replay rows come on top).
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-5

    def validate(self) -> None:
        cfglib.require(self.epochs >= 1, "optim.epochs", "an integer >= 1", self.epochs)
        cfglib.require(self.batch_size >= 1, "optim.batch_size", "an integer >= 1",
                       self.batch_size)
        cfglib.require(self.lr > 0, "optim.lr", "a positive number", self.lr)
        cfglib.require(0 <= self.momentum < 1, "optim.momentum", "in [0, 1)", self.momentum)
        cfglib.require(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)


@dataclass
class ClearConfig(cfglib.MethodConfig):
    #: A converted stream (``raylab data convert clear`` / ``data sample clear``): ``data``.
    strategy: str = "er"
    protocol: Literal["iid", "streaming"] = "iid"
    #: Share of each bucket trained on under the IID protocol.
    train_fraction: float = 0.7
    #: Share of each bucket's training rows set aside as validation rows: a Tune trial
    #: trains without them and scores them; the final run never scores them (see
    #: raylab.continual.stream). 0: streaming tests on whole buckets, and no tuning.
    val_fraction: float = 0.1
    #: timm network trained from scratch (ignored with ``features``).
    model: str = "resnet18"
    #: A DINO checkpoint: train a linear classifier on its frozen teacher's features.
    features: str = ""
    #: Side of the square images; null: the stream's image size, at most 224 (with
    #: ``features``: the DINO model's size).
    input_size: int | None = None
    #: Random-crop padding of training images (-1: no crop/flip augmentation).
    padding: int = 4
    #: Replay buffer kind ("" = the strategy's own: reservoir for Finetune/ER/AGEM,
    #: class_balanced for GDumb); "biased_reservoir" gives "Finetuning (biased reservoir)".
    buffer: str = ""
    #: Rows in the buffer; 0 = one bucket's training rows, as in the paper.
    buffer_size: int = 0
    #: Share of a biased reservoir for each new bucket (the bench's 0.5); null: the dynamic
    #: 1/t share, which is exactly ER's reservoir (so "Finetuning (biased reservoir)" would
    #: repeat the ER row): refused with buffer=biased_reservoir.
    buffer_alpha: float | None = 0.5
    #: Strategy knobs (null keeps the strategy's default, the CLEAR authors' values).
    replay_ratio: float | None = None
    ewc_lambda: float | None = None
    si_c: float | None = None
    lwf_alpha: float | None = None
    lwf_temperature: float | None = None
    agem_sample_size: int | None = None
    optim: ClearOptimConfig = field(default_factory=ClearOptimConfig)

    def validate(self) -> None:
        cfglib.require(0 < self.train_fraction < 1, "train_fraction", "in (0, 1)",
                       self.train_fraction)
        cfglib.require(0 <= self.val_fraction < 1, "val_fraction", "in [0, 1)",
                       self.val_fraction)
        cfglib.require(self.input_size is None or self.input_size >= 8, "input_size",
                       "null or an integer >= 8", self.input_size)
        cfglib.require(self.padding >= -1, "padding", "an integer >= -1", self.padding)
        cfglib.require(self.buffer_size >= 0, "buffer_size", "an integer >= 0 (0: one bucket)",
                       self.buffer_size)
        cfglib.require(self.buffer_alpha is None or 0 < self.buffer_alpha <= 1,
                       "buffer_alpha", "null or in (0, 1]", self.buffer_alpha)
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"config key 'strategy': {self.strategy!r} is not one of "
                              f"{sorted(STRATEGIES)}")
        if self.buffer == "biased_reservoir" and self.buffer_alpha is None:
            raise ConfigError("config key 'buffer_alpha': null with buffer=biased_reservoir "
                              "is the 1/t reservoir, i.e. ER's buffer; give a share in "
                              "(0, 1] (e.g. 0.5) or use buffer=reservoir")
        if self.buffer and self.buffer not in BUFFERS:
            raise ConfigError(f"config key 'buffer': {self.buffer!r} is not one of "
                              f"{sorted(BUFFERS)} (or empty for the strategy's own)")
        make_strategy(self)  # range checks of the knobs, naming them
        if not self.features:
            check_timm_model(self.model, "model")


def strategy_kwargs(cfg: ClearConfig) -> dict[str, Any]:
    """The chosen strategy's keywords from the config knobs that are set."""
    knobs = STRATEGIES[cfg.strategy].config_knobs
    return {kw: getattr(cfg, knob) for knob, kw in knobs.items()
            if getattr(cfg, knob) is not None}


def make_strategy(cfg: ClearConfig) -> Any:
    """The configured strategy (a fresh one, with no state)."""
    kwargs = strategy_kwargs(cfg)
    if cfg.strategy == "finetune" and cfg.buffer and "replay_ratio" not in kwargs:
        kwargs["replay_ratio"] = 1.0  # a buffer named for Finetune means: replay from it
    try:
        return build_strategy(cfg.strategy, **kwargs)
    except ConfigError as exc:
        raise ConfigError(f"strategy {cfg.strategy!r}: {exc}") from None


def row_label(cfg: ClearConfig) -> str:
    """The Table-1 row name of a config, e.g. "Finetuning (biased reservoir)"."""
    label = STRATEGIES[cfg.strategy].table_name
    if cfg.strategy == "finetune" and (cfg.buffer or (cfg.replay_ratio or 0) > 0):
        label += f" ({(cfg.buffer or 'reservoir').replace('_', ' ')})"
    return label


def bucket_settings(cfg: ClearConfig) -> BucketSettings:
    """How each bucket is trained."""
    o = cfg.optim
    return BucketSettings(epochs=o.epochs, batch_size=o.batch_size, lr=o.lr,
                          momentum=o.momentum, weight_decay=o.weight_decay,
                          precision=cfg.precision, padding=cfg.padding, seed=cfg.seed)
