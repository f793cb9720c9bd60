"""STEGO's contrastive correlation loss and its sampling helpers.

Hamilton et al., "Unsupervised Semantic Segmentation by Distilling Feature Correspondences",
ICLR 2022; checked against the reference implementation (mhamilton723/STEGO
``src/modules.py``, ``ContrastiveCorrelationLoss``). A frozen backbone's feature
correspondences (cosine similarity of every pair of feature-map points) supervise the
correspondences of a small trainable segmentation head's codes: pairs of points whose
features agree more than a ``shift`` are pulled together in code space, the others pushed
apart. The features never get a gradient. Pure torch, no Ray import.

The loss is evaluated on three pairings of each image with a partner: itself ("self"), a
nearest neighbour in global-feature space ("knn", supplied by the caller), and a random other
image of the batch ("rand", a :func:`derangement` of the batch). Each pairing samples
``samples x samples`` random points per image instead of the full maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The reference's ``norm`` uses this eps so that all-zero vectors stay zero instead of NaN.
_NORM_EPS = 1e-10


def _norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=1, eps=_NORM_EPS)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out[n, h, w, i, j] = <a[n, :, h, w], b[n, :, i, j]>``."""
    return torch.einsum("nchw,ncij->nhwij", a, b)


def _check_maps(f1: torch.Tensor, f2: torch.Tensor, c1: torch.Tensor,
                c2: torch.Tensor) -> None:
    shapes = {"f1": f1.shape, "f2": f2.shape, "c1": c1.shape, "c2": c2.shape}
    if any(len(s) != 4 for s in shapes.values()):
        raise ValueError(f"feature and code maps must be (B, C, H, W), got "
                         f"{ {k: tuple(v) for k, v in shapes.items()} }")
    if f1.shape[0] != f2.shape[0] or c1.shape[0] != f1.shape[0] or c2.shape[0] != f2.shape[0]:
        raise ValueError(f"batch sizes differ: { {k: v[0] for k, v in shapes.items()} }")
    if f1.shape[2:] != c1.shape[2:] or f2.shape[2:] != c2.shape[2:]:
        raise ValueError(f"features and codes must share spatial sizes: f1 {tuple(f1.shape)} "
                         f"vs c1 {tuple(c1.shape)}, f2 {tuple(f2.shape)} vs c2 "
                         f"{tuple(c2.shape)}")
    if f1.shape[1] != f2.shape[1] or c1.shape[1] != c2.shape[1]:
        raise ValueError(f"channel counts differ: f1 {f1.shape[1]} vs f2 {f2.shape[1]}, "
                         f"c1 {c1.shape[1]} vs c2 {c2.shape[1]}")


@torch.no_grad()
def feature_correlation(f1: torch.Tensor, f2: torch.Tensor,
                        pointwise: bool = True) -> torch.Tensor:
    """Cosine similarities ``F[b, h, w, i, j]`` of two feature maps, optionally centred.

    With ``pointwise``, each point ``(b, h, w)`` of image 1 has its mean over image 2's
    points ``(i, j)`` subtracted and the global mean of the uncentred ``F`` added back, so
    every point's mean equals that global mean (see :func:`correspondence_loss`).

    Args:
        f1: ``(B, C, H, W)``.
        f2: ``(B, C, H2, W2)``.
        pointwise: Centre per point of image 1.

    Returns:
        ``(B, H, W, H2, W2)``, without gradient.
    """
    fd = _correlation(_norm(f1), _norm(f2))
    if pointwise:
        old_mean = fd.mean()
        fd = fd - fd.mean(dim=(3, 4), keepdim=True)
        # After the per-point subtraction the global mean is 0 up to rounding; it is removed
        # again before restoring old_mean, in the reference's order of operations.
        fd = fd - fd.mean() + old_mean
    return fd


def correspondence_loss(
    f1: torch.Tensor,
    f2: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    shift: float,
    pointwise: bool = True,
    zero_clamp: bool = True,
) -> torch.Tensor:
    """Mean of ``-clamp(S, min=0) * (F - shift)`` over every pair of points of two maps.

    ``F[b, h, w, i, j]`` is the cosine similarity of feature vectors ``f1[b, :, h, w]`` and
    ``f2[b, :, i, j]``, ``S`` the same for the codes. With ``pointwise``, ``F`` is centred
    per point of image 1, as the reference does: for each ``(b, h, w)`` its mean over image
    2's points ``(i, j)`` is subtracted, then the global mean of ``F`` from before centring
    is added back. That keeps the overall level of ``F`` (which ``shift`` is tuned against)
    while removing each point's own bias, e.g. a point that is similar to everything.

    ``F`` is computed without gradient: the features come from a frozen backbone and only
    the codes are trained. Clamping ``S`` at 0 (``zero_clamp``) stops the loss from pushing
    codes of dissimilar points towards negative correlation, which the paper found to
    destabilise training; ``zero_clamp=False`` uses ``S`` unclamped.

    Args:
        f1: Features of image 1, ``(B, C, H, W)``.
        f2: Features of image 2, ``(B, C, H2, W2)``.
        c1: Codes of image 1, ``(B, K, H, W)``.
        c2: Codes of image 2, ``(B, K, H2, W2)``.
        shift: Subtracted from ``F``; higher values push more pairs apart.
        pointwise: Centre ``F`` per point of image 1 (see above).
        zero_clamp: Clamp the code correlation at 0 from below.

    Returns:
        The scalar loss, differentiable with respect to ``c1`` and ``c2`` only.

    Raises:
        ValueError: Maps that are not 4-D, or whose batch, channel or spatial sizes do not
            match as described above.
    """
    _check_maps(f1, f2, c1, c2)
    fd = feature_correlation(f1, f2, pointwise)
    cd = _correlation(_norm(c1), _norm(c2))
    if zero_clamp:
        cd = cd.clamp(min=0.0)
    return -(cd * (fd - shift)).mean()


