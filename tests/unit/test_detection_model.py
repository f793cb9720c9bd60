"""Mask R-CNN around ViTDet or a timm CNN + FPN: losses, backward, eval outputs at the input
size, no resizing, heads, anchors, layer decay, frozen backbones (tiny models, 64 px)."""

from __future__ import annotations

import pytest
import timm
import torch
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.ops.misc import FrozenBatchNorm2d

from raylab.engine.checkpoint import save_checkpoint
from raylab.errors import CheckpointError, ConfigError
from raylab.models.backbones import pretrained_weights
from raylab.models.detection import DetectorConfig, build_detector
from raylab.models.vitdet import ViTDet
from raylab.optim.param_groups import param_groups

LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
#: Few proposals and RoIs, and 32 channels instead of 256 in the pyramid and heads, so that
#: a training step takes a fraction of a second on a CPU.
SMALL = dict(num_classes=3, image_size=64, channels=32, rpn_proposals_train=32,
             rpn_proposals_test=16, roi_batch_size=8, detections_per_image=5, drop_path=0.0)
TINY_VIT = dict(backbone="vitdet", model="vit_tiny_patch16_224", window_size=2,
                global_blocks=[1], pretrain_img_size=64,
                model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})


@pytest.fixture(autouse=True)
def _no_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN builds a kernel per new convolution shape (~25 ms each on a small CPU); the
    plain kernels are far faster for these tiny models."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)


