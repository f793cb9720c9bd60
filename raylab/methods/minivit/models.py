"""MiniViT's models on a worker or the driver: the multiplexed student, a teacher or an
uncompressed start read from a raylab checkpoint, and the hooks that capture q/k/v and
hidden states for the relation losses (forward hooks: timm's code is not edited)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from raylab import config as cfglib
from raylab.engine.checkpoint import load_meta
from raylab.errors import CheckpointError, ConfigError
from raylab.methods.minivit.config import MiniViTConfig
from raylab.models.backbones import pretrained_weights
from raylab.models.minivit import MultiplexError, multiplex


def plain_student(cfg: MiniViTConfig, num_classes: int) -> nn.Module:
    """The student's timm model before multiplexing (random init; nothing downloaded)."""
    import timm

    try:
        return timm.create_model(cfg.model, pretrained=False, num_classes=num_classes,
                                 drop_path_rate=cfg.drop_path_rate, **cfg.model_kwargs())
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"config key 'model': timm cannot build {cfg.model!r} with "
                          f"{cfg.model_kwargs()} ({e})") from None


def build_student(cfg: MiniViTConfig, num_classes: int,
                  init_state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The multiplexed student; ``init_state`` (an uncompressed model's weights) is loaded
    before the layers are grouped, so each group starts from its first layer or the mean."""
    model = plain_student(cfg, num_classes)
    if init_state is not None:
        missing, unexpected = model.load_state_dict(init_state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"init_from {cfg.init_from}: weights do not fit {cfg.model} (missing "
                f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
    try:
        return multiplex(model, cfg.sharing, transform=cfg.transform, init=cfg.sharing_init)
    except MultiplexError as e:
        raise ConfigError(f"config key 'sharing': {e}") from None


def classifier_from_checkpoint(checkpoint: str | Path, class_names: list[str],
                               key: str) -> tuple[nn.Module, str]:
    """The classifier a raylab convnext or minivit run saved (its EMA copy when kept), in
    eval mode, and a line describing it. ``key`` names the config key for errors."""
    from raylab.methods.convnext.config import ConvNeXtConfig
    from raylab.tasks.classification.task import build_model

    meta = load_meta(checkpoint)
    saved = pretrained_weights(checkpoint, "auto")
    if saved.method not in ("convnext", "minivit"):
        raise CheckpointError(f"{key} {checkpoint}: a {saved.method} checkpoint; expected a "
                              f"classifier (a convnext or minivit run)")
    names = meta.get("class_names")
    if names != class_names:
        raise CheckpointError(f"{key} {checkpoint}: trained on classes {names}, the data has "
                              f"{class_names}")
    if saved.method == "minivit":
        cfg = cfglib.from_dict(MiniViTConfig, saved.config)
        model = build_student(cfg, len(names))
    else:
        model = build_model(cfglib.from_dict(ConvNeXtConfig, saved.config), len(names))
    try:
        model.load_state_dict(saved.state)
    except RuntimeError as e:
        raise CheckpointError(f"{key} {checkpoint}: weights do not fit its own config "
                              f"({str(e).splitlines()[0]})") from None
    return model.eval(), f"{saved.arch} ({saved.method} run, {saved.which} weights)"


def timm_teacher(name: str, weights: str, num_classes: int, input_size: int) -> nn.Module:
    """A teacher given by timm name, its weights from a local file (never downloaded)."""
    import timm

    if not weights:
        raise ConfigError(f"config key 'teacher': {name!r} is not a raylab checkpoint folder; a "
                          f"timm name needs teacher_weights (a local weights file with "
                          f"{num_classes} classes: nothing is downloaded)")
    if not Path(weights).is_file():
        raise ConfigError(f"config key 'teacher_weights': no such file {weights}")
    kwargs: dict[str, Any] = {}
    if "vit" in name or "deit" in name or "swin" in name:
        kwargs["img_size"] = input_size
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
        model.load_state_dict(state)
    except Exception as e:  # timm name, unreadable file, wrong shapes: one named error
        raise ConfigError(f"config key 'teacher': cannot build {name!r} from {weights} "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                          ) from None
    return model.eval()


def load_teacher(cfg: MiniViTConfig, class_names: list[str]) -> tuple[nn.Module, str]:
    """The frozen teacher (eval mode, no gradients) and a line describing it."""
    if (Path(cfg.teacher) / "meta.json").is_file():
        model, what = classifier_from_checkpoint(cfg.teacher, class_names, "teacher")
    else:
        model = timm_teacher(cfg.teacher, cfg.teacher_weights, len(class_names),
                             cfg.input_size)
        what = f"{cfg.teacher} (timm, {cfg.teacher_weights})"
    model.requires_grad_(False)
    return model, what


def init_weights(cfg: MiniViTConfig, class_names: list[str]) -> dict[str, torch.Tensor] | None:
    """The uncompressed start (``init_from``) as a plain state dict, or None."""
    if not cfg.init_from:
        return None
    model, _ = classifier_from_checkpoint(cfg.init_from, class_names, "init_from")
    if getattr(model, "multiplexed", None) and model.multiplexed.get("strategy") != "none":
        raise ConfigError(f"config key 'init_from': {cfg.init_from} is already multiplexed; "
                          f"start from an uncompressed run (sharing=none)")
    return {k: v for k, v in model.state_dict().items()
            if not k.endswith(("pre_softmax", "post_softmax")) and "mlp_conv" not in k}


# --------------------------------------------------------------------------- relation taps


def relation_block(model: nn.Module) -> nn.Module | None:
    """The block whose q/k/v and output the relation losses compare: the last block of a
    timm ViT/DeiT (attention over all tokens) or of a Swin's last stage (attention within
    each window, as the paper's Mini-Swin distils it); None for other networks (a CNN
    teacher), which get prediction distillation only."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        block = model.blocks[-1]
    elif isinstance(model, SwinTransformer):
        block = model.layers[-1].blocks[-1]
    else:
        return None
    return block if isinstance(getattr(block.attn, "qkv", None), nn.Linear) else None


def uses_relations(cfg: MiniViTConfig, student: nn.Module, teacher: nn.Module) -> bool:
    """Whether the attention and hidden-state relation terms apply: weighted, and both
    models ViTs or Swins (the paper distils predictions only otherwise)."""
    weighted = cfg.distill.beta > 0 or cfg.distill.gamma > 0
    return (weighted and relation_block(student) is not None
            and relation_block(teacher) is not None)


@torch.no_grad()
def relation_shapes(model: nn.Module, input_size: int) -> tuple[int, int, int]:
    """(windows, tokens per window, hidden-state tokens) of ``model``'s relation block for
    one image of ``input_size`` px; a ViT has one window of all its tokens. The relations
    compare student and teacher row by row, so these must agree between the two."""
    tap = RelationTap(model)
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(1, 3, input_size, input_size))
        (q, _, _), hidden = tap.take()
    finally:
        tap.remove()
        model.train(was_training)
    return int(q.shape[0]), int(q.shape[1]), int(hidden.shape[1])


