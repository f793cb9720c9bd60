"""MiniViT's method pieces without Ray: config checks, teachers from timm names and local
weights, the q/k/v and hidden-state hooks, and path keys that may be model names."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from raylab import config as cfglib
from raylab.errors import ConfigError
from raylab.methods.minivit.config import MiniViTConfig
from raylab.methods.minivit.models import (
    RelationTap,
    build_student,
    relation_shapes,
    timm_teacher,
    uses_relations,
)


def cfg(**overrides) -> MiniViTConfig:
    base = {"model": "vit_tiny_patch16_224", "input_size": 32, "patch_size": 8, "depth": 2}
    return cfglib.from_dict(MiniViTConfig, {**base, **overrides})


@pytest.mark.parametrize("overrides,message", [
    ({"sharing": "pairs"}, "'sharing'.*unknown strategy"),
    ({"sharing": "[[0],[2]]", "depth": 2}, "'sharing'.*once each"),
    ({"sharing_init": "last"}, "sharing_init"),
    ({"distill": {"temperature": 0}}, "distill.temperature"),
    ({"distill": {"pred": 0, "gt": 0}}, "distill.pred"),
    ({"distill": {"beta": -1}}, "distill.beta"),
    ({"teacher_weights": "w.pth"}, "teacher_weights"),
    ({"patch_size": 0}, "patch_size"),
])
def test_bad_config_keys_are_named(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg(**overrides).validate()


def test_student_geometry_and_sharing_follow_the_config() -> None:
    model = build_student(cfg(sharing="all"), num_classes=3)
    assert len(model.blocks) == 2 and model.patch_embed.patch_size == (8, 8)
    assert model.blocks[0].mlp is model.blocks[1].mlp
    assert relation_shapes(model, 32) == (1, 17, 17)  # (32 / 8) ** 2 patches + class
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_timm_teacher_reads_local_weights_only(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs teacher_weights.*nothing is downloaded"):
        timm_teacher("vit_tiny_patch16_224", "", 3, 32)
    with pytest.raises(ConfigError, match="no such file"):
        timm_teacher("vit_tiny_patch16_224", str(tmp_path / "missing.pth"), 3, 32)
    source = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3).eval()
    torch.save(source.state_dict(), tmp_path / "w.pth")
    teacher = timm_teacher("vit_tiny_patch16_224", str(tmp_path / "w.pth"), 3, 32)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(teacher(x), source(x))
    with pytest.raises(ConfigError, match="cannot build 'vit_tiny_patch16_224'"):
        timm_teacher("vit_tiny_patch16_224", str(tmp_path / "w.pth"), 5, 32)  # 3 classes


def test_relation_tap_captures_q_k_v_and_the_last_hidden_state() -> None:
    model = build_student(cfg(sharing="none", transform=False), num_classes=3).eval()
    tap = RelationTap(model)
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    model.blocks[-1].register_forward_pre_hook(lambda m, a: seen.setdefault("in", a[0]))
    model(x)
    (q, k, v), hidden = tap.take()
    block = model.blocks[-1]
    qkv = block.attn.qkv(block.norm1(seen["in"]))
    c = q.shape[-1]
    torch.testing.assert_close(torch.cat([q, k, v], -1), qkv)
    assert q.shape == (2, 17, c) and c == 192
    torch.testing.assert_close(hidden, block(seen["in"]))  # (the hooks fire again here)
    tap.take()
    with pytest.raises(RuntimeError, match="has not run"):
        tap.take()
    tap.remove()
    model(x)
    assert tap.qkv is None


def test_teacher_names_are_not_made_paths(tmp_path: Path, monkeypatch) -> None:
    from raylab.api import method_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "t").mkdir(parents=True)
    _, c = method_config("minivit", overrides=["teacher=deit_small_patch16_224"])
    assert c.teacher == "deit_small_patch16_224"
    _, c = method_config("minivit", overrides={"teacher": "runs/t"})
    assert c.teacher == str(tmp_path / "runs" / "t")


def _minivit_run(folder: Path, **overrides) -> tuple[MiniViTConfig, torch.nn.Module]:
    """A checkpoint as ``raylab train minivit`` saves it (random weights)."""
    from raylab.engine.checkpoint import save_checkpoint

    c = cfg(**overrides)
    torch.manual_seed(3)
    model = build_student(c, num_classes=3)
    save_checkpoint(folder, model=model, epoch=0,
                    meta={"method": "minivit", "config": cfglib.to_dict(c),
                          "class_names": ["a", "b", "c"]})
    return c, model


def test_init_from_an_uncompressed_run_takes_each_groups_mean(tmp_path: Path) -> None:
    from raylab.methods.minivit.models import init_weights

    _, plain = _minivit_run(tmp_path / "plain", sharing="none", transform=False)
    student_cfg = cfg(sharing="all", sharing_init="mean", init_from=str(tmp_path / "plain"))
    student = build_student(student_cfg, 3, init_weights(student_cfg, ["a", "b", "c"]))
    mean = (plain.blocks[0].mlp.fc1.weight + plain.blocks[1].mlp.fc1.weight) / 2
    torch.testing.assert_close(student.blocks[1].mlp.fc1.weight, mean)
    torch.testing.assert_close(student.blocks[1].norm1.weight, plain.blocks[1].norm1.weight)
    torch.testing.assert_close(student.head.weight, plain.head.weight)
    _minivit_run(tmp_path / "shared", sharing="all")
    with pytest.raises(ConfigError, match="already multiplexed"):
        init_weights(cfg(init_from=str(tmp_path / "shared")), ["a", "b", "c"])


def test_a_multiplexed_run_serves_as_teacher(tmp_path: Path) -> None:
    from raylab.errors import CheckpointError
    from raylab.methods.minivit.models import load_teacher

    _, saved = _minivit_run(tmp_path / "t", sharing="all")
    teacher, what = load_teacher(cfg(teacher=str(tmp_path / "t")), ["a", "b", "c"])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(teacher(x), saved.eval()(x))
    assert teacher.blocks[0].mlp is teacher.blocks[1].mlp  # rebuilt multiplexed
    assert not any(p.requires_grad for p in teacher.parameters())
    assert "minivit run" in what
    with pytest.raises(CheckpointError, match="trained on classes"):
        load_teacher(cfg(teacher=str(tmp_path / "t")), ["a", "b"])


def _swin(img_size: int, window: int, dim: int = 24) -> torch.nn.Module:
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=3,
                             img_size=img_size, window_size=window, embed_dim=dim,
                             depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2)).eval()


def test_relation_tap_of_a_swin_takes_the_last_stage_windows() -> None:
    # 128 px, patch 4: 32 x 32 tokens, halved three times: the last stage has 4 x 4
    # tokens in windows of 2 x 2, so 4 windows of 4 tokens per image, 8 for two images.
    model = _swin(128, 2)
    tap = RelationTap(model)
    block = model.layers[-1].blocks[-1]
    seen = {}
    block.attn.register_forward_pre_hook(lambda m, a: seen.update(windows=a[0]))
    x = torch.randn(2, 3, 128, 128)
    out = {}
    block.register_forward_hook(lambda m, a, o: out.update(hidden=o))  # returns None
    model(x)
    (q, k, v), hidden = tap.take()
    c = 8 * 24  # embed_dim doubled per stage
    assert q.shape == k.shape == v.shape == (8, 4, c)
    torch.testing.assert_close(torch.cat([q, k, v], -1), block.attn.qkv(seen["windows"]))
    assert out["hidden"].shape == (2, 4, 4, c)
    torch.testing.assert_close(hidden, out["hidden"].reshape(2, 16, c))
    assert relation_shapes(model, 128) == (4, 4, 16)


def test_relations_need_the_same_windows_and_skip_a_cnn_teacher() -> None:
    vit = build_student(cfg(sharing="none", transform=False), num_classes=3)
    assert relation_shapes(vit, 32) == (1, 17, 17)  # one window: all 16 patches + class
    config = cfg()
    swin_a, swin_b = _swin(128, 2), _swin(128, 2, dim=48)  # other widths: fine
    assert uses_relations(config, swin_a, swin_b)
    assert relation_shapes(swin_a, 128) == relation_shapes(swin_b, 128)
    assert relation_shapes(_swin(128, 4), 128) == (1, 16, 16)  # one 4 x 4 window
    cnn = timm.create_model("resnet10t", num_classes=3)
    assert not uses_relations(config, swin_a, cnn)
    assert not uses_relations(cfg(distill={"beta": 0, "gamma": 0}), swin_a, swin_b)
    swin_a.train()
    relation_shapes(swin_a, 128)
    assert swin_a.training  # the probe leaves the mode as it found it


def test_a_swin_student_learns_from_a_swin_teachers_relations(tmp_path: Path) -> None:
    """The scenario's student and a teacher run's network as Swin-T at 32 px with 2 px
    patches (16 x 16 tokens, halved three times: the last stage is one window of 2 x 2
    tokens): all three losses train the student, each reported, and the total is eq. 12
    with the scenario's weights."""
    import scenarios

    from raylab.engine.checkpoint import save_checkpoint

    swin = {"model": "swin_tiny_patch4_window7_224", "depth": None, "patch_size": 2}
    teacher_cfg = cfg(**swin, sharing="none", transform=False)
    torch.manual_seed(3)
    save_checkpoint(tmp_path / "teacher", model=build_student(teacher_cfg, 4), meta={
        "method": "minivit", "config": cfglib.to_dict(teacher_cfg),
        "class_names": list("abcd")})
    _, reports = scenarios.train("minivit", {
        **swin, "sharing": "every-2", "teacher": str(tmp_path / "teacher"),
        "teacher_weights": "", "optim.epochs": 1, "optim.warmup_epochs": 0})
    (r,) = reports
    assert r["train_loss_attn"] > 0 and r["train_loss_hidden"] > 0
    total = 0.5 * r["train_loss_gt"] + r["train_loss_pred"] + r["train_loss_attn"] \
        + 0.1 * r["train_loss_hidden"]
    assert r["train_loss"] == pytest.approx(total, rel=1e-5)