def _targets(size: int = 64) -> list[dict[str, torch.Tensor]]:
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 60.0, 30.0]])
    masks = torch.zeros(2, size, size, dtype=torch.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
        m[y0:y1, x0:x1] = 1
    return [{"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks} for _ in range(2)]


def _train_and_eval(model: MaskRCNN) -> None:
    torch.manual_seed(0)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    model.train()
    losses = model(images, _targets())
    assert set(losses) == LOSSES
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det in out:
        n = det["boxes"].shape[0]
        assert n <= 5 and det["boxes"].shape == (n, 4)
        assert det["labels"].shape == det["scores"].shape == (n,)
        assert det["masks"].shape == (n, 1, 64, 64)


def test_vitdet_mask_rcnn_trains_and_predicts() -> None:
    torch.manual_seed(0)
    model = build_detector(**SMALL, **TINY_VIT)
    assert isinstance(model, MaskRCNN) and isinstance(model.backbone, ViTDet)
    assert model.roi_heads.box_roi_pool.featmap_names == ["p2", "p3", "p4", "p5"]
    _train_and_eval(model)


def test_cnn_mask_rcnn_trains_and_predicts() -> None:
    torch.manual_seed(0)
    model = build_detector(**SMALL, backbone="cnn", model="resnet18", heads="torchvision")
    assert model.backbone.out_channels == 32
    assert model.backbone.body.feature_info.reduction() == [2, 4, 8, 16, 32]
    with torch.no_grad():
        feats = model.backbone(torch.zeros(1, 3, 64, 64))
    assert {k: v.shape[-1] for k, v in feats.items()} == {"p2": 16, "p3": 8, "p4": 4, "p5": 2,
                                                          "p6": 1}
    _train_and_eval(model)


def test_single_level_detector_without_pyramid() -> None:
    torch.manual_seed(0)
    model = build_detector(**SMALL, **TINY_VIT, pyramid="none", heads="torchvision")
    assert model.rpn.anchor_generator.sizes == ((2, 4, 8, 16, 32),)
    assert model.rpn.head.cls_logits.out_channels == 15  # 5 sizes x 3 aspect ratios
    model.train()
    losses = model([torch.rand(3, 64, 64) for _ in range(2)], _targets())
    assert set(losses) == LOSSES and all(torch.isfinite(v) for v in losses.values())


def test_transform_normalises_and_never_resizes() -> None:
    model = build_detector(**SMALL, **TINY_VIT).eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 40)]
    batch, _ = model.transform(images)
    assert batch.image_sizes == [(64, 64), (48, 40)]
    assert batch.tensors.shape == (2, 3, 64, 64)  # padded to a multiple of 32
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(batch.tensors[0], (images[0] - mean) / std)
    torch.testing.assert_close(batch.tensors[1, :, :48, :40], (images[1] - mean) / std)
    assert model.transform.min_size == (64,) and model.transform.max_size == 64


def test_heads() -> None:
    vitdet = build_detector(**{**SMALL, "channels": 256}, **TINY_VIT)
    assert vitdet.backbone.out_channels == 256
    box_head = vitdet.roi_heads.box_head
    assert isinstance(box_head, FastRCNNConvFCHead)
    convs = [m for m in box_head.modules() if isinstance(m, torch.nn.Conv2d)]
    fcs = [m for m in box_head.modules() if isinstance(m, torch.nn.Linear)]
    assert [c.out_channels for c in convs] == [256] * 4
    assert len(fcs) == 1 and fcs[0].out_features == 1024
    norms = {type(m).__name__ for m in box_head.modules()} & {"LayerNorm2d", "BatchNorm2d"}
    assert norms == {"LayerNorm2d"} and all(c.bias is None for c in convs)
    assert len(vitdet.rpn.head.conv) == 2
    mask_norms = [m for m in vitdet.roi_heads.mask_head.modules()
                  if type(m).__name__ == "LayerNorm2d"]
    assert len(mask_norms) == 4

    plain = build_detector(**SMALL, **TINY_VIT, heads="torchvision")
    assert isinstance(plain.roi_heads.box_head, TwoMLPHead) and len(plain.rpn.head.conv) == 1


def test_anchor_sizes() -> None:
    assert DetectorConfig().anchors(5) == ((32,), (64,), (128,), (256,), (512,))
    assert DetectorConfig(image_size=256).anchors(5) == ((8,), (16,), (32,), (64,), (128,))
    assert DetectorConfig(image_size=2048).anchors(5)[0] == (32,)
    assert DetectorConfig(anchor_sizes=[16, 32, 64, 128, 256]).anchors(1) == (
        (16, 32, 64, 128, 256),)
    with pytest.raises(ConfigError, match="one size per pyramid level"):
        DetectorConfig(anchor_sizes=[16, 32]).anchors(5)


def test_layer_decay_over_the_whole_detector() -> None:
    model = build_detector(**SMALL, **TINY_VIT)
    names = {id(p): n for n, p in model.named_parameters()}
    scales = {}
    for group in param_groups(model, 0.1, layer_decay=0.7):
        for p in group["params"]:
            scales[names[id(p)]] = group["lr_scale"]
    depth = 2
    assert scales["backbone.patch_embed.proj.weight"] == pytest.approx(0.7 ** (depth + 1))
    assert scales["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.7 ** depth)
    assert scales["backbone.blocks.1.rel_pos_h"] == pytest.approx(0.7)
    assert scales["backbone.pyramid.stages.0.1.0.weight"] == 1.0
    assert scales["roi_heads.box_predictor.cls_score.weight"] == 1.0
    assert scales["rpn.head.cls_logits.weight"] == 1.0
    assert len(scales) == len(names)


def test_frozen_backbones() -> None:
    vitdet = build_detector(**SMALL, **TINY_VIT, freeze="backbone+norms")
    frozen = {n for n, p in vitdet.backbone.named_parameters() if not p.requires_grad}
    assert frozen == set(vitdet.backbone.trunk_parameter_names())
    assert "blocks.0.attn.qkv.weight" in frozen and "pos_embed" in frozen
    assert vitdet.backbone.blocks[0].rel_pos_h.requires_grad

    cnn = build_detector(**SMALL, backbone="cnn", model="resnet18", freeze="backbone+norms")
    assert not any(p.requires_grad for p in cnn.backbone.body.parameters())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in cnn.backbone.body.modules())
    assert all(p.requires_grad for p in cnn.backbone.fpn.parameters())


def test_backbone_mode_leaves_norm_layers_training() -> None:
    vitdet = build_detector(**SMALL, **TINY_VIT, freeze="backbone")
    trains = {n for n, p in vitdet.backbone.named_parameters() if p.requires_grad}
    assert "blocks.0.norm1.weight" in trains and "blocks.1.norm2.bias" in trains
    assert "blocks.0.attn.qkv.weight" not in trains and "pos_embed" not in trains
    cnn = build_detector(**SMALL, backbone="cnn", model="resnet18", freeze="backbone")
    body = {n for n, p in cnn.backbone.body.named_parameters() if p.requires_grad}
    bn = {f"{n}.{w}" for n, m in cnn.backbone.body.named_modules()
          if isinstance(m, torch.nn.BatchNorm2d) for w in ("weight", "bias")}
    assert body == bn  # BatchNorm trains (weights and statistics), convolutions do not


@pytest.mark.parametrize("kind", ["vitdet", "cnn"])
def test_adapters_start_at_the_frozen_backbone_and_train(kind: str) -> None:
    """Same seed, with and without adapters: the pyramid's maps are bit-identical at init;
    the adapters are the only trainable part of the frozen trunk/body."""
    from raylab.models.adapters import AdapterConfig
    from raylab.models.detection import build_detection_backbone

    base = {**SMALL, **(TINY_VIT if kind == "vitdet" else
                        {"backbone": "cnn", "model": "resnet18"})}
    x = torch.randn(1, 3, 64, 64)
    outputs = []
    for adapters in (AdapterConfig(), AdapterConfig(every=1, dim=8)):
        torch.manual_seed(0)
        cfg = DetectorConfig(**base, freeze="backbone+norms", adapters=adapters)
        backbone = build_detection_backbone(cfg).eval()
        with torch.no_grad():
            outputs.append(backbone(x))
    assert outputs[0].keys() == outputs[1].keys()
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])
    pretrained = backbone.body if kind == "cnn" else backbone
    trunk = set() if kind == "cnn" else set(backbone.trunk_parameter_names())
    trains = {n for n, p in pretrained.named_parameters() if p.requires_grad}
    if kind == "cnn":
        assert trains and all(".adapter." in n for n in trains)
    else:  # the ViT's own weights frozen; adapters, relative positions, pyramid train
        assert not trains & trunk and {n for n in trains if ".adapter." in n}
        assert "blocks.0.block.attn.qkv.weight" in trunk


