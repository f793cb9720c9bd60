"""STEGO's trainable part on cached frozen features: the head and the probes, and their
predictions at label resolution (pure torch: the worker's evaluation and the driver's
report share it)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raylab.losses.stego import stego_loss
from raylab.metrics.segmentation import SegmentationMetric
from raylab.models.stego import ClusterProbe, LinearProbe, SegmentationHead

#: Label value of ignored (void) pixels in segmentation shards.
VOID = 255


class StegoModel(nn.Module):
    """The segmentation head, the two probes on its detached code, and a linear probe on
    the raw features (the baseline's supervised score).

    One ``forward`` computes every loss, so that DDP sees one forward per step.
    """

    def __init__(self, feat_dim: int, code_dim: int, dropout: float, n_classes: int) -> None:
        super().__init__()
        self.head = SegmentationHead(feat_dim, code_dim, dropout)
        self.cluster_probe = ClusterProbe(code_dim, n_classes)
        self.linear_probe = LinearProbe(code_dim, n_classes)
        self.raw_probe = LinearProbe(feat_dim, n_classes)

    def forward(self, feats: torch.Tensor, feats_pos: torch.Tensor, labels: torch.Tensor,
                *, weights: tuple[float, float, float], shifts: tuple[float, float, float],
                samples: int, generator: torch.Generator, pointwise: bool = True,
                zero_clamp: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, detached parts) of one batch: the correspondence terms train the
        head; the probes learn from the detached code (they never shape it)."""
        code, code_pos = self.head(feats), self.head(feats_pos)
        corr, parts = stego_loss(feats, feats_pos, code, code_pos, weights=weights,
                                 shifts=shifts, samples=samples, generator=generator,
                                 pointwise=pointwise, zero_clamp=zero_clamp)
        detached = code.detach()
        cluster_loss, _ = self.cluster_probe(detached, None)
        linear_loss = self.linear_probe.loss(self.linear_probe(detached), labels, VOID)
        raw_loss = self.raw_probe.loss(self.raw_probe(feats), labels, VOID)
        total = corr + cluster_loss + linear_loss + raw_loss
        out = {f"loss_{k}": v.detach() for k, v in parts.items()}
        out.update(loss_corr=corr.detach(), loss_cluster=cluster_loss.detach(),
                   loss_linear=linear_loss.detach(), loss_raw=raw_loss.detach())
        return total, out


def upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) maps to ``size`` x ``size`` (the labels')."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def predict(model: StegoModel, feats: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    """Per-pixel predictions at label resolution (the reference upsamples the code, then
    applies the probes): ``cluster`` (cluster ids), ``linear`` and ``raw_linear``
    (class ids)."""
    code = upsample(model.head(feats), size)
    return {"cluster": model.cluster_probe.predict(code),
            "linear": model.linear_probe(code).argmax(1),
            "raw_linear": model.raw_probe(upsample(feats, size)).argmax(1)}


@torch.no_grad()
def cosine_kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator
                  ) -> torch.Tensor:
    """Centroids (k, C) of spherical k-means on the rows of ``x`` (N, C): the paper's
    baseline clusters the raw DINO features this way. Seeded with k-means++ on the cosine
    distance (a uniform draw often puts two seeds in one cluster, which Lloyd's steps
    rarely undo); an empty cluster takes the row farthest from its centroid."""
    x = F.normalize(x.float(), dim=1)
    if len(x) < k:
        raise ValueError(f"k-means: {len(x)} points for {k} clusters")
    first = int(torch.randint(len(x), (1,), generator=generator))
    centroids = [x[first]]
    closest = 1 - x @ x[first]
    for _ in range(1, k):
        weights = closest.clamp(min=0)
        pick = (int(torch.multinomial(weights, 1, generator=generator)) if weights.sum() > 0
                else int(torch.randint(len(x), (1,), generator=generator)))
        centroids.append(x[pick])
        closest = torch.minimum(closest, 1 - x @ x[pick])
    c = torch.stack(centroids)
    for _ in range(iters):
        sim = x @ c.T
        assign = sim.argmax(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        for j in torch.nonzero(counts == 0).flatten().tolist():
            far = int(sim.max(1).values.argmin())
            sums[j], counts[j] = x[far], 1
            sim[far] = 2  # taken: the next empty cluster takes another row
        c = F.normalize(sums, dim=1)
    return c


@torch.no_grad()
def kmeans_predict(centroids: torch.Tensor, feats: torch.Tensor, size: int) -> torch.Tensor:
    """Cluster ids at label resolution: cosine similarities to the centroids, upsampled."""
    sim = torch.einsum("bchw,kc->bkhw", F.normalize(feats, dim=1), centroids)
    return upsample(sim, size).argmax(1)


def feature_points(feats: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B*h*w, C) feature vectors."""
    return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])


def score(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], model: StegoModel,
          n_classes: int, size: int, centroids: torch.Tensor | None = None
          ) -> dict[str, SegmentationMetric]:
    """Accumulated metrics over (features, labels) batches: ``cluster`` (Hungarian),
    ``linear``, ``raw_linear`` and, given k-means ``centroids``, ``kmeans`` (Hungarian)."""
    metrics = {"cluster": SegmentationMetric(n_classes, unsupervised=True),
               "linear": SegmentationMetric(n_classes),
               "raw_linear": SegmentationMetric(n_classes)}
    if centroids is not None:
        metrics["kmeans"] = SegmentationMetric(n_classes, unsupervised=True)
    was_training = model.training
    model.eval()
    for feats, labels in batches:
        preds: dict[str, Any] = predict(model, feats, size)
        if centroids is not None:
            preds["kmeans"] = kmeans_predict(centroids, feats, size)
        for name, metric in metrics.items():
            metric.update(preds[name].cpu(), labels.cpu())
    model.train(was_training)
    return metrics
