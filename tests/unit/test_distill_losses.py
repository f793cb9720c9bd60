"""MiniViT distillation losses against loop forms of eqs. 9-11 and hand-worked numbers."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from raylab.losses.distill import (
    attention_relation_loss,
    hidden_relation_loss,
    prediction_loss,
)

Nested = list[list[list[float]]]


# ---- loop forms: python floats and math only, nothing shared with the vectorised code ----

def _loop_softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    total = sum(exps)
    return [e / total for e in exps]


def loop_relation(a: Nested, b: Nested, heads: int) -> list:
    """R[b][h][n][m] = softmax_m(sum_e a[b][n][h*d+e] * b[b][m][h*d+e] / sqrt(d))."""
    width = len(a[0][0])
    d = width // heads
    out = []
    for bi in range(len(a)):
        per_head = []
        for h in range(heads):
            rows = []
            for n in range(len(a[bi])):
                scores = []
                for m in range(len(b[bi])):
                    dot = 0.0
                    for e in range(h * d, (h + 1) * d):
                        dot += a[bi][n][e] * b[bi][m][e]
                    scores.append(dot / math.sqrt(d))
                rows.append(_loop_softmax(scores))
            per_head.append(rows)
        out.append(per_head)
    return out


def loop_row_ce(r_s: list, r_t: list) -> float:
    """mean over (b, h, n) of -sum_m r_t[b][h][n][m] * log r_s[b][h][n][m]."""
    total, rows = 0.0, 0
    for bi in range(len(r_t)):
        for h in range(len(r_t[bi])):
            for n in range(len(r_t[bi][h])):
                total -= sum(t * math.log(s) for t, s in zip(r_t[bi][h][n], r_s[bi][h][n]))
                rows += 1
    return total / rows


def loop_attention(qkv_s: tuple, qkv_t: tuple, heads: int, teacher_only: bool = False) -> float:
    """Eq. 10: the row cross-entropy averaged over the 9 ordered (i, j) pairs of q, k, v.

    With ``teacher_only`` it is the teacher's own relation entropy (the loss's lower bound).
    """
    s = [x.tolist() for x in qkv_s]
    t = [x.tolist() for x in qkv_t]
    total = 0.0
    for i in range(3):
        for j in range(3):
            r_t = loop_relation(t[i], t[j], heads)
            r_s = r_t if teacher_only else loop_relation(s[i], s[j], heads)
            total += loop_row_ce(r_s, r_t)
    return total / 9


def loop_hidden(h_s: torch.Tensor, h_t: torch.Tensor, teacher_only: bool = False) -> float:
    """Eq. 11: one relation per side, H H^T / sqrt(d) with each side's own d."""
    r_t = loop_relation(h_t.tolist(), h_t.tolist(), 1)
    r_s = r_t if teacher_only else loop_relation(h_s.tolist(), h_s.tolist(), 1)
    return loop_row_ce(r_s, r_t)


def loop_prediction(s: torch.Tensor, t: torch.Tensor, temp: float,
                    teacher_only: bool = False) -> float:
    """Eq. 9: mean_b -sum_c softmax(t_b / T)_c log softmax(s_b / T)_c."""
    total = 0.0
    for s_row, t_row in zip(s.tolist(), t.tolist()):
        p_t = _loop_softmax([x / temp for x in t_row])
        p_s = p_t if teacher_only else _loop_softmax([x / temp for x in s_row])
        total -= sum(pt * math.log(ps) for pt, ps in zip(p_t, p_s))
    return total / len(s)


