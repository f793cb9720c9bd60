"""The DINO iteration without Ray: loss falls on a fixed batch, teacher gets no gradient,
the center moves toward the teacher's batch mean, load_backbone round-trips."""

from __future__ import annotations

import json

import torch

from raylab import config as cfglib
from raylab.engine.checkpoint import save_checkpoint
from raylab.methods.dino import DINOConfig
from raylab.methods.dino.task import build_student_teacher, dino_step
from raylab.models.backbones import load_backbone
from raylab.optim import ModelEma, param_groups

CFG = cfglib.apply_overrides(DINOConfig(), {
    "arch": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "out_dim": 64,
    "hidden_dim": 32, "bottleneck_dim": 16, "n_local_crops": 2})


def _crops(b: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)] + \
        [torch.randn(b, 3, 8, 8, generator=g) for _ in range(2)]


def test_step_learns_and_teacher_stays_gradient_free() -> None:
    torch.manual_seed(0)
    student, _ = build_student_teacher(CFG)
    teacher = ModelEma(student, decay=0.99)
    opt = torch.optim.AdamW(param_groups(student, weight_decay=0.0), lr=1e-3)
    center = torch.zeros(1, CFG.out_dim)
    crops = _crops()
    losses = []
    for step in range(8):
        loss, center = dino_step(student, teacher.module, crops, center, student_temp=0.1,
                                 teacher_temp=0.04, center_momentum=0.9, all_reduce=None,
                                 precision="fp32", device=torch.device("cpu"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        teacher.update(student, step)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in teacher.module.parameters())
    # The center is an EMA of teacher outputs: after 8 updates with m=0.9 it is non-zero
    # and has the teacher head's output width.
    assert center.shape == (1, CFG.out_dim) and center.abs().sum() > 0


def test_first_center_update_is_a_tenth_of_the_teacher_mean() -> None:
    torch.manual_seed(0)
    student, teacher = build_student_teacher(CFG)
    teacher.eval()
    crops = _crops()
    _, center = dino_step(student, teacher, crops, torch.zeros(1, CFG.out_dim),
                          student_temp=0.1, teacher_temp=0.04, center_momentum=0.9,
                          all_reduce=None, precision="fp32", device=torch.device("cpu"))
    with torch.no_grad():
        expected = 0.1 * teacher(crops[:2]).mean(0, keepdim=True)
    assert torch.allclose(center, expected, atol=1e-6)


def test_load_backbone_returns_frozen_teacher_features(tmp_path) -> None:
    torch.manual_seed(0)
    student, teacher = build_student_teacher(CFG)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01)  # make the teacher differ from the student
    save_checkpoint(tmp_path, model=student, ema=teacher, epoch=0,
                    meta={"method": "dino", "config": cfglib.to_dict(CFG)},
                    extra={"center": torch.zeros(1, CFG.out_dim)})
    backbone = load_backbone(tmp_path)
    x = torch.randn(2, 3, 16, 16)
    teacher.eval()
    with torch.no_grad():
        assert torch.allclose(backbone(x), teacher.backbone(x), atol=1e-6)
    assert hasattr(backbone, "forward_features")
    assert not any(p.requires_grad for p in backbone.parameters())
    assert json.loads((tmp_path / "meta.json").read_text())["method"] == "dino"
