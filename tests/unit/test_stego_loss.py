"""STEGO correspondence loss and sampling helpers against loop forms and hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch

from raylab.losses.stego import (
    correspondence_loss,
    derangement,
    feature_correlation,
    sample_points,
    stego_loss,
)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (a.norm() * b.norm())


def reference_loss(f1: torch.Tensor, f2: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
                   shift: float, pointwise: bool, zero_clamp: bool) -> torch.Tensor:
    """The formula in loop form, in float64: F and S per (b, h, w, i, j), F centred per
    point of image 1 (its mean over image 2's points replaced by the global mean)."""
    f1, f2, c1, c2 = (t.double() for t in (f1, f2, c1, c2))
    batch, _, h1, w1 = f1.shape
    h2, w2 = f2.shape[2:]
    fd = torch.zeros(batch, h1, w1, h2, w2, dtype=torch.float64)
    sd = torch.zeros_like(fd)
    for b in range(batch):
        for h in range(h1):
            for w in range(w1):
                for i in range(h2):
                    for j in range(w2):
                        fd[b, h, w, i, j] = _cos(f1[b, :, h, w], f2[b, :, i, j])
                        sd[b, h, w, i, j] = _cos(c1[b, :, h, w], c2[b, :, i, j])
    if pointwise:
        total = fd.sum() / fd.numel()
        centred = fd.clone()
        for b in range(batch):
            for h in range(h1):
                for w in range(w1):
                    point_mean = fd[b, h, w].sum() / (h2 * w2)
                    centred[b, h, w] = fd[b, h, w] - point_mean + total
        fd = centred
    terms = []
    for value_s, value_f in zip(sd.flatten().tolist(), fd.flatten().tolist(), strict=True):
        s = max(value_s, 0.0) if zero_clamp else value_s
        terms.append(-s * (value_f - shift))
    return torch.tensor(sum(terms) / len(terms), dtype=torch.float64)


@pytest.mark.parametrize("pointwise", [True, False])
@pytest.mark.parametrize("zero_clamp", [True, False])
def test_correspondence_loss_matches_loop_form(pointwise: bool, zero_clamp: bool) -> None:
    g = torch.Generator().manual_seed(0)
    f1 = torch.randn(2, 5, 2, 3, generator=g)
    f2 = torch.randn(2, 5, 3, 2, generator=g)
    c1 = torch.randn(2, 4, 2, 3, generator=g)
    c2 = torch.randn(2, 4, 3, 2, generator=g)
    got = correspondence_loss(f1, f2, c1, c2, 0.3, pointwise=pointwise, zero_clamp=zero_clamp)
    want = reference_loss(f1, f2, c1, c2, 0.3, pointwise, zero_clamp)
    assert got.ndim == 0
    assert got.item() == pytest.approx(want.item(), abs=1e-6)


def test_zero_clamp_changes_the_loss_when_codes_anticorrelate() -> None:
    f = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    c1 = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    c2 = -c1
    # S = -1: clamped to 0 gives a zero loss, unclamped gives -(-1) * (1 - 0) = 1.
    assert correspondence_loss(f, f, c1, c2, 0.0, pointwise=False).item() == 0.0
    assert correspondence_loss(f, f, c1, c2, 0.0, pointwise=False,
                               zero_clamp=False).item() == pytest.approx(1.0)


def test_hand_worked_one_by_one_maps() -> None:
    # F = cos((3, 4), (4, 3)) = 24/25; S = cos((1, 0), (1, 1)) = 1/sqrt(2).
    f1 = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)
    f2 = torch.tensor([4.0, 3.0]).view(1, 2, 1, 1)
    c1 = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    c2 = torch.tensor([1.0, 1.0]).view(1, 2, 1, 1)
    got = correspondence_loss(f1, f2, c1, c2, 0.2, pointwise=False)
    assert got.item() == pytest.approx(-(1 / math.sqrt(2)) * (24 / 25 - 0.2), abs=1e-6)
    # One point on each side: centring subtracts F and adds the global mean F back.
    assert correspondence_loss(f1, f2, c1, c2, 0.2).item() == pytest.approx(got.item(),
                                                                            abs=1e-6)


def test_centred_correlation_has_per_point_mean_equal_to_global_mean() -> None:
    g = torch.Generator().manual_seed(1)
    f1 = torch.randn(3, 6, 4, 5, generator=g) + 0.5
    f2 = torch.randn(3, 6, 3, 4, generator=g) + 0.5
    raw = feature_correlation(f1, f2, pointwise=False)
    centred = feature_correlation(f1, f2)
    per_point = centred.mean(dim=(3, 4))
    assert torch.allclose(per_point, raw.mean().expand_as(per_point), atol=1e-6)
    assert centred.mean().item() == pytest.approx(raw.mean().item(), abs=1e-6)
    # The spread within each point's row is untouched.
    assert torch.allclose(centred - centred.mean(dim=(3, 4), keepdim=True),
                          raw - raw.mean(dim=(3, 4), keepdim=True), atol=1e-6)


def test_gradient_reaches_codes_and_not_features() -> None:
    g = torch.Generator().manual_seed(2)
    f1 = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    f2 = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    c1 = torch.randn(2, 3, 3, 3, generator=g, requires_grad=True)
    c2 = torch.randn(2, 3, 3, 3, generator=g, requires_grad=True)
    loss = correspondence_loss(f1, f2, c1, c2, 0.1, zero_clamp=False)
    loss.backward()
    assert f1.grad is None and f2.grad is None
    assert c1.grad is not None and c1.grad.abs().sum() > 0
    assert c2.grad is not None and c2.grad.abs().sum() > 0


