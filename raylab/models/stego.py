"""STEGO's segmentation head, probes, and frozen-backbone feature and KNN helpers.

Hamilton et al., "Unsupervised Semantic Segmentation by Distilling Feature Correspondences",
ICLR 2022; checked against the reference implementation (mhamilton723/STEGO
``src/modules.py`` ``DinoFeaturizer``/``ClusterLookup``, ``src/train_segmentation.py`` and
``src/precompute_knns.py``). A frozen backbone gives a patch feature map
(:func:`patch_features`); a small :class:`SegmentationHead` maps it to codes trained with
:func:`raylab.losses.stego.stego_loss`; a :class:`ClusterProbe` (unsupervised, cosine
k-means) and a :class:`LinearProbe` (supervised) read segments off the codes. Each image's
training partner is one of its nearest neighbours in global-feature space
(:func:`global_features`, :func:`knn_indices`). Pure torch, no Ray import.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Same eps as the reference's normalisation: keeps all-zero vectors at zero instead of NaN.
_NORM_EPS = 1e-10


class SegmentationHead(nn.Module):
    """Codes from backbone features: a linear plus a two-layer 1x1-conv branch, summed.

    ``code = linear(dropout(f)) + nonlinear(dropout(f))``. As in the reference, each branch
    gets its own dropout draw (``Dropout2d``, which zeroes whole channels); at ``dropout=0``
    or in eval mode both see the features unchanged.

    Args:
        in_dim: Backbone feature channels ``C``.
        code_dim: Code channels ``K`` (70 in the reference).
        dropout: Channel dropout probability on the features (0.1).

    Raises:
        ValueError: A dimension below 1 or a dropout outside ``[0, 1)``.
    """

    def __init__(self, in_dim: int, code_dim: int = 70, dropout: float = 0.1) -> None:
        super().__init__()
        if in_dim < 1 or code_dim < 1:
            raise ValueError(f"in_dim and code_dim must be >= 1, got {in_dim!r}, "
                             f"{code_dim!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dropout = nn.Dropout2d(dropout)
        self.linear = nn.Conv2d(in_dim, code_dim, 1)
        self.nonlinear = nn.Sequential(
            nn.Conv2d(in_dim, in_dim, 1),
            nn.ReLU(),
            nn.Conv2d(in_dim, code_dim, 1),
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Map features ``(B, C, H, W)`` to codes ``(B, code_dim, H, W)``."""
        return self.linear(self.dropout(feats)) + self.nonlinear(self.dropout(feats))


class ClusterProbe(nn.Module):
    """Cosine k-means on a feature map, trained by gradient descent.

    The centroids are learnable, ``(n_clusters, dim)``, initialised from ``torch.randn``
    (the global RNG, so ``torch.manual_seed`` fixes them). ``inner[b, n, h, w]`` is the
    cosine similarity of ``x[b, :, h, w]`` and centroid ``n``. The loss
    ``-(probs * inner).sum(1).mean()`` is the negative mean similarity of each point to its
    (soft) assigned centroid; with hard assignments it is k-means in cosine distance.

    Args:
        dim: Channels of the input map.
        n_clusters: Number of clusters.

    Raises:
        ValueError: A dimension below 1.
    """

    def __init__(self, dim: int, n_clusters: int) -> None:
        super().__init__()
        if dim < 1 or n_clusters < 1:
            raise ValueError(f"dim and n_clusters must be >= 1, got {dim!r}, {n_clusters!r}")
        self.n_clusters = n_clusters
        self.clusters = nn.Parameter(torch.randn(n_clusters, dim))

    def similarities(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine similarities ``(B, n_clusters, H, W)`` of ``x`` ``(B, dim, H, W)``."""
        centroids = F.normalize(self.clusters, dim=1, eps=_NORM_EPS)
        feats = F.normalize(x, dim=1, eps=_NORM_EPS)
        return torch.einsum("bchw,nc->bnhw", feats, centroids)

    def forward(self, x: torch.Tensor,
                alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cluster loss and assignment probabilities.

        Args:
            x: Map ``(B, dim, H, W)``.
            alpha: ``None`` for hard (one-hot argmax) assignments; otherwise the inverse
                temperature of ``softmax(inner * alpha)`` over clusters.

        Returns:
            ``(loss, probs)``: the scalar loss and ``probs`` ``(B, n_clusters, H, W)``.
        """
        inner = self.similarities(x)
        if alpha is None:
            # Hard assignments carry no gradient themselves; the loss still reaches the
            # centroids and x through ``inner``.
            probs = F.one_hot(inner.argmax(dim=1), self.n_clusters)
            probs = probs.permute(0, 3, 1, 2).to(inner.dtype)
        else:
            probs = F.softmax(inner * alpha, dim=1)
        loss = -(probs * inner).sum(dim=1).mean()
        return loss, probs

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Index ``(B, H, W)`` of the most similar centroid at every point."""
        return self.similarities(x).argmax(dim=1)


class LinearProbe(nn.Module):
    """Per-point linear classifier (a 1x1 conv) on a feature or code map.

    Args:
        dim: Channels of the input map.
        n_classes: Number of classes.
    """

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes, H, W)`` for a map ``(B, dim, H, W)``."""
        return self.conv(x)

    @staticmethod
    def loss(logits: torch.Tensor, target: torch.Tensor,
             ignore_index: int = 255) -> torch.Tensor:
        """Cross-entropy of logits against a label map, ignoring ``ignore_index``.

        Args:
            logits: ``(B, n_classes, h, w)``; bilinearly upsampled
                (``align_corners=False``) to the target's size when it differs.
            target: Labels ``(B, H, W)``.
            ignore_index: Label of pixels that do not count.

        Returns:
            The mean loss over the counted pixels; when none counts, a zero that is still
            attached to ``logits`` (``F.cross_entropy`` would return NaN), so a training
            step can call ``backward`` unconditionally.
        """
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear",
                                   align_corners=False)
        if not bool((target != ignore_index).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, target.long(), ignore_index=ignore_index)