def _qkv(batch: int, tokens: int, width: int, seed: int, scale: float = 1.5,
         grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(  # type: ignore[return-value]
        (scale * torch.randn(batch, tokens, width, generator=gen)).requires_grad_(grad)
        for _ in range(3))


def _hidden(batch: int, tokens: int, width: int, seed: int, grad: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(batch, tokens, width, generator=gen)).requires_grad_(grad)


# ---- equations in loop form, student and teacher of different widths ----

@pytest.mark.parametrize("heads", [1, 2, 4])
def test_attention_relation_matches_loop_form(heads: int) -> None:
    qkv_s = _qkv(2, 5, 12, seed=1)  # student C=12
    qkv_t = _qkv(2, 5, 20, seed=2)  # teacher C=20
    got = attention_relation_loss(qkv_s, qkv_t, relation_heads=heads)
    assert got.dtype == torch.float32 and got.shape == ()
    assert float(got) == pytest.approx(loop_attention(qkv_s, qkv_t, heads), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(("d_s", "d_t"), [(12, 20), (8, 3)])
def test_hidden_relation_matches_loop_form(d_s: int, d_t: int) -> None:
    h_s, h_t = _hidden(3, 6, d_s, seed=3), _hidden(3, 6, d_t, seed=4)
    got = hidden_relation_loss(h_s, h_t)
    assert got.dtype == torch.float32 and got.shape == ()
    assert float(got) == pytest.approx(loop_hidden(h_s, h_t), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("temp", [1.0, 2.0, 0.5])
def test_prediction_matches_loop_form(temp: float) -> None:
    gen = torch.Generator().manual_seed(5)
    s, t = 3 * torch.randn(4, 7, generator=gen), 3 * torch.randn(4, 7, generator=gen)
    got = prediction_loss(s, t, T=temp)
    assert got.dtype == torch.float32 and got.shape == ()
    assert float(got) == pytest.approx(loop_prediction(s, t, temp), rel=1e-5, abs=1e-6)


def test_attention_with_one_head_and_q_k_v_equal_is_the_hidden_relation() -> None:
    # All nine pairs reduce to H H^T when q = k = v = H, so eq. 10 collapses to eq. 11.
    h_s, h_t = _hidden(2, 5, 12, seed=6), _hidden(2, 5, 20, seed=7)
    attn = attention_relation_loss((h_s, h_s, h_s), (h_t, h_t, h_t), relation_heads=1)
    assert float(attn) == pytest.approx(float(hidden_relation_loss(h_s, h_t)), rel=1e-6)


# ---- prediction loss by hand and against torch's soft-target cross-entropy ----

def test_prediction_hand_worked() -> None:
    # s = [0, ln 3] -> p_s = [1/4, 3/4]; t = [0, 0] -> p_t = [1/2, 1/2].
    # L = -(1/2 ln 1/4 + 1/2 ln 3/4) = 1/2 ln(16/3) = 0.836988...
    s = torch.tensor([[0.0, math.log(3.0)]])
    t = torch.tensor([[0.0, 0.0]])
    assert float(prediction_loss(s, t)) == pytest.approx(0.5 * math.log(16 / 3), rel=1e-6)
    assert float(prediction_loss(s, t)) == pytest.approx(0.8369882, rel=1e-6)


def test_prediction_hand_worked_temperature_2() -> None:
    # T = 2: t = [0, 2 ln 3] / 2 = [0, ln 3] -> p_t = [1/4, 3/4];
    # s = [0, ln 3] / 2 -> p_s = [1, sqrt 3] / (1 + sqrt 3).
    # L = -(1/4 ln(1/(1+√3)) + 3/4 ln(√3/(1+√3))) = ln(1+√3) - (3/8) ln 3 = 0.593073...
    s = torch.tensor([[0.0, math.log(3.0)]])
    t = torch.tensor([[0.0, 2 * math.log(3.0)]])
    want = math.log(1 + math.sqrt(3)) - 3 / 8 * math.log(3)
    assert float(prediction_loss(s, t, T=2.0)) == pytest.approx(want, rel=1e-6)
    assert float(prediction_loss(s, t, T=2.0)) == pytest.approx(0.5930729, rel=1e-6)
    # At T = 1 the same logits give p_t = [1/10, 9/10]: L = ln 4 - 0.9 ln 3 = 0.397543...
    assert float(prediction_loss(s, t)) == pytest.approx(math.log(4) - 0.9 * math.log(3),
                                                         rel=1e-6)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_prediction_equals_torch_soft_target_cross_entropy(temp: float) -> None:
    gen = torch.Generator().manual_seed(8)
    s, t = 2 * torch.randn(6, 10, generator=gen), 2 * torch.randn(6, 10, generator=gen)
    # F.cross_entropy takes class probabilities as the target (torch >= 1.10).
    want = F.cross_entropy(s.double() / temp, torch.softmax(t.double() / temp, dim=-1))
    assert float(prediction_loss(s, t, T=temp)) == pytest.approx(float(want), rel=1e-6)


# ---- invariants: identical inputs give the teacher's entropy (KL = 0), else more ----

def test_attention_identical_inputs_give_teacher_entropy() -> None:
    qkv_t = _qkv(2, 5, 12, seed=9)
    qkv_s = tuple(x.clone().requires_grad_() for x in qkv_t)
    entropy = loop_attention(qkv_t, qkv_t, 2, teacher_only=True)
    loss = attention_relation_loss(qkv_s, qkv_t, relation_heads=2)
    assert loss.item() == pytest.approx(entropy, rel=1e-5)
    loss.backward()  # at KL's minimum the gradient vanishes
    assert max(float(x.grad.abs().max()) for x in qkv_s) < 1e-5
    other = attention_relation_loss(_qkv(2, 5, 20, seed=10), qkv_t, relation_heads=2)
    assert float(other) > entropy + 1e-3


def test_hidden_identical_inputs_give_teacher_entropy() -> None:
    h_t = _hidden(2, 6, 8, seed=11)
    h_s = h_t.clone().requires_grad_()
    entropy = loop_hidden(h_t, h_t, teacher_only=True)
    loss = hidden_relation_loss(h_s, h_t)
    assert loss.item() == pytest.approx(entropy, rel=1e-5)
    loss.backward()
    assert float(h_s.grad.abs().max()) < 1e-5
    other = hidden_relation_loss(_hidden(2, 6, 16, seed=12), h_t)
    assert float(other) > entropy + 1e-3


def test_prediction_identical_inputs_give_teacher_entropy() -> None:
    gen = torch.Generator().manual_seed(13)
    t = 2 * torch.randn(5, 9, generator=gen)
    s = t.clone().requires_grad_()
    entropy = loop_prediction(t, t, 2.0, teacher_only=True)
    loss = prediction_loss(s, t, T=2.0)
    assert loss.item() == pytest.approx(entropy, rel=1e-5)
    loss.backward()
    assert float(s.grad.abs().max()) < 1e-6
    other = prediction_loss(2 * torch.randn(5, 9, generator=gen), t, T=2.0)
    assert float(other) > entropy + 1e-3


# ---- gradients reach the student only ----

def _attention_case() -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    qkv_s, qkv_t = _qkv(2, 4, 12, seed=14, grad=True), _qkv(2, 4, 20, seed=15, grad=True)
    return list(qkv_s), list(qkv_t), attention_relation_loss(qkv_s, qkv_t, relation_heads=4)


def _hidden_case() -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    h_s, h_t = _hidden(2, 4, 12, seed=16, grad=True), _hidden(2, 4, 20, seed=17, grad=True)
    return [h_s], [h_t], hidden_relation_loss(h_s, h_t)


def _prediction_case() -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    s, t = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    return [s], [t], prediction_loss(s, t, T=2.0)


@pytest.mark.parametrize("case", [_attention_case, _hidden_case, _prediction_case])
def test_gradient_reaches_the_student_only(
        case: Callable[[], tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]]) -> None:
    students, teachers, loss = case()
    assert loss.requires_grad
    loss.backward()
    for x in students:
        assert x.grad is not None and float(x.grad.abs().sum()) > 0
    for x in teachers:
        assert x.grad is None


# ---- bad inputs ----

def test_attention_mismatched_tokens_raise() -> None:
    with pytest.raises(ValueError, match=r"\(B, N\) must match, got student shape "
                                         r"\(2, 5, 12\) and teacher shape \(2, 6, 20\)"):
        attention_relation_loss(_qkv(2, 5, 12, seed=0), _qkv(2, 6, 20, seed=0))


def test_hidden_mismatched_batch_or_tokens_raise() -> None:
    with pytest.raises(ValueError, match=r"student shape \(2, 5, 8\) and teacher shape "
                                         r"\(2, 4, 8\)"):
        hidden_relation_loss(torch.randn(2, 5, 8), torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"student shape \(3, 5, 8\) and teacher shape "
                                         r"\(2, 5, 16\)"):
        hidden_relation_loss(torch.randn(3, 5, 8), torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"must be \(B, N, C\) tensors"):
        hidden_relation_loss(torch.randn(5, 8), torch.randn(5, 8))


@pytest.mark.parametrize(("c_s", "c_t", "heads", "message"), [
    (12, 20, 5, "student width C=12 is not divisible by relation_heads=5"),
    (12, 20, 3, "teacher width C=20 is not divisible by relation_heads=3"),
])
def test_width_not_divisible_by_relation_heads_raises(c_s: int, c_t: int, heads: int,
                                                      message: str) -> None:
    with pytest.raises(ValueError, match=message):
        attention_relation_loss(_qkv(2, 4, c_s, seed=0), _qkv(2, 4, c_t, seed=0), heads)


def test_relation_heads_must_be_positive() -> None:
    with pytest.raises(ValueError, match="relation_heads must be an integer >= 1, got 0"):
        attention_relation_loss(_qkv(2, 4, 12, seed=0), _qkv(2, 4, 20, seed=0), 0)


def test_qkv_must_be_a_3_tuple() -> None:
    q, k, v = _qkv(2, 4, 12, seed=0)
    with pytest.raises(ValueError, match=r"qkv_s must be a \(q, k, v\) tuple of 3 tensors, "
                                         r"got a tuple of length 2"):
        attention_relation_loss((q, k), (q, k, v))
    with pytest.raises(ValueError, match=r"qkv_t must be a \(q, k, v\) tuple of 3 tensors, "
                                         r"got a Tensor"):
        attention_relation_loss((q, k, v), torch.stack((q, k, v)))
    with pytest.raises(ValueError, match=r"qkv_s: q, k and v must share one \(B, N, C\) shape"):
        attention_relation_loss((q, k, v[:, :3]), (q, k, v))


def test_prediction_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match=r"student shape \(2, 5\) and teacher shape \(2, 6\)"):
        prediction_loss(torch.randn(2, 5), torch.randn(2, 6))
    with pytest.raises(ValueError, match="temperature T must be > 0, got 0"):
        prediction_loss(torch.randn(2, 5), torch.randn(2, 5), T=0)


# ---- low precision: float32 result, whatever the input dtype or autocast ----

def _all_losses(cast: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    qkv_s, qkv_t = _qkv(2, 6, 12, seed=18), _qkv(2, 6, 20, seed=19)
    h_s, h_t = _hidden(2, 6, 12, seed=20), _hidden(2, 6, 20, seed=21)
    gen = torch.Generator().manual_seed(22)
    s, t = torch.randn(4, 10, generator=gen), torch.randn(4, 10, generator=gen)
    return [
        attention_relation_loss(tuple(map(cast, qkv_s)), tuple(map(cast, qkv_t)), 2),
        hidden_relation_loss(cast(h_s), cast(h_t)),
        prediction_loss(cast(s), cast(t), T=2.0),
    ]


def test_bf16_inputs_give_float32_result() -> None:
    got = _all_losses(lambda x: x.bfloat16())
    # The same bf16-rounded values in float32: exact upcast, so only summation order differs.
    same_values = _all_losses(lambda x: x.bfloat16().float())
    full = _all_losses(lambda x: x)
    for g, sv, f in zip(got, same_values, full):
        assert g.dtype == torch.float32
        assert float(g) == pytest.approx(float(sv), rel=1e-6)
        assert float(g) == pytest.approx(float(f), rel=2e-2)  # bf16 keeps ~3 digits


def test_autocast_does_not_lower_precision() -> None:
    full = _all_losses(lambda x: x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under = _all_losses(lambda x: x)
    for u, f in zip(under, full):
        assert u.dtype == torch.float32
        assert float(u) == pytest.approx(float(f), rel=1e-6)
