"""Mask R-CNN detectors (torchvision) around a ViTDet or a timm CNN + FPN backbone.

ViTDet (Li et al., ECCV 2022; detectron2 ``projects/ViTDet``) uses Mask R-CNN with a
2-conv RPN head, a 4-conv + 1-fc box head and a 4-conv mask head, the heads' convs with
LayerNorm; ``heads="vitdet"`` builds those from torchvision's ``RPNHead(conv_depth=2)``,
``FastRCNNConvFCHead`` and ``MaskRCNNHeads`` with channel LayerNorm, ``heads="torchvision"``
keeps torchvision's defaults (1-conv RPN, two fc layers, 4 convs without norm). The CNN
backbone (``backbone="cnn"``) is any timm CNN built with ``features_only=True`` (its stride
4, 8, 16, 32 maps) + torchvision's ``FeaturePyramidNetwork`` with a max-pooled p6, like
torchvision's ``BackboneWithFPN``. For frozen-backbone reuse (Vasconcelos et al., CVPR
2022) ``freeze`` freezes the CNN body or the ViT trunk (:mod:`raylab.models.freeze`),
``adapters`` puts residual adapters beside its blocks (:mod:`raylab.models.adapters`), and
``fpn_layers`` / ``head_convs`` give the detector above it more capacity.

Images arrive already at their final size (large-scale jitter and padding to a fixed square
happen in the data pipeline), so the detector never resizes: its transform only normalises
(float images in [0, 1]) and batches (padding to a multiple of 32); boxes and masks come
back in input-image coordinates. Pure torch + timm + torchvision, no Ray import.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from raylab.errors import CheckpointError, ConfigError
from raylab.models.adapters import AdapterConfig, add_adapters
from raylab.models.backbones import WHICH, PretrainedWeights, pretrained_weights
from raylab.models.freeze import FREEZE_MODES, freeze_backbone
from raylab.models.pyramid_refine import PyramidRefinement
from raylab.models.timm_names import check_timm_model
from raylab.models.vitdet import ViTDet, layer_id, load_vitdet_weights

BACKBONES = ("vitdet", "cnn")
HEADS = ("vitdet", "torchvision")
#: Anchor sizes per pyramid level at 1024 px (torchvision's and detectron2's).
BASE_ANCHOR_SIZES = (32, 64, 128, 256, 512)


@dataclass
class DetectorConfig:
    """What :func:`build_detector` builds; the defaults are ViTDet's ViT-B Mask R-CNN."""

    #: ``"vitdet"`` (a timm ViT) or ``"cnn"`` (a timm CNN + FPN).
    backbone: str = "vitdet"
    #: timm model name (random init; weights come from ``backbone_checkpoint``).
    model: str = "vit_base_patch16_224"
    #: Object categories + 1 for the background (COCO: 80 + 1).
    num_classes: int = 81
    #: Side of the square input images (after LSJ): 1024.
    image_size: int = 1024
    #: ViTDet: window side in tokens (0: every block global).
    window_size: int = 14
    #: ViTDet: propagation block indices, or a count of evenly spaced ones.
    global_blocks: int | list[int] = 4
    #: ViTDet: ``"global"``, ``"none"`` or ``"conv"``.
    propagation: str = "global"
    #: ViTDet: ``"simple"``, ``"none"`` (one stride-16 level) or ``"fpn"`` (4-stage FPN).
    pyramid: str = "simple"
    #: Stochastic depth of the backbone's last block.
    drop_path: float = 0.1
    #: ViTDet: image size of the ViT's position embedding; None keeps the name's.
    pretrain_img_size: int | None = None
    #: Further ``timm.create_model`` arguments (``depth``, ``embed_dim``, ``patch_size``).
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    #: ``"vitdet"`` (paper's LayerNorm conv heads) or ``"torchvision"`` (its defaults).
    heads: str = "vitdet"
    #: Channels of the pyramid levels and of the RPN, box and mask heads' convs (256).
    channels: int = 256
    #: Detector capacity (Vasconcelos et al.: a frozen backbone needs a bigger detector):
    #: top-down + bottom-up cells stacked on the pyramid (0: the pyramid alone) ...
    fpn_layers: int = 0
    #: ... and 3x3 convs in the box head (``heads="vitdet"``) and the mask head (4).
    head_convs: int = 4
    #: Anchor size per level; empty: 32..512 scaled by ``min(1, image_size / 1024)``.
    anchor_sizes: list[int] = field(default_factory=list)
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    #: Normalisation of [0, 1] images: ImageNet's, what raylab's pretraining uses.
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_DEFAULT_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_DEFAULT_STD))
    #: RPN proposals kept per image (torchvision: top-n per level before NMS, in all after).
    rpn_proposals_train: int = 2000
    rpn_proposals_test: int = 1000
    #: RoIs sampled per image for the box and mask losses (25 % positive at most).
    roi_batch_size: int = 512
    detections_per_image: int = 100
    #: A raylab checkpoint folder whose network initialises the backbone ("" for none): a
    #: DINO run's ViT into the ViTDet trunk, a classifier run's (``raylab train convnext``)
    #: ViT or CNN into the trunk or the CNN body.
    backbone_checkpoint: str = ""
    #: Which weights of it: ``auto`` (the EMA / DINO teacher when saved, else the trained
    #: model), ``teacher``/``ema`` or ``student``/``model``.
    backbone_weights: str = "auto"
    #: Frozen-backbone reuse (Vasconcelos et al.): ``none``, ``backbone`` (the trunk / CNN
    #: body's weights; its norm layers train) or ``backbone+norms`` (weights and norm
    #: layers, BatchNorm statistics included).
    freeze: str = "none"
    #: Residual adapters beside the trunk's / body's blocks (``every`` 0: none).
    adapters: AdapterConfig = field(default_factory=AdapterConfig)

    def validate(self) -> None:
        """Raises ConfigError naming the first bad field."""
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone must be one of {list(BACKBONES)}, got {self.backbone!r}")
        if self.heads not in HEADS:
            raise ConfigError(f"heads must be one of {list(HEADS)}, got {self.heads!r}")
        check_timm_model(self.model)
        for key in ("num_classes", "image_size", "channels", "rpn_proposals_train",
                    "rpn_proposals_test", "roi_batch_size", "detections_per_image"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ConfigError(f"{key} must be an integer >= 2, got {value!r}")
        for key in ("fpn_layers", "head_convs"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{key} must be an integer >= 0, got {value!r}")
        if self.image_size % 32:
            raise ConfigError(f"image_size must be a multiple of 32, got {self.image_size}")
        if self.freeze not in FREEZE_MODES:
            raise ConfigError(f"freeze must be one of {list(FREEZE_MODES)}, got "
                              f"{self.freeze!r}")
        self.adapters.validate()
        if self.backbone_weights not in WHICH:
            raise ConfigError(f"backbone_weights must be one of {list(WHICH)}, got "
                              f"{self.backbone_weights!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ConfigError("image_mean and image_std need 3 values (RGB)")

    def anchors(self, levels: int) -> tuple[tuple[int, ...], ...]:
        """Anchor sizes per level: one size per level, or all sizes on a single level."""
        sizes = list(self.anchor_sizes) or [
            max(1, round(s * min(1.0, self.image_size / 1024))) for s in BASE_ANCHOR_SIZES]
        if levels == 1:
            return (tuple(sizes),)
        if len(sizes) != levels:
            raise ConfigError(f"anchor_sizes needs one size per pyramid level ({levels}), "
                              f"got {sizes}")
        return tuple((s,) for s in sizes)


class TimmFPN(nn.Module):
    """A timm CNN's stride 4, 8, 16, 32 feature maps (``features_only``) + torchvision's FPN
    with a max-pooled p6: ``OrderedDict`` p2..p6 of ``out_channels`` maps.

    Raises:
        ConfigError: A model without stride 4..32 features.
    """

    def __init__(self, model_name: str, out_channels: int = 256, drop_path: float = 0.0,
                 **model_kwargs: Any) -> None:
        super().__init__()
        kwargs = dict(model_kwargs, pretrained=False, features_only=True)
        if drop_path > 0:
            kwargs["drop_path_rate"] = float(drop_path)
        try:
            self.body = timm.create_model(model_name, **kwargs)
        except (TypeError, RuntimeError) as exc:
            raise ConfigError(f"timm cannot build {model_name!r} with features_only: "
                              f"{exc}") from None
        reductions = list(self.body.feature_info.reduction())
        self.levels = [reductions.index(s) if s in reductions else -1 for s in (4, 8, 16, 32)]
        if -1 in self.levels:
            raise ConfigError(f"{model_name!r} has feature strides {reductions}; the FPN needs "
                              f"4, 8, 16 and 32")
        channels = self.body.feature_info.channels()
        self.fpn = FeaturePyramidNetwork([channels[i] for i in self.levels], out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.model_name = model_name
        self.out_channels = int(out_channels)
        self.strides = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
        self.featmap_names = ["p2", "p3", "p4", "p5"]
        #: Extra pyramid capacity (:class:`~raylab.models.pyramid_refine.PyramidRefinement`).
        self.refine: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Images ``[B, 3, H, W]`` -> p2..p6."""
        feats = self.body(x)
        out = self.fpn(OrderedDict((n, feats[i]) for n, i in zip(self.featmap_names,
                                                                   self.levels)))
        out["p6"] = out.pop("pool")
        return out if self.refine is None else self.refine(out)

    def load_body_weights(self, weights: PretrainedWeights) -> list[str]:
        """Copy a timm CNN's weights (a classifier's or DINO's, as the whole model names
        them) into the body. timm's feature wrapper renames top-level modules
        (``stages.0`` -> ``stages_0``), so names match with dots and underscores alike.

        Returns:
            The source's names not used (the classifier head, a final norm, ...).

        Raises:
            CheckpointError: A body tensor the weights lack, or of another shape.
        """
        def plain(name: str) -> str:
            return name.replace(".", "_")

        source = {plain(k): (k, v) for k, v in weights.state.items()}
        own = self.body.state_dict()
        update, missing = {}, []
        for name, tensor in own.items():
            found = source.get(plain(name))
            if found is None:
                missing.append(name)
            elif found[1].shape != tensor.shape:
                raise CheckpointError(f"{weights.arch} weight {found[0]!r} has shape "
                                      f"{tuple(found[1].shape)}, the {self.model_name} body "
                                      f"needs {tuple(tensor.shape)}")
            else:
                update[name] = found[1]
        if missing:
            raise CheckpointError(f"the {weights.method} weights of {weights.arch} lack "
                                  f"{len(missing)} tensors of the {self.model_name} body, "
                                  f"e.g. {missing[:3]} (set model={weights.arch})")
        self.body.load_state_dict(update)
        used = {plain(k) for k in update}
        return sorted(k for k in weights.state if plain(k) not in used)


class FixedSizeTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform without the resize: it normalises and batches."""

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Images arrive at their final size: unchanged."""
        return image, target


class Detector(MaskRCNN):
    """torchvision's ``MaskRCNN`` with timm's ``group_matcher`` hook, so that
    :func:`raylab.optim.param_groups.param_groups` applies ViTDet's layer-wise lr decay
    (:func:`raylab.models.vitdet.layer_id`); a CNN backbone's body is one layer (id 0)
    below everything else (id 1)."""

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """Parameter name -> layer id."""
        if isinstance(self.backbone, ViTDet):
            depth = self.backbone.depth
            return lambda name: layer_id(name, depth)
        return lambda name: 0 if name.startswith("backbone.body.") else 1


def build_detection_backbone(cfg: DetectorConfig) -> ViTDet | TimmFPN:
    """The backbone :func:`build_detector` puts under the heads (weights loaded, frozen
    and adapted as ``cfg`` says, with ``fpn_layers`` refinement cells on its pyramid)."""
    backbone = _pretrained_backbone(cfg)
    if cfg.fpn_layers:
        if len(backbone.strides) < 2:
            raise ConfigError(f"fpn_layers={cfg.fpn_layers} needs a multi-level pyramid; "
                              f"pyramid={cfg.pyramid!r} has one level")
        backbone.refine = PyramidRefinement(backbone.out_channels, len(backbone.strides),
                                            cfg.fpn_layers)
    return backbone


def _pretrained_backbone(cfg: DetectorConfig) -> ViTDet | TimmFPN:
    """The backbone with its pretrained weights, frozen, then adapted (adapters added after
    freezing train whatever the mode)."""
    if cfg.backbone == "cnn":
        backbone = TimmFPN(cfg.model, cfg.channels, cfg.drop_path, **cfg.model_kwargs)
        if cfg.backbone_checkpoint:
            weights = pretrained_weights(cfg.backbone_checkpoint, cfg.backbone_weights)
            try:
                backbone.load_body_weights(weights)
            except CheckpointError as exc:
                raise CheckpointError(f"{cfg.backbone_checkpoint}: {exc}") from None
        # The whole body is the pretrained part; the FPN above it always trains.
        backbone.body = freeze_backbone(backbone.body, cfg.freeze, lambda name: False)
        add_adapters(backbone.body, cfg.adapters.every, cfg.adapters.dim)
        return backbone
    backbone = ViTDet(cfg.model, img_size=cfg.image_size, window_size=cfg.window_size,
                      global_blocks=cfg.global_blocks, propagation=cfg.propagation,
                      pyramid=cfg.pyramid, drop_path=cfg.drop_path, out_channels=cfg.channels,
                      pretrain_img_size=cfg.pretrain_img_size, **cfg.model_kwargs)
    if cfg.backbone_checkpoint:
        load_vitdet_weights(backbone, cfg.backbone_checkpoint, cfg.backbone_weights)
    # The pretrained part is the ViT's own weights; relative positions, conv propagation
    # and the pyramid are new and train.
    trunk = set(backbone.trunk_parameter_names())
    backbone = freeze_backbone(backbone, cfg.freeze, lambda name: name not in trunk)
    add_adapters(backbone, cfg.adapters.every, cfg.adapters.dim)
    return backbone


def _heads(cfg: DetectorConfig, channels: int, num_anchors: int) -> dict[str, nn.Module]:
    convs = [channels] * cfg.head_convs
    if cfg.heads == "torchvision":
        heads = {"rpn_head": RPNHead(channels, num_anchors),
                 "mask_head": MaskRCNNHeads(channels, convs, 1)}
    else:
        heads = {"rpn_head": RPNHead(channels, num_anchors, conv_depth=2),
                 "box_head": FastRCNNConvFCHead((channels, 7, 7), convs, [1024],
                                                norm_layer=LayerNorm2d),
                 "mask_head": MaskRCNNHeads(channels, convs, 1, norm_layer=LayerNorm2d)}
    heads["box_predictor"] = FastRCNNPredictor(1024, cfg.num_classes)
    heads["mask_predictor"] = MaskRCNNPredictor(channels, 256, cfg.num_classes)
    return heads


def build_detector(cfg: DetectorConfig | None = None, **overrides: Any) -> Detector:
    """A Mask R-CNN (torchvision) around a ViTDet or timm CNN + FPN backbone.

    Args:
        cfg: The config; None uses :class:`DetectorConfig`'s defaults.
        **overrides: Fields replacing the config's, e.g. ``backbone="cnn"``.

    Returns:
        A :class:`Detector` (a ``MaskRCNN``): in train mode ``model(images, targets)``
        returns the losses ``loss_classifier``, ``loss_box_reg``, ``loss_mask``,
        ``loss_objectness``, ``loss_rpn_box_reg``; in eval mode ``model(images)`` returns
        per image ``boxes``, ``labels``, ``scores`` and ``masks`` ``[N, 1, H, W]`` at the
        input size. ``images`` are float ``[3, H, W]`` tensors in [0, 1].

    Raises:
        ConfigError: A bad field (see :meth:`DetectorConfig.validate`).
    """
    cfg = DetectorConfig() if cfg is None else cfg
    if overrides:
        unknown = sorted(set(overrides) - set(DetectorConfig.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown detector config keys {unknown}")
        cfg = DetectorConfig(**{**cfg.__dict__, **overrides})
    cfg.validate()
    backbone = build_detection_backbone(cfg)
    names = list(backbone.featmap_names)
    anchors = AnchorGenerator(cfg.anchors(len(backbone.strides)),
                              (tuple(cfg.aspect_ratios),) * len(backbone.strides))
    model = Detector(
        backbone, num_classes=None,
        min_size=cfg.image_size, max_size=cfg.image_size,
        image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=0),
        mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=0),
        rpn_pre_nms_top_n_train=cfg.rpn_proposals_train,
        rpn_post_nms_top_n_train=cfg.rpn_proposals_train,
        rpn_pre_nms_top_n_test=cfg.rpn_proposals_test,
        rpn_post_nms_top_n_test=cfg.rpn_proposals_test,
        box_batch_size_per_image=cfg.roi_batch_size,
        box_detections_per_img=cfg.detections_per_image,
        **_heads(cfg, backbone.out_channels, anchors.num_anchors_per_location()[0]))
    model.transform = FixedSizeTransform(cfg.image_size, cfg.image_size, list(cfg.image_mean),
                                         list(cfg.image_std), size_divisible=32)
    return model

