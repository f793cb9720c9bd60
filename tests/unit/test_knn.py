"""Weighted k-NN (DINO) and the linear probe on hand-made features."""

from __future__ import annotations

import math

import pytest
import torch

from raylab.errors import DataError
from raylab.metrics import knn_accuracy, knn_classify, linear_probe


def _unit(degrees: list[float]) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack((rad.cos(), rad.sin()), dim=1).float()


# One class-0 point at 0 degrees, two class-1 points at +-60 degrees.
TRAIN = _unit([0.0, 60.0, -60.0])
LABELS = torch.tensor([0, 1, 1])


def test_weighted_vote_beats_majority_by_hand() -> None:
    # Test point at 10 degrees: cosines 0.985 (class 0) and 0.643, 0.342 (class 1).
    query = _unit([10.0])
    # T = 0.07: class 0 gets e^14.07 = 1.3e6, class 1 e^9.18 + e^4.89 = 9.8e3.
    assert knn_classify(TRAIN, LABELS, query, k=3, T=0.07).tolist() == [0]
    # T = 1: class 0 gets e^0.985 = 2.68, class 1 e^0.643 + e^0.342 = 3.31; the
    # majority (class 1) wins, as it would in an unweighted vote.
    assert knn_classify(TRAIN, LABELS, query, k=3, T=1.0).tolist() == [1]
    # k = 1: the nearest point alone.
    assert knn_classify(TRAIN, LABELS, query, k=1, T=1.0).tolist() == [0]


def test_features_are_l2_normalised_and_k_is_capped() -> None:
    query = _unit([10.0, 170.0])
    scaled = TRAIN * torch.tensor([[0.01], [50.0], [3.0]])
    want = knn_classify(TRAIN, LABELS, query, k=3, T=1.0)
    assert torch.equal(knn_classify(scaled, LABELS, 7 * query, k=3, T=1.0), want)
    assert torch.equal(knn_classify(TRAIN, LABELS, query, k=100, T=1.0), want)


def _loop_knn(train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, k: int,
              T: float, num_classes: int) -> list[int]:
    train = train / train.norm(dim=1, keepdim=True)
    preds = []
    for q in test:
        q = q / q.norm()
        sims = sorted(((float(q @ x), int(y)) for x, y in zip(train, labels)), reverse=True)
        votes = [0.0] * num_classes
        for sim, y in sims[:k]:
            votes[y] += math.exp(sim / T)
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return preds


def test_matches_a_loop_on_random_features() -> None:
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(60, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (60,), generator=gen)
    test = torch.randn(25, 5, generator=gen, dtype=torch.float64)
    want = _loop_knn(train, labels, test, k=7, T=0.5, num_classes=4)
    for batch_size in (1, 8, 1024):
        got = knn_classify(train, labels, test, k=7, T=0.5, num_classes=4,
                           batch_size=batch_size)
        assert got.dtype == torch.int64 and got.tolist() == want


def test_knn_accuracy_and_errors() -> None:
    query = _unit([10.0, 80.0, -70.0])
    assert knn_accuracy(TRAIN, LABELS, query, torch.tensor([0, 1, 1]), k=1) == 1.0
    assert knn_accuracy(TRAIN, LABELS, query, torch.tensor([1, 1, 0]), k=1) == pytest.approx(1 / 3)
    with pytest.raises(DataError, match="labels span"):
        knn_classify(TRAIN, LABELS, query, num_classes=1)
    with pytest.raises(DataError, match="dimensions"):
        knn_classify(TRAIN, LABELS, torch.zeros(2, 3))
    with pytest.raises(DataError, match="train labels"):
        knn_classify(TRAIN, LABELS[:2], query)
    with pytest.raises(ValueError, match="k >= 1"):
        knn_classify(TRAIN, LABELS, query, k=0)


def _blobs(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[6.0, 0, 0, 0], [0, 6.0, 0, 0], [0, 0, -6.0, 6.0]])
    feats = torch.cat([c + torch.randn(n_per_class, 4, generator=gen) for c in centres])
    return 10 * feats + 3, torch.arange(3).repeat_interleave(n_per_class)


def test_linear_probe_separates_blobs() -> None:
    x_train, y_train = _blobs(30, seed=0)
    x_test, y_test = _blobs(10, seed=1)
    result = linear_probe(x_train, y_train, x_test, y_test, num_classes=3, epochs=20,
                          batch_size=32, seed=0)
    assert result == {"top1": 1.0, "top5": 1.0, "train_top1": 1.0}
    full = linear_probe(x_train, y_train, x_test, y_test, num_classes=3, epochs=40,
                        lr=0.05, batch_size=None)
    assert full["top1"] == 1.0


def test_linear_probe_is_deterministic() -> None:
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 6, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    runs = [linear_probe(x[:30], y[:30], x[30:], y[30:], 3, epochs=5, batch_size=8, seed=7)
            for _ in range(2)]
    assert runs[0] == runs[1]
    with pytest.raises(DataError, match="test labels span"):
        linear_probe(x[:30], y[:30], x[30:], y[30:] + 5, 3)
