"""STEGO head, probes, backbone feature maps and KNN indices on tiny, hand-checkable inputs."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from raylab.models.stego import (
    ClusterProbe,
    LinearProbe,
    SegmentationHead,
    global_features,
    knn_indices,
    patch_features,
)


def test_segmentation_head_shape_and_branches() -> None:
    head = SegmentationHead(in_dim=6, code_dim=5, dropout=0.0)
    x = torch.randn(2, 6, 3, 4)
    code = head(x)
    assert code.shape == (2, 5, 3, 4)
    assert torch.allclose(code, head.linear(x) + head.nonlinear(x))


def test_segmentation_head_dropout_is_identity_in_eval() -> None:
    head = SegmentationHead(in_dim=6, dropout=0.5).eval()
    x = torch.randn(2, 6, 3, 3)
    assert head(x).shape == (2, 70, 3, 3)
    assert torch.allclose(head(x), head.linear(x) + head.nonlinear(x))


def test_segmentation_head_rejects_bad_dropout() -> None:
    with pytest.raises(ValueError, match="dropout"):
        SegmentationHead(4, dropout=1.0)


def _probe() -> ClusterProbe:
    probe = ClusterProbe(dim=2, n_clusters=2)
    with torch.no_grad():
        probe.clusters.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))  # unit after normalising
    return probe


def test_cluster_probe_centroids_follow_manual_seed() -> None:
    torch.manual_seed(0)
    a = ClusterProbe(4, 3).clusters.detach().clone()
    torch.manual_seed(0)
    b = ClusterProbe(4, 3).clusters.detach().clone()
    assert a.shape == (3, 4) and torch.equal(a, b)


def test_cluster_probe_hard_loss_and_one_hot_probs() -> None:
    probe = _probe()
    # Two points: (1, 1) at 45 degrees (cos 1/sqrt2 to both, ties go to cluster 0) and
    # (1, 3) closer to cluster 1 (cos 3/sqrt10 vs 1/sqrt10).
    x = torch.tensor([[1.0, 1.0], [1.0, 3.0]]).T.reshape(1, 2, 1, 2)
    loss, probs = probe(x)
    assert probs.shape == (1, 2, 1, 2)
    assert torch.equal(probs[0, :, 0, 0], torch.tensor([1.0, 0.0]))
    assert torch.equal(probs[0, :, 0, 1], torch.tensor([0.0, 1.0]))
    want = -(1 / math.sqrt(2) + 3 / math.sqrt(10)) / 2
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert probe.predict(x).tolist() == [[[0, 1]]]
    loss.backward()
    assert probe.clusters.grad is not None


def test_cluster_probe_soft_assignment() -> None:
    probe = _probe()
    x = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    loss, probs = probe(x, alpha=2.0)
    inner = torch.tensor([1 / math.sqrt(10), 3 / math.sqrt(10)])
    soft = torch.softmax(inner * 2.0, dim=0)
    assert torch.allclose(probs.flatten(), soft, atol=1e-6)
    assert loss.item() == pytest.approx(-(soft * inner).sum().item(), abs=1e-6)


def test_linear_probe_loss_matches_cross_entropy_with_ignore() -> None:
    probe = LinearProbe(dim=4, n_classes=3)
    x = torch.randn(2, 4, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, 0, :2] = 255
    logits = probe(x)
    assert logits.shape == (2, 3, 4, 4)
    want = F.cross_entropy(logits, target, ignore_index=255)
    assert probe.loss(logits, target).item() == pytest.approx(want.item(), abs=1e-6)


def test_linear_probe_loss_upsamples_logits() -> None:
    probe = LinearProbe(dim=4, n_classes=3)
    logits = probe(torch.randn(1, 4, 2, 2))
    target = torch.randint(0, 3, (1, 8, 8))
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    want = F.cross_entropy(up, target, ignore_index=255)
    assert probe.loss(logits, target).item() == pytest.approx(want.item(), abs=1e-6)


def test_linear_probe_all_ignored_gives_zero_with_grad() -> None:
    probe = LinearProbe(dim=4, n_classes=3)
    logits = probe(torch.randn(1, 4, 2, 2))
    loss = probe.loss(logits, torch.full((1, 2, 2), 255))
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert probe.conv.weight.grad is not None
    assert torch.equal(probe.conv.weight.grad, torch.zeros_like(probe.conv.weight))


@pytest.fixture(scope="module")
def tiny_vit() -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                             patch_size=8, depth=2, dynamic_img_size=True,
                             num_classes=0).eval()


def test_patch_features_vit(tiny_vit: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fmap = patch_features(tiny_vit, x)
        tokens = tiny_vit.forward_features(x)
    assert fmap.shape == (2, 192, 4, 4)
    # Row-major patch order: grid point (r, c) is token 1 + 4 r + c (after the CLS token).
    assert torch.allclose(fmap[:, :, 1, 2], tokens[:, 1 + 4 * 1 + 2])


def test_patch_features_vit_dynamic_size(tiny_vit: torch.nn.Module) -> None:
    x = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        fmap = patch_features(tiny_vit, x)
        tokens = tiny_vit.forward_features(x)
    assert fmap.shape == (1, 192, 6, 4)
    assert torch.allclose(fmap[:, :, 5, 3], tokens[:, -1])


def test_patch_features_vit_token_mismatch_raises() -> None:
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                            patch_size=8, depth=1, num_classes=0, dynamic_img_size=True,
                            dynamic_img_pad=True).eval()
    # 36 is not a multiple of 8: the padded input has 5x5 patches, the floor grid 4x4.
    with torch.no_grad(), pytest.raises(ValueError, match="patch grid"):
        patch_features(vit, torch.randn(1, 3, 36, 36))


def test_patch_features_cnn() -> None:
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fmap = patch_features(cnn, x)
        assert torch.equal(fmap, cnn.forward_features(x))
    assert fmap.shape == (1, 512, 2, 2)


def test_global_features_is_normalised_spatial_mean() -> None:
    fmap = torch.zeros(2, 2, 2, 2)
    fmap[0, 0] = 3.0
    fmap[0, 1] = 4.0
    fmap[1, 1, 0, 0] = 8.0
    keys = global_features(fmap)
    assert torch.allclose(keys, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))


def _paired_keys() -> torch.Tensor:
    # Four well-separated directions, each with a near-identical twin: rows 2p and 2p + 1.
    base = torch.eye(4) * 5.0
    # Each twin leans slightly towards the next direction, never along its own.
    noise = 0.1 * torch.roll(torch.eye(4), shifts=1, dims=1)
    return torch.stack([base, base + noise], dim=1).reshape(8, 4)


def test_knn_indices_finds_twins_and_excludes_self() -> None:
    keys = _paired_keys()
    idx = knn_indices(keys, k=1)
    assert idx.dtype == torch.long and idx.shape == (8, 1)
    assert idx[:, 0].tolist() == [1, 0, 3, 2, 5, 4, 7, 6]
    with_self = knn_indices(keys, k=2, exclude_self=False)
    assert with_self[:, 0].tolist() == list(range(8))
    assert with_self[:, 1].tolist() == [1, 0, 3, 2, 5, 4, 7, 6]
    assert not (knn_indices(keys, k=7) == torch.arange(8)[:, None]).any()


def test_knn_indices_chunked_equals_unchunked() -> None:
    keys = torch.randn(37, 6, generator=torch.Generator().manual_seed(0))
    full = knn_indices(keys, k=5, chunk=1024)
    for chunk in (1, 4, 10):
        assert torch.equal(knn_indices(keys, k=5, chunk=chunk), full)
    sims = F.normalize(keys, dim=1) @ F.normalize(keys, dim=1).T
    sims.fill_diagonal_(-2.0)
    assert torch.equal(full, sims.topk(5, dim=1).indices)


def test_knn_indices_rejects_k_not_below_n() -> None:
    with pytest.raises(ValueError, match="k must be"):
        knn_indices(torch.randn(4, 3), k=4)
