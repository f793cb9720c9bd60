"""Frozen-feature evaluation: weighted k-NN (DINO) and a linear probe (pure torch, no Ray).

The k-NN classifier follows Caron et al., ICCV 2021 (facebookresearch/dino ``eval_knn.py``,
``knn_classifier``), itself after Wu et al. 2018: features are L2-normalised, the ``k``
training samples with the highest cosine similarity vote for their class with weight
``exp(sim / T)``, and the class with the largest summed weight wins. DINO's reported
numbers use k=20, T=0.07 on the teacher backbone's features.

Accuracies are fractions in [0, 1], like ``raylab.metrics.classification``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raylab.errors import DataError
from raylab.losses.classification import topk_correct


def _check_features(feats: torch.Tensor, labels: torch.Tensor | None, name: str) -> None:
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise DataError(f"{name} features must be a non-empty [N, D] tensor, got shape "
                        f"{tuple(feats.shape)}")
    if labels is not None and (labels.ndim != 1 or labels.shape[0] != feats.shape[0]):
        raise DataError(f"{name} labels must be [{feats.shape[0]}] for features "
                        f"{tuple(feats.shape)}, got shape {tuple(labels.shape)}")


def _resolve_classes(labels: torch.Tensor, num_classes: int | None, name: str) -> int:
    low, high = int(labels.min()), int(labels.max())
    if num_classes is None:
        num_classes = high + 1
    if low < 0 or high >= num_classes:
        raise DataError(f"{name} labels span {low}..{high}, expected 0..{num_classes - 1}")
    return int(num_classes)


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int = 20,
    T: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Predict test labels by a similarity-weighted vote of the ``k`` nearest train samples.

    Both feature sets are L2-normalised, so the similarity is the cosine. For each test
    sample, the ``min(k, N_train)`` most similar train samples add ``exp(sim / T)`` to
    their class; the prediction is the class with the largest total (ties go to the lower
    class index). The weights are computed as ``exp((sim - max_sim) / T)``, which scales
    every vote of a sample by the same factor, so the result is unchanged and small ``T``
    cannot overflow.

    Args:
        train_feats: ``[N_train, D]`` features of the labelled bank.
        train_labels: ``[N_train]`` integer labels.
        test_feats: ``[N_test, D]`` features to classify (moved to the bank's device in
            chunks).
        k: Neighbours (>= 1; capped at ``N_train``).
        T: Temperature of the vote weights (> 0).
        num_classes: Number of classes, or None for ``max(train_labels) + 1``.
        batch_size: Test samples per similarity matrix ``[batch, N_train]``.

    Returns:
        int64 predictions ``[N_test]`` on the bank's device.

    Raises:
        DataError: Empty or mis-shaped inputs, differing feature dimensions, or labels
            outside ``0..num_classes-1``.
        ValueError: ``k`` < 1, ``T`` <= 0 or ``batch_size`` < 1.
    """
    _check_features(train_feats, train_labels, "train")
    _check_features(test_feats, None, "test")
    if test_feats.shape[1] != train_feats.shape[1]:
        raise DataError(f"train features have {train_feats.shape[1]} dimensions, test "
                        f"features {test_feats.shape[1]}")
    if k < 1 or not T > 0 or batch_size < 1:
        raise ValueError(f"need k >= 1, T > 0 and batch_size >= 1, got k={k!r}, T={T!r}, "
                         f"batch_size={batch_size!r}")
    bank = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.to(bank.device).long()
    n_classes = _resolve_classes(labels, num_classes, "train")
    k = min(int(k), bank.shape[0])
    preds = []
    for start in range(0, test_feats.shape[0], batch_size):
        query = F.normalize(test_feats[start:start + batch_size].to(bank.device).float(), dim=1)
        sim, idx = (query @ bank.T).topk(k, dim=1)  # [b, k], most similar first
        weights = ((sim - sim[:, :1]) / T).exp()
        votes = torch.zeros(query.shape[0], n_classes, device=bank.device)
        votes.scatter_add_(1, labels[idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    T: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> float:
    """Top-1 accuracy (fraction) of :func:`knn_classify` against ``test_labels``."""
    _check_features(test_feats, test_labels, "test")
    preds = knn_classify(train_feats, train_labels, test_feats, k=k, T=T,
                         num_classes=num_classes, batch_size=batch_size)
    return float((preds == test_labels.to(preds.device)).float().mean())


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    batch_size: int | None = 256,
    seed: int = 0,
    standardize: bool = True,
) -> dict[str, float]:
    """Train a linear classifier on frozen features and report its accuracy.

    A small, deterministic stand-in for DINO's ``eval_linear.py`` for CPU-sized feature
    sets: the features are standardised with the train mean and std (``standardize``), an
    ``nn.Linear`` starting at zero (the problem is convex, so no random init is needed) is
    trained with AdamW and a cosine learning rate decaying to 0 over all steps, on
    mini-batches shuffled by a generator seeded with ``seed`` (``batch_size=None``:
    full batch). Runs on the features' device; no gradient reaches the features.

    Args:
        train_feats: ``[N_train, D]`` training features.
        train_labels: ``[N_train]`` integer labels.
        test_feats: ``[N_test, D]`` evaluation features.
        test_labels: ``[N_test]`` integer labels.
        num_classes: Number of classes ``C``.
        epochs: Passes over the training features (>= 1).
        lr: Peak AdamW learning rate (> 0).
        weight_decay: AdamW weight decay (>= 0).
        batch_size: Mini-batch size, or None for full batch.
        seed: Seed of the shuffling order.
        standardize: Standardise features with the train statistics.

    Returns:
        ``{"top1", "top5", "train_top1"}`` as fractions (top-5 counts every sample when
        ``C <= 5``).

    Raises:
        DataError: Mis-shaped inputs or labels outside ``0..C-1``.
        ValueError: A non-positive ``epochs``, ``lr`` or ``batch_size``, or a negative
            ``weight_decay``.
    """
    _check_features(train_feats, train_labels, "train")
    _check_features(test_feats, test_labels, "test")
    if test_feats.shape[1] != train_feats.shape[1]:
        raise DataError(f"train features have {train_feats.shape[1]} dimensions, test "
                        f"features {test_feats.shape[1]}")
    if epochs < 1 or not lr > 0 or weight_decay < 0 or (batch_size is not None
                                                         and batch_size < 1):
        raise ValueError(f"need epochs >= 1, lr > 0, weight_decay >= 0, batch_size >= 1 or "
                         f"None; got {epochs!r}, {lr!r}, {weight_decay!r}, {batch_size!r}")
    device = train_feats.device
    x_train = train_feats.detach().float()
    x_test = test_feats.detach().to(device).float()
    y_train = train_labels.to(device).long()
    y_test = test_labels.to(device).long()
    _resolve_classes(y_train, num_classes, "train")
    _resolve_classes(y_test, num_classes, "test")
    if standardize:
        mean = x_train.mean(dim=0)
        std = x_train.std(dim=0, correction=0).clamp_min(1e-6)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    n = x_train.shape[0]
    size = n if batch_size is None else min(int(batch_size), n)
    steps_per_epoch = math.ceil(n / size)
    model = nn.Linear(x_train.shape[1], num_classes).to(device)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(int(seed))
    for _ in range(int(epochs)):
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, size):
            idx = order[start:start + size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    with torch.no_grad():
        test_hits = topk_correct(model(x_test), y_test, ks=(1, 5))
        train_hits = topk_correct(model(x_train), y_train, ks=(1,))
    return {
        "top1": test_hits[1] / y_test.shape[0],
        "top5": test_hits[5] / y_test.shape[0],
        "train_top1": train_hits[1] / n,
    }
