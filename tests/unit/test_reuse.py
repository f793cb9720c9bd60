"""Frozen-backbone reuse on the classification task (no Ray): the saved network rebuilt
from a DINO / classifier checkpoint, the new head, adapters and freeze modes; trainable
counts worked out by hand; a frozen model's tensors bit-identical after training steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from raylab import config as cfglib
from raylab.engine.checkpoint import save_checkpoint
from raylab.errors import CheckpointError, ConfigError
from raylab.methods.reuse import ReuseConfig
from raylab.methods.reuse.models import build_reuse_model, classifier_name
from raylab.models.freeze import freeze_summary, is_norm_layer
from raylab.optim import build_optimizer

DINO = {"arch": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 8, "depth": 2,
        "out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8}


@pytest.fixture(scope="module")
def dino_checkpoint(tmp_path_factory) -> Path:
    from raylab.methods.dino import DINOConfig
    from raylab.methods.dino.task import build_student_teacher

    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfglib.apply_overrides(DINOConfig(), DINO))
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01)  # the teacher differs from the student
    folder = tmp_path_factory.mktemp("dino") / "model"
    return save_checkpoint(folder, model=student, ema=teacher, meta={
        "method": "dino", "config": cfglib.to_dict(cfglib.apply_overrides(DINOConfig(),
                                                                          DINO))})


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory) -> tuple[Path, nn.Module]:
    torch.manual_seed(1)
    model = timm.create_model("resnet10t", num_classes=7)
    with torch.no_grad():  # BatchNorm statistics that are not the init's 0 / 1
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("resnet") / "model"
    save_checkpoint(folder, model=model, meta={
        "method": "convnext", "config": {"model": "resnet10t", "input_size": 32},
        "class_names": [str(i) for i in range(7)]})
    return folder, model


def _cfg(checkpoint: Path, **overrides) -> ReuseConfig:
    return cfglib.apply_overrides(ReuseConfig(), {"backbone_checkpoint": str(checkpoint),
                                                  "input_size": 16, **overrides})


def test_dino_teacher_features_under_a_new_head(dino_checkpoint: Path) -> None:
    from raylab.models.backbones import load_backbone

    model, saved = build_reuse_model(_cfg(dino_checkpoint), num_classes=3)
    assert (saved.method, saved.which) == ("dino", "ema")
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(features, load_backbone(dino_checkpoint)(x))
    assert model(x).shape == (2, 3) and classifier_name(model) == "head"
    # freeze backbone+norms (the default): only the head trains: 192 * 3 + 3.
    assert freeze_summary(model).trainable == 192 * 3 + 3


def test_trainable_counts_by_hand_for_each_mode(dino_checkpoint: Path) -> None:
    """ViT-Tiny (width 192, MLP 768, 2 blocks) with a 3-class head."""
    head = 192 * 3 + 3
    # LayerNorms: norm1 + norm2 per block and the final norm, 2 * 192 each.
    norms = (2 * 2 + 1) * 2 * 192
    # Adapters every block, width 16: Linear 192->16 and 16->192 with biases.
    adapter = 192 * 16 + 16 + 16 * 192 + 192
    counts = {
        ("none", 0): None,
        ("backbone", 0): head + norms,
        ("backbone+norms", 0): head,
        ("backbone+norms", 1): head + 2 * adapter,
    }
    for (mode, every), expected in counts.items():
        model, _ = build_reuse_model(_cfg(dino_checkpoint, freeze=mode,
                                          adapters={"every": every, "dim": 16}), 3)
        s = freeze_summary(model)
        assert s.trainable == (s.total if expected is None else expected), (mode, every)
        assert s.trainable + s.frozen == s.total


def test_adapted_model_starts_exactly_at_the_frozen_model(resnet_checkpoint) -> None:
    folder, source = resnet_checkpoint
    plain, _ = build_reuse_model(_cfg(folder, freeze="backbone+norms"), num_classes=4)
    adapted, _ = build_reuse_model(_cfg(folder, freeze="backbone+norms",
                                        adapters={"every": 1, "dim": 0}), num_classes=4)
    adapted.fc.load_state_dict(plain.fc.state_dict())
    x = torch.randn(3, 3, 32, 32)
    plain.train(), adapted.train()  # frozen BatchNorm: train mode reads the saved statistics
    with torch.no_grad():
        assert torch.equal(plain(x), adapted(x))
        source.eval()
        torch.testing.assert_close(plain.forward_head(plain.forward_features(x), True),
                                   source.forward_head(source.forward_features(x), True))


def test_frozen_backbone_is_bit_identical_after_steps(resnet_checkpoint) -> None:
    folder, _ = resnet_checkpoint
    for mode in ("backbone", "backbone+norms"):
        model, _ = build_reuse_model(_cfg(folder, freeze=mode,
                                          adapters={"every": 2, "dim": 8}), num_classes=4)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt = build_optimizer(model, "adamw", lr=1e-2, weight_decay=0.05)
        trained = {id(p) for g in opt.param_groups for p in g["params"]}
        assert trained == {id(p) for p in model.parameters() if p.requires_grad}
        model.train()
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)),
                                        torch.tensor([0, 1, 2, 3])).backward()
            assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
            opt.step()
        after = model.state_dict()
        moved = {k for k in before if not torch.equal(before[k], after[k])}
        norms = {n for n, m in model.named_modules() if is_norm_layer(m)}
        assert moved and all(k.startswith("fc.") or ".adapter." in k
                             or (mode == "backbone" and k.rsplit(".", 1)[0] in norms)
                             for k in moved), sorted(moved)
        statistics = {k for k in moved if "running_" in k}
        # backbone: BatchNorm layers train (weights and statistics); +norms: nothing does.
        assert bool(statistics) == (mode == "backbone")


def test_from_scratch_builds_the_same_network_without_its_weights(resnet_checkpoint) -> None:
    folder, source = resnet_checkpoint
    model, saved = build_reuse_model(_cfg(folder, from_scratch=True, freeze="none"), 7)
    assert saved.arch == "resnet10t"
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in source.parameters())
    assert not torch.equal(model.conv1[0].weight, source.conv1[0].weight)


def test_bad_inputs_are_clear_errors(tmp_path: Path, resnet_checkpoint) -> None:
    folder, _ = resnet_checkpoint
    with pytest.raises(ConfigError, match="backbone_checkpoint"):
        build_reuse_model(ReuseConfig(), 3)
    with pytest.raises(ConfigError, match="freeze"):
        _cfg(folder, freeze="all")
    with pytest.raises(ConfigError, match="adapters.dim"):
        _cfg(folder, adapters={"every": 1, "dim": -1})
    with pytest.raises(CheckpointError):
        build_reuse_model(_cfg(tmp_path / "nothing_here"), 3)
    other = tmp_path / "skill"
    save_checkpoint(other, model=nn.Linear(2, 2), meta={"method": "skill", "config": {}})
    with pytest.raises(CheckpointError, match="holds no backbone"):
        build_reuse_model(_cfg(other), 3)


def test_ddp_all_reduces_only_what_trains(resnet_checkpoint, tmp_path: Path) -> None:
    """Frozen before DDP wraps the model: DDP's reducer holds the head and adapters only,
    so their gradients are the only ones all-reduced."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    folder, _ = resnet_checkpoint
    model, _ = build_reuse_model(_cfg(folder, adapters={"every": 1, "dim": 8}), 4)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        # What DDP hands its reducer (the tensors whose gradients it all-reduces).
        params, _ = ddp._build_params_for_reducer()
        reduced = {id(p) for p in params}
    finally:
        dist.destroy_process_group()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert reduced == trainable and 0 < len(trainable) < len(list(model.parameters()))