def test_a_run_reads_the_teacher_and_probes_the_shapes_once(tmp_path: Path,
                                                             monkeypatch) -> None:
    """load, describe and summarise, as the driver calls them for one run: the teacher is
    read from its checkpoint once and student and teacher run one probe forward each."""
    from raylab.methods.base import PlanResult, RunPlan
    from raylab.methods.convnext.method import ConvNeXtMethod
    from raylab.methods.minivit import method as minivit_method
    from raylab.runtime.options import RunOptions
    from raylab.tasks.classification.data import ImageData

    _minivit_run(tmp_path / "t", sharing="none", transform=False)
    data = ImageData(["a", "b", "c"], [], [], 0, 0)
    monkeypatch.setattr(ConvNeXtMethod, "load", lambda self, c: data)
    monkeypatch.setattr(ConvNeXtMethod, "summarise", lambda self, c, d, r: {})
    calls = {"load_teacher": 0, "relation_shapes": 0}

    def counted(name: str):
        real = getattr(minivit_method, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(minivit_method, name, wrapper)

    counted("load_teacher")
    counted("relation_shapes")
    method = minivit_method.MiniViTMethod()
    c = cfg(teacher=str(tmp_path / "t"))
    method.describe(c, RunOptions(), method.load(c))
    summary = method.summarise(c, data, [PlanResult(RunPlan("run", "test"), {}, None, 0.0)])
    assert calls == {"load_teacher": 1, "relation_shapes": 2}  # student and teacher
    assert summary["relations"] and summary["teacher_params"] > 0
