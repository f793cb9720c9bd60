"""DINO self-distillation loss, teacher centering and the teacher-temperature schedule.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021;
checked against the reference implementation (facebookresearch/dino ``main_dino.py``,
``DINOLoss``). Pure torch/numpy, no Ray import: the cross-worker sum of the center update is
a callable the caller passes in (``raylab.runtime.worker.all_reduce_sum``).

Layout: outputs are **crop-major**, as :class:`raylab.models.dino.MultiCropWrapper` returns
them: rows ``0..B-1`` are crop 0 of every image, rows ``B..2B-1`` crop 1, and so on. The
teacher sees the ``n_global_crops`` global crops, which are also the first crops the student
sees.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _check_temp(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _split_rows(rows: int, parts: int, name: str, what: str) -> int:
    if rows % parts:
        raise ValueError(f"{name} has {rows} rows, not a multiple of the {what} {parts}")
    return rows // parts


def dino_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    n_global_crops: int = 2,
) -> torch.Tensor:
    """Cross-entropy between sharpened, centred teacher and student distributions.

    Teacher targets ``P_t = softmax((t - center) / teacher_temp)`` (no gradient), student
    log-probabilities ``log P_s = log_softmax(s / student_temp)``. For every pair of teacher
    crop ``i`` and student crop ``j`` with ``i != j``, ``H_ij = -sum_K P_t[i] * log P_s[j]``
    averaged over the batch; the loss is the mean of ``H_ij`` over those pairs, i.e.
    ``n_global * n_crops - n_global`` pairs (the reference's ``n_loss_terms``).

    Computed without a loop over pairs: each student crop is scored against the sum of all
    teacher crops, and the same-index term is subtracted for the global crops. Everything
    runs in float32 (also under autocast), as elementwise products, so the result matches
    the pairwise loop to float32 rounding.

    Args:
        student_out: Student head outputs ``[n_crops * B, K]``, crop-major.
        teacher_out: Teacher head outputs ``[n_global_crops * B, K]``, crop-major.
        center: Running center ``[K]`` or ``[1, K]`` (see :func:`update_center`).
        student_temp: Student softmax temperature (0.1).
        teacher_temp: Teacher softmax temperature for this epoch
            (:func:`teacher_temperature_schedule`).
        n_global_crops: Number of global (teacher) crops, usually 2.

    Returns:
        The scalar loss (float32); ``ln K`` when all outputs and the center are zero.

    Raises:
        ValueError: Mismatched shapes, a row count that is not a whole number of crops,
            fewer student crops than global crops, no pair with different indices, or a
            temperature <= 0.
    """
    _check_temp("student_temp", student_temp)
    _check_temp("teacher_temp", teacher_temp)
    if n_global_crops < 1:
        raise ValueError(f"n_global_crops must be >= 1, got {n_global_crops!r}")
    if student_out.ndim != 2 or teacher_out.ndim != 2:
        raise ValueError(f"student and teacher outputs must be [rows, K], got shapes "
                         f"{tuple(student_out.shape)} and {tuple(teacher_out.shape)}")
    k = student_out.shape[1]
    if teacher_out.shape[1] != k or center.numel() != k:
        raise ValueError(f"output dimension differs: student K={k}, teacher "
                         f"K={teacher_out.shape[1]}, center has {center.numel()} values")
    batch = _split_rows(teacher_out.shape[0], n_global_crops, "teacher_out",
                        "number of global crops")
    if batch == 0:
        raise ValueError("teacher_out is empty")
    n_crops = _split_rows(student_out.shape[0], batch, "student_out", "batch size")
    if n_crops < n_global_crops:
        raise ValueError(f"the student saw {n_crops} crops but the teacher "
                         f"{n_global_crops}; the global crops must come first in both")
    n_pairs = n_global_crops * n_crops - n_global_crops
    if n_pairs == 0:
        raise ValueError("one global crop and no local crops leave no (teacher, student) "
                         "pair with different crops")

    log_p_s = F.log_softmax(student_out.float() / student_temp, dim=-1).view(n_crops, batch, k)
    with torch.no_grad():
        shifted = teacher_out.float() - center.float().reshape(1, k)
        p_t = F.softmax(shifted / teacher_temp, dim=-1).view(n_global_crops, batch, k)
    # sum_{i != j} H_ij = sum_j H(sum_i P_t[i], s_j) - sum_{i < n_global} H(P_t[i], s_i)
    all_pairs = -(p_t.sum(dim=0) * log_p_s).sum(dim=-1)  # [n_crops, B]
    same_crop = -(p_t * log_p_s[:n_global_crops]).sum(dim=-1)  # [n_global, B]
    total = all_pairs.sum(dim=0) - same_crop.sum(dim=0)  # [B]
    return total.mean() / n_pairs


@torch.no_grad()
def update_center(
    center: torch.Tensor,
    teacher_out: torch.Tensor,
    momentum: float = 0.9,
    all_reduce: AllReduce | None = None,
) -> torch.Tensor:
    """EMA of the teacher's batch mean: ``center * m + (1 - m) * mean(teacher_out)``.

    With ``all_reduce``, the mean is over the **global** batch: the row sums and the local
    row count travel in one tensor through ``all_reduce`` (a sum over workers), and the
    mean is ``global sum / global row count``. All-reducing the count (rather than
    multiplying by the world size, as the reference does) keeps the mean exact when
    workers hold different numbers of rows, e.g. in the last batch of an epoch, and needs
    no world size. Call it after the loss, with the same teacher outputs.

    Args:
        center: Current center ``[K]`` or ``[1, K]``; not modified.
        teacher_out: Teacher head outputs ``[rows, K]`` (any layout).
        momentum: Center momentum ``m`` in [0, 1] (0.9).
        all_reduce: Sums a tensor over workers and returns the result, e.g.
            ``raylab.runtime.worker.all_reduce_sum``; None for one worker.

    Returns:
        The new center, with the shape, dtype and device of ``center``.

    Raises:
        ValueError: ``momentum`` outside [0, 1], shapes that disagree, or no rows (without
            ``all_reduce``; with it, a global count of 0 gives NaN, as it cannot be checked
            without a host sync).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"center momentum must be in [0, 1], got {momentum!r}")
    if teacher_out.ndim != 2 or teacher_out.shape[1] != center.numel():
        raise ValueError(f"teacher_out must be [rows, {center.numel()}] for a center of "
                         f"{center.numel()} values, got shape {tuple(teacher_out.shape)}")
    if all_reduce is None and teacher_out.shape[0] == 0:
        raise ValueError("update_center got no teacher rows")
    rows = teacher_out.new_full((1,), float(teacher_out.shape[0]), dtype=torch.float32)
    packed = torch.cat((teacher_out.float().sum(dim=0), rows))
    if all_reduce is not None:
        packed = all_reduce(packed)
    # No .item(): dividing on the device keeps the step free of a host sync.
    batch_mean = (packed[:-1] / packed[-1]).reshape(center.shape)
    new = center.float() * momentum + batch_mean * (1.0 - momentum)
    return new.to(center.dtype)


