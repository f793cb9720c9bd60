"""DINO loss, center update and teacher-temperature schedule against hand-written references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raylab.losses.dino import dino_loss, teacher_temperature_schedule, update_center


def reference_dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                        student_temp: float, teacher_temp: float, n_global: int) -> torch.Tensor:
    """The paper's pseudocode in loop form: H(t, s) = -sum(t * log s), averaged over pairs
    of teacher crop i and student crop j with i != j."""
    batch = teacher.shape[0] // n_global
    n_crops = student.shape[0] // batch
    total = torch.zeros((), dtype=torch.float64)
    pairs = 0
    for i in range(n_global):
        t = teacher[i * batch:(i + 1) * batch].detach()
        p_t = torch.softmax((t - center) / teacher_temp, dim=1)
        for j in range(n_crops):
            if i == j:
                continue
            s = student[j * batch:(j + 1) * batch]
            p_s = torch.softmax(s / student_temp, dim=1)
            per_image = [-(p_t[b] * torch.log(p_s[b])).sum() for b in range(batch)]
            total = total + torch.stack(per_image).mean()
            pairs += 1
    return total / pairs


@pytest.mark.parametrize(("n_global", "n_local"), [(2, 0), (2, 4), (1, 4)])
@pytest.mark.parametrize("temps", [(0.1, 0.04), (0.2, 0.07)])
def test_matches_loop_reference(n_local: int, n_global: int, temps: tuple[float, float]) -> None:
    batch, k = 3, 7
    n_crops = n_global + n_local
    gen = torch.Generator().manual_seed(10 * n_local + n_global)
    student = torch.randn(n_crops * batch, k, generator=gen, dtype=torch.float64)
    teacher = torch.randn(n_global * batch, k, generator=gen, dtype=torch.float64)
    center = 0.3 * torch.randn(1, k, generator=gen, dtype=torch.float64)

    s32 = student.float().requires_grad_()
    got = dino_loss(s32, teacher.float(), center.float(), *temps, n_global_crops=n_global)
    s64 = student.clone().requires_grad_()
    want = reference_dino_loss(s64, teacher, center, *temps, n_global)
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)

    got.backward()
    want.backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)


def test_gradient_reaches_the_student_only() -> None:
    student = torch.randn(6 * 3, 7, requires_grad=True)
    teacher = torch.randn(2 * 3, 7, requires_grad=True)
    center = torch.randn(7, requires_grad=True)
    dino_loss(student, teacher, center).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert center.grad is None


def test_zero_outputs_give_log_k() -> None:
    k = 65536
    loss = dino_loss(torch.zeros(10 * 2, k), torch.zeros(2 * 2, k), torch.zeros(1, k))
    assert float(loss) == pytest.approx(math.log(k), rel=1e-6)  # 11.0904


def test_centering_shifts_the_teacher() -> None:
    # A center equal to the teacher's (constant-per-class) offset removes it entirely.
    student = torch.randn(4 * 2, 5)
    offset = torch.tensor([3.0, -1.0, 0.0, 2.0, 5.0])
    teacher = torch.randn(2 * 2, 5)
    plain = dino_loss(student, teacher, torch.zeros(5), n_global_crops=2)
    shifted = dino_loss(student, teacher + offset, offset, n_global_crops=2)
    assert float(shifted) == pytest.approx(float(plain), rel=1e-6)


def test_bad_shapes_are_reported() -> None:
    with pytest.raises(ValueError, match="multiple of the batch size 2"):
        dino_loss(torch.zeros(7, 4), torch.zeros(4, 4), torch.zeros(4))
    with pytest.raises(ValueError, match="multiple of the number of global crops 2"):
        dino_loss(torch.zeros(8, 4), torch.zeros(5, 4), torch.zeros(4))
    with pytest.raises(ValueError, match="output dimension"):
        dino_loss(torch.zeros(8, 4), torch.zeros(4, 5), torch.zeros(4))
    with pytest.raises(ValueError, match="no \\(teacher, student\\) pair"):
        dino_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(4), n_global_crops=1)
    with pytest.raises(ValueError, match="global crops must come first"):
        dino_loss(torch.zeros(2, 4), torch.zeros(4, 4), torch.zeros(4), n_global_crops=2)
    with pytest.raises(ValueError, match="teacher_temp"):
        dino_loss(torch.zeros(8, 4), torch.zeros(4, 4), torch.zeros(4), teacher_temp=0.0)


def test_update_center_by_hand() -> None:
    teacher = torch.tensor([[1.0, 2.0, 3.0], [3.0, 6.0, 9.0]])  # mean [2, 4, 6]
    center = torch.zeros(1, 3)
    new = update_center(center, teacher, momentum=0.9)
    torch.testing.assert_close(new, torch.tensor([[0.2, 0.4, 0.6]]))  # 0.1 x mean
    assert new.shape == center.shape and torch.equal(center, torch.zeros(1, 3))

    new = update_center(torch.tensor([1.0, 1.0, 1.0]), teacher, momentum=0.5)
    torch.testing.assert_close(new, torch.tensor([1.5, 2.5, 3.5]))


def test_update_center_all_reduce_gives_the_global_mean() -> None:
    teacher = torch.tensor([[1.0, 2.0, 3.0], [3.0, 6.0, 9.0]])
    center = torch.zeros(3)

    # Two workers with the same rows: sums and row counts double, the mean stays.
    doubled = update_center(center, teacher, 0.9, all_reduce=lambda x: 2 * x)
    torch.testing.assert_close(doubled, torch.tensor([0.2, 0.4, 0.6]))

    # A second worker holding one row [5, 5, 5]: its sum and its count of 1 are added.
    other = torch.tensor([5.0, 5.0, 5.0, 1.0])
    calls = []

    def fake_all_reduce(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.clone())
        return x + other

    new = update_center(center, teacher, 0.9, all_reduce=fake_all_reduce)
    global_mean = torch.tensor([9.0 / 3, 13.0 / 3, 17.0 / 3])
    torch.testing.assert_close(new, 0.1 * global_mean)
    assert len(calls) == 1  # one collective per step: the K sums and the row count
    torch.testing.assert_close(calls[0], torch.tensor([4.0, 8.0, 12.0, 2.0]))


def test_update_center_keeps_dtype_and_checks_inputs() -> None:
    center = torch.zeros(4, dtype=torch.bfloat16)
    assert update_center(center, torch.ones(3, 4)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="momentum"):
        update_center(center, torch.ones(3, 4), momentum=1.5)
    with pytest.raises(ValueError, match="rows, 4"):
        update_center(center, torch.ones(3, 5))
    with pytest.raises(ValueError, match="no teacher rows"):
        update_center(center, torch.ones(0, 4))


def test_teacher_temperature_schedule() -> None:
    sched = teacher_temperature_schedule(0.04, 0.07, warmup_epochs=30, epochs=100)
    assert sched.shape == (100,) and sched.dtype == np.float64
    assert sched[0] == pytest.approx(0.04)
    assert sched[1] == pytest.approx(0.04 + 0.03 / 29)
    assert sched[29] == pytest.approx(0.07)
    np.testing.assert_allclose(sched[30:], 0.07)
    assert np.all(np.diff(sched[:30]) > 0)

    np.testing.assert_allclose(teacher_temperature_schedule(0.04, 0.07, 0, 5), [0.07] * 5)
    np.testing.assert_allclose(teacher_temperature_schedule(0.04, 0.06, 3, 3), [0.04, 0.05, 0.06])
    with pytest.raises(ValueError, match="warmup_epochs"):
        teacher_temperature_schedule(warmup_epochs=11, epochs=10)
    with pytest.raises(ValueError, match="temp"):
        teacher_temperature_schedule(warmup_temp=0.0)
