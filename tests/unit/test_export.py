"""Multi-task export (no Ray): two reuse runs on one frozen backbone and a frozen detector
stored with the shared tensors once; the loaded models compute what the runs' own models
compute, and hold the shared tensors as the same tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import scenarios
import torch

from raylab import config as cfglib
from raylab.cli import main
from raylab.engine.checkpoint import load_checkpoint, save_checkpoint
from raylab.errors import CheckpointError, ConfigError
from raylab.export import export_multitask, load_multitask, tensor_key
from raylab.methods.reuse import ReuseConfig, ReuseMethod
from raylab.methods.reuse.models import build_reuse_model


def _task(folder: Path, classes: list[str], seed: int, **overrides) -> torch.nn.Module:
    """A finished reuse run's model folder: the frozen backbone, a trained head (and
    adapters), written as the run writes it."""
    cfg = cfglib.apply_overrides(ReuseConfig(), {
        "backbone_checkpoint": str(scenarios.reuse_backbone()), "input_size": 32,
        **overrides})
    model, _ = build_reuse_model(cfg, len(classes))
    torch.manual_seed(seed)
    with torch.no_grad():  # what training moved: the head and the adapters
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    save_checkpoint(folder, model=model,
                    meta=ReuseMethod().checkpoint_meta(cfg, classes))
    return model.eval()


def test_two_tasks_share_the_frozen_backbone(tmp_path: Path) -> None:
    a = _task(tmp_path / "a", list("xyz"), 1)
    b = _task(tmp_path / "b", list("pq"), 2, **{"adapters.every": 1, "adapters.dim": 8})
    report = export_multitask({"birds": tmp_path / "a", "cars": tmp_path / "b"},
                              tmp_path / "bundle")
    nbytes = lambda m: sum(t.numel() * t.element_size()  # noqa: E731
                           for t in m.state_dict().values())
    frozen = {n: t for n, t in a.state_dict().items() if not n.startswith("fc.")}
    backbone = sum(t.numel() * t.element_size() for t in frozen.values())
    # Everything but the heads (and b's adapter) is shared, each distinct tensor stored
    # once (equal BatchNorm weights of one shape are one tensor too).
    distinct = {(str(t.dtype), tuple(t.shape), t.numpy().tobytes()) for t in frozen.values()}
    assert report["shared_bytes"] == sum(len(d[2]) for d in distinct) < backbone
    assert report["separate_bytes"] == nbytes(a) + nbytes(b)
    assert report["bundle_bytes"] == report["separate_bytes"] - report["saved_bytes"]
    assert report["saved_bytes"] == 2 * backbone - report["shared_bytes"]
    assert report["tasks"]["cars"]["own_bytes"] == nbytes(b) - backbone
    on_disk = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert on_disk["saved_bytes"] == report["saved_bytes"]

    models = load_multitask(tmp_path / "bundle")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(models["birds"](x), a(x))
        assert torch.equal(models["cars"](x), b(x))
    # The frozen stem conv is one tensor in memory for both tasks.
    stem_a = models["birds"].conv1[0].weight
    stem_b = models["cars"].conv1[0].weight
    assert stem_a.data_ptr() == stem_b.data_ptr()
    assert tensor_key(stem_a) == tensor_key(a.conv1[0].weight)


def test_cli_prints_the_saving_and_refuses_bad_input(tmp_path: Path, capsys) -> None:
    _task(tmp_path / "a", list("xyz"), 1)
    _task(tmp_path / "b", list("pq"), 2)
    out = tmp_path / "bundle"
    assert main(["export", "multitask", str(out), f"a={tmp_path / 'a'}",
                 f"b={tmp_path / 'b'}"]) == 0
    printed = capsys.readouterr().out
    assert "saved" in printed and "shared" in printed
    # The same folder again: refused, the bundle untouched.
    assert main(["export", "multitask", str(out), f"a={tmp_path / 'a'}",
                 f"b={tmp_path / 'b'}"]) != 0
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["export", "multitask", str(tmp_path / "x"), f"a={tmp_path / 'a'}",
                 "b"]) != 0
    assert "NAME=MODEL_FOLDER" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="two or more"):
        export_multitask({"a": tmp_path / "a"}, tmp_path / "y")
    with pytest.raises(CheckpointError):
        export_multitask({"a": tmp_path / "a", "b": tmp_path / "nothing"}, tmp_path / "z")
    assert not (tmp_path / "z").exists()
    with pytest.raises(CheckpointError, match="no task 'c'"):
        load_multitask(out, ["c"])


def _detector(folder: Path, categories: int, seed: int) -> torch.nn.Module:
    """A finished frozen-backbone detection run's model folder: the same ResNet-10-T body
    as the reuse tasks (loaded from the same backbone checkpoint, frozen with its norms),
    and a trained FPN and heads."""
    from raylab.methods.detection.method import checkpoint_meta
    from raylab.tasks.detection.config import DetectionConfig
    from raylab.tasks.detection.task import build_model

    cfg = cfglib.apply_overrides(DetectionConfig(), {
        "backbone": "cnn", "model": "resnet10t", "image_size": 64, "channels": 32,
        "backbone_checkpoint": str(scenarios.reuse_backbone()),
        "freeze": "backbone+norms"})
    model = build_model(cfg, categories + 1)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    data = type("Data", (), {"categories": [{"id": i + 1, "name": f"c{i}"}
                                            for i in range(categories)]})()
    save_checkpoint(folder, model=model, meta=checkpoint_meta(cfg, data))
    return model.eval()


def test_a_detector_and_a_classifier_share_the_frozen_backbone(tmp_path: Path) -> None:
    classifier = _task(tmp_path / "cls", list("xyz"), 1)
    detector = _detector(tmp_path / "det", 2, 3)
    report = export_multitask({"cls": tmp_path / "cls", "det": tmp_path / "det"},
                              tmp_path / "bundle")
    # The backbone checkpoint's body tensors (every weight and BatchNorm statistic of the
    # ResNet-10-T but its classifier layer; frozen BatchNorm keeps no batch counter) are
    # what the two tasks share.
    backbone = load_checkpoint(scenarios.reuse_backbone())["model"]
    body = {tensor_key(t) for n, t in backbone.items()
            if not n.startswith("fc.") and not n.endswith("num_batches_tracked")}
    shared_keys = {tensor_key(t) for t in classifier.state_dict().values()} & {
        tensor_key(t) for t in detector.state_dict().values()}
    assert shared_keys == body
    assert report["saved_bytes"] > 0
    assert report["saved_bytes"] == report["separate_bytes"] - report["bundle_bytes"]

    models = load_multitask(tmp_path / "bundle")
    loaded = models["det"].eval()
    for name, t in detector.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        want, got = detector(images), loaded(images)
    assert len(want) == len(got) == 1
    for key in ("boxes", "labels", "scores", "masks"):
        assert torch.equal(want[0][key], got[0][key]), key
    # One tensor in memory for both tasks: the stem conv of the classifier is the body's.
    stem = models["cls"].conv1[0].weight
    det_tensors = {t.data_ptr() for t in models["det"].state_dict().values()}
    assert stem.data_ptr() in det_tensors