def teacher_temperature_schedule(
    warmup_temp: float = 0.04,
    temp: float = 0.07,
    warmup_epochs: int = 30,
    epochs: int = 100,
) -> np.ndarray:
    """Teacher temperature per epoch: linear warm-up, then constant.

    Values ``0..W-1`` are ``np.linspace(warmup_temp, temp, W)`` (so epoch ``W - 1`` already
    has ``temp``), and every later epoch has ``temp``, as in the reference.

    Args:
        warmup_temp: Temperature of epoch 0 (0.04).
        temp: Temperature after the warm-up (0.07; the reference advises at most 0.07).
        warmup_epochs: Warm-up length ``W`` in epochs, 0 to ``epochs``.
        epochs: Training epochs (>= 1).

    Returns:
        float64 array of length ``epochs``.

    Raises:
        ValueError: A temperature <= 0, or epoch counts out of range.
    """
    _check_temp("warmup_temp", warmup_temp)
    _check_temp("temp", temp)
    if int(epochs) != epochs or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if int(warmup_epochs) != warmup_epochs or not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be an integer in [0, epochs={epochs}], got "
                         f"{warmup_epochs!r}")
    warmup = np.linspace(warmup_temp, temp, int(warmup_epochs))
    rest = np.full(int(epochs) - int(warmup_epochs), float(temp))
    return np.concatenate((warmup, rest)).astype(np.float64)