def sample_points(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample a map at normalised coordinates, as the reference's ``sample``.

    The coordinates are transposed before ``grid_sample`` (``coords[b, s, r]`` ends up at
    output position ``(r, s)``); kept for parity with the reference, it does not matter for
    the loss since both images' points are sampled the same way.

    Args:
        t: Map ``(B, C, H, W)``.
        coords: ``(B, S, S, 2)`` points ``(x, y)`` in ``[-1, 1]``; ``-1``/``1`` are the
            centres of the first/last pixels (``align_corners=True``).

    Returns:
        The sampled map ``(B, C, S, S)``; points outside are clamped to the border.
    """
    return F.grid_sample(t, coords.permute(0, 2, 1, 3), padding_mode="border",
                         align_corners=True)


def derangement(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random permutation of ``0..n-1`` with no fixed point.

    Used to pair every image of a batch with a different, random image. Drawn by rejection
    (about e ~ 2.7 draws of ``randperm`` on average), so it is uniform over derangements
    and deterministic for a seeded ``generator``. The reference's ``super_perm`` instead
    bumps fixed points by one, which can map two images to the same partner.

    Args:
        n: Number of elements, ``>= 2``.
        generator: CPU random generator; the global one when ``None``.

    Returns:
        A ``LongTensor`` ``(n,)`` on the CPU with ``perm[i] != i`` for every ``i``.

    Raises:
        ValueError: ``n < 2``: a single image has no other image to pair with.
    """
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2 (a batch of {n} image(s) has no other "
                         f"image to pair with); use a batch size of at least 2")
    ident = torch.arange(n)
    while True:
        perm = torch.randperm(n, generator=generator)
        if not bool((perm == ident).any()):
            return perm


def stego_loss(
    feats: torch.Tensor,
    feats_pos: torch.Tensor,
    code: torch.Tensor,
    code_pos: torch.Tensor,
    *,
    weights: tuple[float, float, float] = (0.67, 0.25, 0.63),
    shifts: tuple[float, float, float] = (0.18, 0.12, 0.46),
    samples: int = 11,
    generator: torch.Generator | None = None,
    pointwise: bool = True,
    zero_clamp: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """STEGO's total loss: weighted self, KNN and random-image correspondence terms.

    Two sets of ``samples x samples`` points, ``coords1`` and ``coords2``, are drawn
    uniformly in ``[-1, 1]`` per image. The image is sampled at ``coords1``; its KNN partner
    and a random other image of the batch (``feats[perm]`` for a :func:`derangement`
    ``perm``) at ``coords2``. The terms are :func:`correspondence_loss` of the image with
    itself (both at ``coords1``), with its KNN partner and with the random image, with the
    matching shift each. All randomness comes from ``generator``, so a seeded generator
    reproduces the loss exactly.

    The defaults are the reference's settings for COCO-Stuff with a ViT-S/8 backbone.

    Args:
        feats: Frozen backbone features of the images, ``(B, C, H, W)``.
        feats_pos: Features of each image's KNN partner, ``(B, C, H', W')``.
        code: Segmentation-head codes of the images, ``(B, K, H, W)``.
        code_pos: Codes of the KNN partners, ``(B, K, H', W')``.
        weights: Weights of the ``(self, knn, rand)`` terms.
        shifts: Shifts of the ``(self, knn, rand)`` terms.
        samples: Points per side of the sampled grid.
        generator: CPU generator for the points and the random pairing; the global RNG
            when ``None``.
        pointwise: Passed to :func:`correspondence_loss`.
        zero_clamp: Passed to :func:`correspondence_loss`.

    Returns:
        ``(total, parts)``: the scalar loss and the detached terms under ``"self"``,
        ``"knn"`` and ``"rand"`` (unweighted).

    Raises:
        ValueError: ``samples < 1``, a batch of fewer than 2 images, or maps whose shapes
            do not match.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples!r}")
    batch = feats.shape[0]
    shape = (batch, samples, samples, 2)
    # Drawn on the CPU generator then moved, so the draw does not depend on the device.
    coords1 = (torch.rand(shape, generator=generator) * 2 - 1).to(feats.device, feats.dtype)
    coords2 = (torch.rand(shape, generator=generator) * 2 - 1).to(feats.device, feats.dtype)
    perm = derangement(batch, generator).to(feats.device)

    fs = sample_points(feats, coords1)
    cs = sample_points(code, coords1.to(code.dtype))
    fps = sample_points(feats_pos, coords2)
    cps = sample_points(code_pos, coords2.to(code_pos.dtype))
    fns = sample_points(feats[perm], coords2)
    cns = sample_points(code[perm], coords2.to(code.dtype))

    w_self, w_knn, w_rand = weights
    s_self, s_knn, s_rand = shifts
    terms = {
        "self": correspondence_loss(fs, fs, cs, cs, s_self, pointwise, zero_clamp),
        "knn": correspondence_loss(fs, fps, cs, cps, s_knn, pointwise, zero_clamp),
        "rand": correspondence_loss(fs, fns, cs, cns, s_rand, pointwise, zero_clamp),
    }
    total = w_self * terms["self"] + w_knn * terms["knn"] + w_rand * terms["rand"]
    return total, {k: v.detach() for k, v in terms.items()}
