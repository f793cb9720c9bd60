"""The reused network: a raylab run's saved network rebuilt from its own config, its
weights loaded, a new classifier head, adapters beside its blocks, and frozen as asked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from raylab import config as cfglib
from raylab.engine.checkpoint import load_meta
from raylab.errors import CheckpointError, ConfigError
from raylab.methods.reuse.config import ReuseConfig
from raylab.models.adapters import add_adapters, is_adapter_parameter
from raylab.models.backbones import (
    BACKBONE_METHODS,
    CLASSIFIER_METHODS,
    backbone_from_config,
    pretrained_weights,
)
from raylab.models.freeze import freeze_backbone


@dataclass
class SavedNetwork:
    """The network a checkpoint names, and where it came from (for the report)."""

    module: nn.Module
    method: str
    arch: str
    which: str


def network_from_meta(meta: dict[str, Any], drop_path: float = 0.0) -> nn.Module:
    """The network a raylab ``dino`` (its backbone), ``convnext`` or ``minivit`` run's
    ``meta.json`` describes, random init (its run's own config rebuilds it).

    Raises:
        CheckpointError: A method whose checkpoints hold no backbone to reuse, or a config
            that does not build.
    """
    from raylab.registry import get_method

    method, config = meta.get("method"), meta.get("config") or {}
    if method not in BACKBONE_METHODS + CLASSIFIER_METHODS:
        raise CheckpointError(f"method {method!r} holds no backbone to reuse (one of "
                              f"{list(BACKBONE_METHODS + CLASSIFIER_METHODS)})")
    if method in BACKBONE_METHODS:
        try:
            return backbone_from_config(config, drop_path_rate=drop_path)
        except KeyError as exc:
            raise CheckpointError(f"meta.json's config has no {exc}") from None
    runner = get_method(method)
    saved = cfglib.from_dict(runner.Config, {**config, "drop_path": drop_path})
    return runner.build_model(saved, max(len(meta.get("class_names") or []), 1))


def saved_network(checkpoint: str, which: str = "auto", drop_path: float = 0.0,
                  load_weights: bool = True) -> SavedNetwork:
    """The network a raylab ``dino`` (its backbone), ``convnext`` or ``minivit`` run saved,
    rebuilt from the run's own config, with its weights unless ``load_weights`` is False.

    Raises:
        CheckpointError: Not such a checkpoint, or weights that do not fit its config.
    """
    weights = pretrained_weights(checkpoint, which)
    try:
        net = network_from_meta(backbone_meta(checkpoint), drop_path)
    except CheckpointError as exc:
        raise CheckpointError(f"{checkpoint}: {exc}") from None
    if load_weights:
        try:
            net.load_state_dict(weights.state)
        except RuntimeError as exc:
            why = str(exc).strip().splitlines()
            raise CheckpointError(f"{checkpoint}: the {weights.which} weights do not fit its "
                                  f"own {weights.arch} config ({why[-1].strip()})") from None
    return SavedNetwork(net, weights.method, weights.arch, weights.which)


def backbone_meta(checkpoint: str) -> dict[str, Any]:
    """What rebuilds a backbone checkpoint's network (kept in a reuse run's own meta, so
    that its model loads without the backbone's folder)."""
    meta = load_meta(checkpoint)
    return {k: meta.get(k) for k in ("method", "config", "class_names")}


def classifier_name(model: nn.Module) -> str:
    """The module name of a timm model's classifier (``head``, ``head.fc``, ``fc``)."""
    head = model.get_classifier()
    for name, module in model.named_modules():
        if module is head:
            return name
    raise ConfigError(f"{type(model).__name__}: its classifier is not one of its modules")


def build_reuse_model(cfg: ReuseConfig, num_classes: int,
                      saved_meta: dict[str, Any] | None = None
                      ) -> tuple[nn.Module, SavedNetwork]:
    """The classifier a reuse run trains: the saved network with a new ``num_classes``
    head, ``cfg.adapters`` beside its blocks and ``cfg.freeze`` applied (the head and the
    adapters always train).

    Args:
        saved_meta: The backbone's :func:`backbone_meta`, as a reuse run's checkpoint keeps
            it: builds the same network without the backbone's folder, random init (the
            run's own weights are loaded next).
    """
    if saved_meta is not None:
        config = saved_meta.get("config") or {}
        arch = str(config.get("arch" if saved_meta.get("method") in BACKBONE_METHODS
                              else "model", "?"))
        saved = SavedNetwork(network_from_meta(saved_meta, cfg.drop_path_rate),
                             str(saved_meta.get("method")), arch, "none")
    else:
        if not cfg.backbone_checkpoint:
            raise ConfigError("config key 'backbone_checkpoint': expected a raylab dino / "
                              "convnext / minivit checkpoint folder (e.g. <run>/model), "
                              "got ''")
        saved = saved_network(cfg.backbone_checkpoint, cfg.backbone_weights,
                              cfg.drop_path_rate, load_weights=not cfg.from_scratch)
    model = saved.module
    if not hasattr(model, "reset_classifier"):
        raise ConfigError(f"backbone_checkpoint {cfg.backbone_checkpoint}: a "
                          f"{type(model).__name__} has no timm classifier to replace")
    model.reset_classifier(num_classes)
    head = classifier_name(model)
    add_adapters(model, cfg.adapters.every, cfg.adapters.dim)
    model = freeze_backbone(model, cfg.freeze, lambda name: name == head or name.startswith(
        head + ".") or is_adapter_parameter(name))
    saved.module = model
    return model, saved