def test_mismatched_shapes_raise() -> None:
    f = torch.randn(2, 4, 3, 3)
    c = torch.randn(2, 3, 3, 3)
    with pytest.raises(ValueError, match="spatial"):
        correspondence_loss(f, f, c[:, :, :2], c, 0.0)
    with pytest.raises(ValueError, match="batch"):
        correspondence_loss(f, f[:1], c, c[:1], 0.0)


def test_derangement_has_no_fixed_points_and_is_a_permutation() -> None:
    g = torch.Generator().manual_seed(3)
    for n in (2, 3, 5, 8):
        for _ in range(200):
            perm = derangement(n, g)
            assert perm.dtype == torch.long
            assert sorted(perm.tolist()) == list(range(n))
            assert not (perm == torch.arange(n)).any()
    assert derangement(2, g).tolist() == [1, 0]


def test_derangement_is_deterministic_for_a_seeded_generator() -> None:
    a = [derangement(7, torch.Generator().manual_seed(11)).tolist() for _ in range(3)]
    assert a[0] == a[1] == a[2]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [derangement(6, g1).tolist() for _ in range(10)] == \
        [derangement(6, g2).tolist() for _ in range(10)]


def test_derangement_of_one_raises() -> None:
    with pytest.raises(ValueError, match="n >= 2"):
        derangement(1)


def test_sample_points_at_corners_returns_corner_pixels() -> None:
    t = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    # coords[b, s, r] = (x, y); the sampler transposes, so out[..., r, s] samples it.
    coords = torch.tensor([[[-1.0, -1.0], [-1.0, 1.0]],
                           [[1.0, -1.0], [1.0, 1.0]]]).expand(2, 2, 2, 2)
    out = sample_points(t, coords)
    assert out.shape == (2, 3, 2, 2)
    assert torch.equal(out[..., 0, 0], t[..., 0, 0])    # x=-1, y=-1: top left
    assert torch.equal(out[..., 1, 0], t[..., -1, 0])   # x=-1, y=1: bottom left
    assert torch.equal(out[..., 0, 1], t[..., 0, -1])   # x=1, y=-1: top right
    assert torch.equal(out[..., 1, 1], t[..., -1, -1])  # x=1, y=1: bottom right


def _maps(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(3, 8, 5, 5, generator=g)
    feats_pos = torch.randn(3, 8, 5, 5, generator=g)
    code = torch.randn(3, 4, 5, 5, generator=g, requires_grad=True)
    code_pos = torch.randn(3, 4, 5, 5, generator=g, requires_grad=True)
    return feats, feats_pos, code, code_pos


def test_stego_loss_total_is_the_weighted_sum_of_parts() -> None:
    feats, feats_pos, code, code_pos = _maps(4)
    weights = (0.5, 0.3, 0.7)
    total, parts = stego_loss(feats, feats_pos, code, code_pos, weights=weights,
                              samples=4, generator=torch.Generator().manual_seed(0))
    assert set(parts) == {"self", "knn", "rand"}
    assert all(not p.requires_grad for p in parts.values())
    want = sum(w * parts[k] for w, k in zip(weights, ("self", "knn", "rand"), strict=True))
    assert total.item() == pytest.approx(float(want), abs=1e-6)
    total.backward()
    assert code.grad is not None and code_pos.grad is not None


def test_stego_loss_terms_match_manual_sampling() -> None:
    feats, feats_pos, code, code_pos = _maps(6)
    shifts = (0.1, 0.2, 0.3)
    _, parts = stego_loss(feats, feats_pos, code, code_pos, shifts=shifts, samples=3,
                          generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    coords1 = torch.rand(3, 3, 3, 2, generator=g) * 2 - 1
    coords2 = torch.rand(3, 3, 3, 2, generator=g) * 2 - 1
    perm = derangement(3, g)
    fs, cs = sample_points(feats, coords1), sample_points(code, coords1)
    self_term = correspondence_loss(fs, fs, cs, cs, 0.1)
    knn_term = correspondence_loss(fs, sample_points(feats_pos, coords2), cs,
                                   sample_points(code_pos, coords2), 0.2)
    rand_term = correspondence_loss(fs, sample_points(feats[perm], coords2), cs,
                                    sample_points(code[perm], coords2), 0.3)
    assert parts["self"].item() == pytest.approx(self_term.item(), abs=1e-6)
    assert parts["knn"].item() == pytest.approx(knn_term.item(), abs=1e-6)
    assert parts["rand"].item() == pytest.approx(rand_term.item(), abs=1e-6)


def test_stego_loss_same_seed_same_loss() -> None:
    feats, feats_pos, code, code_pos = _maps(7)
    a, _ = stego_loss(feats, feats_pos, code, code_pos,
                      generator=torch.Generator().manual_seed(1))
    b, _ = stego_loss(feats, feats_pos, code, code_pos,
                      generator=torch.Generator().manual_seed(1))
    c, _ = stego_loss(feats, feats_pos, code, code_pos,
                      generator=torch.Generator().manual_seed(2))
    assert a.item() == b.item()
    assert a.item() != c.item()