def test_detector_capacity_knobs() -> None:
    """``head_convs`` convs in the box and mask heads; ``fpn_layers`` cells of 2 x (levels
    - 1) 3x3 convs (no bias) + LayerNorm on the 5-level pyramid, counted by hand."""
    base = build_detector(**SMALL, **TINY_VIT)
    big = build_detector(**SMALL, **TINY_VIT, fpn_layers=2, head_convs=2)
    c, levels = SMALL["channels"], 5
    cell = 2 * (levels - 1) * (c * c * 9 + 2 * c)
    assert sum(p.numel() for p in big.backbone.refine.parameters()) == 2 * cell
    convs = lambda head: sum(isinstance(m, torch.nn.Conv2d) for m in head.modules())  # noqa: E731
    assert convs(base.roi_heads.box_head) == 4 and convs(big.roi_heads.box_head) == 2
    assert convs(big.roi_heads.mask_head) == 2
    big.train()
    losses = big([torch.rand(3, 64, 64)], _targets())
    sum(losses.values()).backward()
    assert big.backbone.refine.cells[1].bottom_up[0][0].weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="one level"):
        build_detector(**SMALL, **{**TINY_VIT, "pyramid": "none"}, fpn_layers=1)
    with pytest.raises(ConfigError, match="head_convs"):
        build_detector(**SMALL, head_convs=-1)
    with pytest.raises(ConfigError, match="freeze must be one of"):
        build_detector(**SMALL, freeze="all")


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown detector config keys"):
        build_detector(no_such_key=1)
    with pytest.raises(ConfigError, match="backbone must be"):
        build_detector(backbone="swin")
    with pytest.raises(ConfigError, match="multiple of 32"):
        build_detector(**{**SMALL, "image_size": 100})
    with pytest.raises(ConfigError, match="not a timm model"):
        build_detector(model="vit_no_such_model")
    with pytest.raises(ConfigError, match="backbone_weights must be one of"):
        build_detector(backbone="cnn", model="resnet18", backbone_weights="best")


def _classifier_checkpoint(folder, model_name: str, ema: bool) -> tuple:
    """A ``raylab train convnext`` checkpoint of ``model_name`` (random weights), with an
    EMA copy that differs from the model when ``ema``."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=5)
    average = None
    if ema:
        average = timm.create_model(model_name, num_classes=5)
        with torch.no_grad():
            for p in average.parameters():
                p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(folder, model=model, ema=average, epoch=0,
                    meta={"method": "convnext", "config": {"model": model_name}})
    return model, average


def test_a_convnext_run_initialises_the_cnn_body(tmp_path) -> None:
    """The body's stride 4..32 maps equal the classifier's own stage outputs, from the EMA
    copy under ``auto`` and from the trained model under ``model``."""
    model, average = _classifier_checkpoint(tmp_path, "convnext_atto", ema=True)
    x = torch.randn(1, 3, 64, 64)
    for which, source in (("auto", average), ("model", model)):
        det = build_detector(**SMALL, backbone="cnn", model="convnext_atto",
                             backbone_checkpoint=str(tmp_path), backbone_weights=which)
        source.eval()
        det.backbone.body.eval()
        with torch.no_grad():
            expected = source.forward_intermediates(x, intermediates_only=True)
            got = det.backbone.body(x)
        assert len(got) == len(expected) == 4
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)
    unused = det.backbone.load_body_weights(pretrained_weights(tmp_path, "model"))
    assert unused and all(k.startswith("head.") for k in unused), unused


def test_backbone_checkpoint_errors(tmp_path) -> None:
    _classifier_checkpoint(tmp_path / "convnext", "convnext_atto", ema=False)
    with pytest.raises(CheckpointError, match="set model=convnext_atto"):
        build_detector(**SMALL, backbone="cnn", model="resnet18",
                       backbone_checkpoint=str(tmp_path / "convnext"))
    with pytest.raises(CheckpointError, match="holds no ema weights"):
        pretrained_weights(tmp_path / "convnext", "ema")
    assert pretrained_weights(tmp_path / "convnext", "auto").which == "model"
    save_checkpoint(tmp_path / "skill", model=torch.nn.Linear(2, 2),
                    meta={"method": "skill", "config": {}})
    with pytest.raises(CheckpointError, match="holds no backbone"):
        build_detector(**SMALL, backbone="cnn", model="resnet18",
                       backbone_checkpoint=str(tmp_path / "skill"))