def patch_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's last-layer feature map ``(B, C, h, w)`` for images ``x``.

    For a timm vision transformer (it has ``patch_embed`` and ``num_prefix_tokens``), the
    output tokens of ``forward_features`` minus the prefix (class and register) tokens,
    laid out on the patch grid ``h = H // ph``, ``w = W // pw``. Reading the grid from the
    input size supports ViTs built with ``dynamic_img_size=True`` at any input size. For a
    CNN whose ``forward_features`` already returns a 4-D map, that map as is.

    No ``torch.no_grad`` is applied here: call it under ``no_grad`` (and the backbone in
    eval mode) for STEGO's frozen backbone.

    Args:
        backbone: A timm model.
        x: Images ``(B, 3, H, W)``.

    Returns:
        The feature map ``(B, C, h, w)``.

    Raises:
        ValueError: The token count does not match the patch grid (e.g. a ViT without
            ``dynamic_img_size`` fed another size, or one that pads the input), or the
            backbone's output is neither ViT tokens nor a 4-D map.
    """
    out = backbone.forward_features(x)
    if out.ndim == 4:
        return out
    if out.ndim != 3 or not (hasattr(backbone, "patch_embed")
                             and hasattr(backbone, "num_prefix_tokens")):
        raise ValueError(f"cannot read a feature map from {type(backbone).__name__}: "
                         f"forward_features returned shape {tuple(out.shape)}")
    tokens = out[:, int(backbone.num_prefix_tokens):]
    ph, pw = _pair(backbone.patch_embed.patch_size)
    h, w = x.shape[-2] // ph, x.shape[-1] // pw
    if h * w != tokens.shape[1]:
        raise ValueError(f"{tokens.shape[1]} patch tokens do not fit the {h}x{w} patch grid "
                         f"of a {x.shape[-2]}x{x.shape[-1]} input with {ph}x{pw} patches")
    return tokens.transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)


def _pair(size: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def global_features(feature_map: torch.Tensor) -> torch.Tensor:
    """KNN key of each image: the spatial mean of its feature map, L2-normalised.

    Args:
        feature_map: ``(B, C, H, W)``.

    Returns:
        Unit vectors ``(B, C)``.
    """
    return F.normalize(feature_map.mean(dim=(2, 3)), dim=1, eps=_NORM_EPS)


@torch.no_grad()
def knn_indices(keys: torch.Tensor, k: int, chunk: int = 1024,
                exclude_self: bool = True) -> torch.Tensor:
    """Indices of each row's ``k`` nearest rows in cosine similarity.

    The keys are L2-normalised here, then compared ``chunk`` rows at a time against all
    rows, so memory is ``chunk x N`` rather than ``N x N``. Unlike the reference, which
    keeps every image as its own first neighbour, ``exclude_self`` leaves the row itself
    out, so that a KNN training pair is always two different images (the self pairing is
    a separate term of the loss already).

    Args:
        keys: ``(N, C)``, e.g. from :func:`global_features`.
        k: Neighbours per row, ``1 <= k < N``.
        chunk: Rows compared at a time.
        exclude_self: Leave each row out of its own neighbours.

    Returns:
        ``LongTensor`` ``(N, k)``, most similar first, on ``keys``' device.

    Raises:
        ValueError: ``keys`` not 2-D, ``k`` outside ``[1, N)``, or ``chunk < 1``.
    """
    if keys.ndim != 2:
        raise ValueError(f"keys must be (N, C), got shape {tuple(keys.shape)}")
    n = keys.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N) for N={n} keys, got k={k!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk!r}")
    normed = F.normalize(keys.float(), dim=1, eps=_NORM_EPS)
    out = []
    for start in range(0, n, chunk):
        rows = normed[start:start + chunk]
        sims = rows @ normed.T
        if exclude_self:
            own = torch.arange(start, start + rows.shape[0], device=keys.device)
            sims[torch.arange(rows.shape[0], device=keys.device), own] = float("-inf")
        out.append(sims.topk(k, dim=1).indices)
    return torch.cat(out)
