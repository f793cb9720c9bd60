"""ClassificationStep: accumulation equals one big batch, lr per optimizer step, EMA per
step, the uint8 prepare hook, and evaluate_counts' top-k arithmetic."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from raylab.optim import ModelEma
from raylab.tasks.classification.step import ClassificationStep, evaluate_counts


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))


def _step(model: nn.Module, accum: int, lr: np.ndarray, **kw) -> ClassificationStep:
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    return ClassificationStep(model, opt, criterion=nn.CrossEntropyLoss(),
                              device=torch.device("cpu"), lr_schedule=lr, grad_accum=accum,
                              **kw)


def test_two_accumulated_halves_equal_one_full_batch() -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 4, 4, generator=g), torch.randint(0, 5, (8,), generator=g)
    full, accum = _model(), _model()
    s_full, s_acc = _step(full, 1, np.array([0.5])), _step(accum, 2, np.array([0.5]))
    assert s_full(x, y)[1] is True
    assert s_acc(x[:4], y[:4])[1] is False and s_acc.pending()
    assert s_acc(x[4:], y[4:])[1] is True and not s_acc.pending()
    for a, b in zip(full.parameters(), accum.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert s_full.step == s_acc.step == 1


def test_lr_follows_the_schedule_per_optimizer_step_and_clamps() -> None:
    model = _model()
    step = _step(model, 1, np.array([0.1, 0.2, 0.3]))
    x, y = torch.randn(2, 3, 4, 4), torch.tensor([0, 1])
    seen = []
    for _ in range(4):
        step(x, y)
        seen.append(step.optimizer.param_groups[0]["lr"])
    assert seen == [0.1, 0.2, 0.3, 0.3]


def test_ema_updates_once_per_optimizer_step() -> None:
    model = _model()
    ema = ModelEma(model, decay=0.5)
    step = _step(model, 2, np.array([1.0]), ema=ema)
    x, y = torch.randn(2, 3, 4, 4), torch.tensor([0, 1])
    before = [p.detach().clone() for p in ema.module.parameters()]
    step(x, y)  # first micro-batch: no optimizer step, no EMA update
    assert all(torch.equal(a, b) for a, b in zip(before, ema.module.parameters()))
    step(x, y)
    for old, new, w in zip(before, ema.module.parameters(), model.parameters()):
        assert torch.allclose(new, 0.5 * old + 0.5 * w.detach(), atol=1e-6)


def test_prepare_hook_sees_device_batch_and_channels_last() -> None:
    seen = {}

    def prepare(x: torch.Tensor) -> torch.Tensor:
        seen["dtype"] = x.dtype
        return x.float() / 255

    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(32, 5))
    step = _step(model, 1, np.array([0.1]), prepare=prepare, channels_last=True)
    loss, stepped = step(torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8),
                         torch.tensor([0, 1]))
    assert seen["dtype"] == torch.uint8 and stepped and torch.isfinite(loss)


def test_evaluate_counts_top1_top5() -> None:
    class Fixed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :6]  # logits are the first six pixel values

    logits = torch.tensor([[6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6], [6, 1, 2, 3, 4, 5]],
                          dtype=torch.float32)
    x = torch.zeros(3, 1, 2, 3)
    x.view(3, -1)[:] = logits
    labels = torch.tensor([0, 0, 1])  # top-1: hit, miss (rank 6), miss (rank 6)
    totals = evaluate_counts(Fixed(), [{"image": x, "label": labels}], torch.device("cpu"),
                             "fp32")
    loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
    assert totals.tolist()[1:] == [1.0, 1.0, 3.0]  # top-5 misses both rank-6 labels
    assert abs(totals[0].item() - loss.item()) < 1e-5
