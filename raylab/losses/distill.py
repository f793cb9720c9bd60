"""MiniViT's weight-distillation losses: prediction logits, attention and hidden relations.

Zhang et al., "MiniViT: Compressing Vision Transformers with Weight Multiplexing", CVPR 2022,
Sec. 3.3. The student is trained with

    L = L_pred + beta * L_attn + gamma * L_hddn        (beta = 1, gamma = 0.1 in the paper)

where the three terms are :func:`prediction_loss` (eq. 9), :func:`attention_relation_loss`
(eq. 10) and :func:`hidden_relation_loss` (eq. 11). The weighted sum is left to the caller.

The relation losses compare ``N x N`` token-relation matrices, so student and teacher may
have different widths; only the batch size ``B`` and token count ``N`` must agree. Each loss
is a cross-entropy ``-sum P_t log P_s`` (the paper's KL divergence plus the teacher's entropy,
which is constant for the student: same gradient). Everything runs in float32 with autocast
switched off, whatever the input dtype, and the teacher side carries no gradient. Pure torch,
no Ray import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

QKV = Sequence[torch.Tensor]


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    # Under autocast a matmul would run in bf16/fp16 even on float32 inputs.
    return torch.autocast(device_type=x.device.type, enabled=False)


def _check_tokens(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    """Both sides ``(B, N, width)`` with the same ``B`` and ``N`` (widths may differ)."""
    if student.ndim != 3 or teacher.ndim != 3:
        raise ValueError(f"{what} must be (B, N, C) tensors, got student shape "
                         f"{tuple(student.shape)} and teacher shape {tuple(teacher.shape)}")
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"{what}: batch size and token count (B, N) must match, got student "
                         f"shape {tuple(student.shape)} and teacher shape "
                         f"{tuple(teacher.shape)}")
    if student.shape[0] == 0 or student.shape[1] == 0:
        raise ValueError(f"{what} are empty: shape {tuple(student.shape)}")


def _check_qkv(qkv: QKV, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # A stacked tensor would unpack along dim 0 too; demand an explicit (q, k, v) sequence.
    if (not isinstance(qkv, (tuple, list)) or len(qkv) != 3
            or not all(isinstance(x, torch.Tensor) for x in qkv)):
        got = (f"a {type(qkv).__name__} of length {len(qkv)}"
               if isinstance(qkv, (tuple, list)) else f"a {type(qkv).__name__}")
        raise ValueError(f"qkv_{side} must be a (q, k, v) tuple of 3 tensors, got {got}")
    q, k, v = qkv
    if not q.shape == k.shape == v.shape:
        raise ValueError(f"qkv_{side}: q, k and v must share one (B, N, C) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
    return q, k, v


def _head_width(width: int, heads: int, side: str) -> int:
    if width % heads:
        raise ValueError(f"{side} width C={width} is not divisible by "
                         f"relation_heads={heads}")
    return width // heads


def relation_log_probs(a: torch.Tensor, b: torch.Tensor, heads: int = 1) -> torch.Tensor:
    """Log of the relation ``R = softmax(A B^T / sqrt(d))`` per head, in float32.

    ``a`` and ``b`` are ``(B, N, C)`` with heads merged; ``C`` is split into ``heads``
    heads of width ``d = C / heads`` and the softmax runs over the last (key) axis.

    Returns:
        ``(B, heads, N, N)`` float32 log-probabilities (``log_softmax``, numerically stable).

    Raises:
        ValueError: Shapes of ``a`` and ``b`` differ, or ``C`` is not divisible by ``heads``.
    """
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"relation inputs must share one (B, N, C) shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if int(heads) != heads or heads < 1:
        raise ValueError(f"relation_heads must be an integer >= 1, got {heads!r}")
    batch, tokens, width = a.shape
    d = _head_width(width, heads, "input")
    with _no_autocast(a):
        a_h = a.float().reshape(batch, tokens, heads, d).transpose(1, 2)  # (B, h, N, d)
        b_h = b.float().reshape(batch, tokens, heads, d).transpose(1, 2)
        scores = a_h @ b_h.transpose(-1, -2) / math.sqrt(d)  # (B, h, N, N)
        return F.log_softmax(scores, dim=-1)


def _row_cross_entropy(log_p_s: torch.Tensor, log_p_t: torch.Tensor) -> torch.Tensor:
    """``-sum_m P_t log P_s`` per row, averaged over every leading axis and row."""
    return -(log_p_t.exp() * log_p_s).sum(dim=-1).mean()


def prediction_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    T: float = 1.0,
) -> torch.Tensor:
    """Soft-label cross-entropy of the student's predictions on the teacher's (eq. 9).

    ``L_pred = mean_b  -sum_c softmax(t_b / T)_c * log_softmax(s_b / T)_c``. No ``T^2``
    rescaling is applied; the teacher side is detached.

    Args:
        student_logits: Student logits ``(B, K)`` (any float dtype).
        teacher_logits: Teacher logits, same shape.
        T: Softmax temperature (> 0), applied to both sides.

    Returns:
        The scalar float32 loss.

    Raises:
        ValueError: Shapes differ or are not ``(B, K)``, or ``T <= 0``.
    """
    if not T > 0:
        raise ValueError(f"temperature T must be > 0, got {T!r}")
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logits must be (B, K) with one shape, got student shape "
                         f"{tuple(student_logits.shape)} and teacher shape "
                         f"{tuple(teacher_logits.shape)}")
    with _no_autocast(student_logits):
        log_p_s = F.log_softmax(student_logits.float() / T, dim=-1)
        log_p_t = F.log_softmax(teacher_logits.detach().float() / T, dim=-1)
        return _row_cross_entropy(log_p_s, log_p_t)


def attention_relation_loss(qkv_s: QKV, qkv_t: QKV, relation_heads: int = 1) -> torch.Tensor:
    """Self-attention relation distillation over all nine q/k/v pairs (eq. 10).

    For each side and each ordered pair ``(i, j)`` in ``{q, k, v}^2``, the relation per
    head is ``R_ij = softmax(A_i A_j^T / sqrt(d))`` with ``d = C / relation_heads`` (each
    side its own ``C``), shape ``(B, relation_heads, N, N)``. The loss is

        L_attn = 1/9 sum_{i,j} mean_{b, h, n}  -sum_m R^t_ij[b, h, n, m] log R^s_ij[b, h, n, m]

    Args:
        qkv_s: Student ``(q, k, v)``, each ``(B, N, C_s)`` with the heads merged.
        qkv_t: Teacher ``(q, k, v)``, each ``(B, N, C_t)``; detached.
        relation_heads: Number of relation heads both widths are split into.

    Returns:
        The scalar float32 loss.

    Raises:
        ValueError: A side is not a 3-tuple of equal-shape tensors, ``B`` or ``N`` differ
            between student and teacher, or a width is not divisible by ``relation_heads``.
    """
    q_s, k_s, v_s = _check_qkv(qkv_s, "s")
    q_t, k_t, v_t = _check_qkv(qkv_t, "t")
    _check_tokens(q_s, q_t, "attention q/k/v")
    if int(relation_heads) != relation_heads or relation_heads < 1:
        raise ValueError(f"relation_heads must be an integer >= 1, got {relation_heads!r}")
    # Check both widths up front so the message names the side.
    _head_width(q_s.shape[-1], relation_heads, "student")
    _head_width(q_t.shape[-1], relation_heads, "teacher")
    student, teacher = (q_s, k_s, v_s), (q_t.detach(), k_t.detach(), v_t.detach())
    total = q_s.new_zeros((), dtype=torch.float32)
    for i in range(3):
        for j in range(3):
            log_r_s = relation_log_probs(student[i], student[j], relation_heads)
            with torch.no_grad():
                log_r_t = relation_log_probs(teacher[i], teacher[j], relation_heads)
            total = total + _row_cross_entropy(log_r_s, log_r_t)
    return total / 9


def hidden_relation_loss(h_s: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
    """Hidden-state relation distillation (eq. 11).

    ``R = softmax(H H^T / sqrt(d))`` for each side with its own width ``d``, shape
    ``(B, N, N)``; the loss is ``mean_{b, n}  -sum_m R^t[b, n, m] log R^s[b, n, m]``.

    Args:
        h_s: Student hidden states ``(B, N, d_s)``.
        h_t: Teacher hidden states ``(B, N, d_t)``; detached.

    Returns:
        The scalar float32 loss.

    Raises:
        ValueError: ``B`` or ``N`` differ between student and teacher, or a tensor is not 3-D.
    """
    _check_tokens(h_s, h_t, "hidden states")
    log_r_s = relation_log_probs(h_s, h_s)
    with torch.no_grad():
        log_r_t = relation_log_probs(h_t.detach(), h_t.detach())
    return _row_cross_entropy(log_r_s, log_r_t)