class RelationTap:
    """Keeps the relation block's q, k, v (heads merged, (B, N, C) each; a Swin's windows
    are rows of B: (B * windows, tokens per window, C)) and its output hidden state
    ((B, tokens, C)) from the model's most recent forward pass."""

    def __init__(self, model: nn.Module) -> None:
        block = relation_block(model)
        if block is None:
            raise ValueError(f"{type(model).__name__}: no ViT or Swin block to tap")
        self.qkv: tuple[torch.Tensor, ...] | None = None
        self.hidden: torch.Tensor | None = None
        self._handles = [block.attn.qkv.register_forward_hook(self._keep_qkv),
                         block.register_forward_hook(self._keep_hidden)]

    def _keep_qkv(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        self.qkv = tuple(out.chunk(3, dim=-1))  # timm's layout: [q | k | v], heads inside

    def _keep_hidden(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        self.hidden = out.flatten(1, 2) if out.dim() == 4 else out  # Swin: (B, H, W, C)

    def take(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The captured tensors, released here so they do not outlive the step."""
        if self.qkv is None or self.hidden is None:
            raise RuntimeError("RelationTap: the model has not run since the last take()")
        qkv, hidden, self.qkv, self.hidden = self.qkv, self.hidden, None, None
        return qkv, hidden

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
