"""The reuse method's config: a saved raylab backbone, how much of it trains, its adapters,
and a transfer recipe (shorter and lighter than ConvNeXt's ImageNet recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field

from raylab import config as cfglib
from raylab.models.adapters import AdapterConfig
from raylab.models.backbones import WHICH
from raylab.models.freeze import FREEZE_MODES
from raylab.tasks.classification.config import AugConfig, ClassificationConfig, ImageOptimConfig


def _transfer_optim() -> ImageOptimConfig:
    # A head (and adapters) on fixed features converges in tens of epochs; the lr is the
    # usual transfer lr of AdamW at batch 256, scaled to the global batch.
    return ImageOptimConfig(lr=1e-3, reference_batch=256, batch_size=128, epochs=30,
                            warmup_epochs=2, weight_decay=0.05, min_lr=1e-6)


def _transfer_aug() -> AugConfig:
    # Crops and flips only: Mixup/CutMix and RandAugment regularise a network trained for
    # hundreds of epochs, which a frozen backbone's head is not.
    return AugConfig(auto_augment="", re_prob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1,
                     scale=[0.35, 1.0], color_jitter=0.0)


@dataclass
class ReuseConfig(ClassificationConfig):
    """A classifier on a saved raylab backbone: frozen, adapted, fine-tuned or (for the
    baseline) the same network from scratch.

    ``model`` is not used: the network is the checkpoint's (its own config rebuilds it).
    """

    #: A raylab run's checkpoint folder (``.../run/model`` or a ``checkpoint_*``) of
    #: ``dino``, ``convnext`` (any timm classifier) or ``minivit``: its network without the
    #: classifier head becomes this run's backbone.
    backbone_checkpoint: str = ""
    #: ``auto`` (the EMA / DINO teacher when saved, else the trained model), ``teacher`` /
    #: ``ema`` or ``student`` / ``model``.
    backbone_weights: str = "auto"
    #: Build the checkpoint's network but keep its random init: the from-scratch baseline.
    from_scratch: bool = False
    #: ``none`` (fine-tune all), ``backbone`` (frozen weights, norm layers train) or
    #: ``backbone+norms`` (frozen weights and normalisation statistics: the paper's setting).
    freeze: str = "backbone+norms"
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    #: Stochastic depth of the reused network (0: a frozen backbone's features stay
    #: deterministic); null uses the same 0.
    drop_path: float | None = 0.0
    aug: AugConfig = field(default_factory=_transfer_aug)
    optim: ImageOptimConfig = field(default_factory=_transfer_optim)

    def validate(self) -> None:
        super().validate()
        cfglib.require(self.backbone_weights in WHICH, "backbone_weights",
                       f"one of {list(WHICH)}", self.backbone_weights)
        cfglib.require(self.freeze in FREEZE_MODES, "freeze", f"one of {list(FREEZE_MODES)}",
                       self.freeze)
        self.adapters.validate()
