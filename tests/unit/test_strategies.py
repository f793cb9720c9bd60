"""Continual-learning strategies and the shared loop against hand-worked formulas."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raylab.continual.loop import count_correct, evaluate, train_bucket
from raylab.continual.strategies import (
    AGEM,
    EWC,
    SI,
    STRATEGIES,
    Bucket,
    CWRStar,
    GDumb,
    LwF,
    build_strategy,
    distillation_loss,
    fisher_diagonal,
    project_gradient,
    strategy_defaults,
)
from raylab.continual.strategies.finetune import ER
from raylab.errors import ConfigError


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models: thread start-up costs more than the work (10x on small CPUs).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CENTERS = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, -2.0]])


def make_bucket(seed: int, n: int = 48, batch: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three Gaussian blobs, shifted a little per bucket (a drifting domain)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = CENTERS[y] + 0.3 * seed + 0.6 * torch.randn(n, 2, generator=gen)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def labels_of(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([y for _, y in batches])


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))


def mean_loss(model: nn.Module, batches: list) -> float:
    model.eval()
    with torch.no_grad():
        return float(np.mean([F.cross_entropy(model(x), y).item() for x, y in batches]))


def make_replay(batches: list) -> Any:
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def replay(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:n], y[:n]

    return replay


def round_trip(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as a checkpoint would."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_same(u, v)
    else:
        assert a == b


# --- every strategy on the shared loop -------------------------------------------------


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_trains_two_buckets_and_round_trips(name: str) -> None:
    b0, b1 = make_bucket(0), make_bucket(1)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    strategy = build_strategy(name)
    before = mean_loss(model, b0)
    out = train_bucket(model, strategy, b0, opt, "cpu", epochs=6,
                       bucket=Bucket.from_labels(0, labels_of(b0)), replay=make_replay(b0))
    assert mean_loss(model, b0) < 0.7 * before
    assert out["steps"] == 24 and out["samples"] == 6 * 48 and len(out["epoch_losses"]) == 6
    assert out["replay_samples"] == 0 or name in ("er", "agem")
    assert strategy.buckets_seen == 1

    out = train_bucket(model, strategy, b1, opt, "cpu", epochs=2,
                       bucket=Bucket.from_labels(1, labels_of(b1)), replay=make_replay(b0))
    assert math.isfinite(out["loss"]) and strategy.buckets_seen == 2
    assert evaluate(model, b1, "cpu") > 0.5

    state = strategy.state_dict()
    twin = build_strategy(name)
    twin.load_state_dict(round_trip(state))
    assert_same(twin.state_dict(), state)
    x, y = b1[0]
    model.train()
    torch.testing.assert_close(twin.loss(model, x, y), strategy.loss(model, x, y))


def test_registry_and_build_errors() -> None:
    assert set(STRATEGIES) == {"finetune", "er", "ewc", "si", "lwf", "agem", "gdumb", "cwr"}
    assert strategy_defaults("ewc") == {"ewc_lambda": 2e-3, "mode": "separate", "decay": 1.0}
    assert build_strategy("lwf", alpha=0.5, temperature=2.0).alpha == [0.5]
    with pytest.raises(ConfigError, match="unknown continual-learning strategy 'icarl'"):
        build_strategy("icarl")
    with pytest.raises(ConfigError, match=r"does not take \['lambda_'\].*ewc_lambda"):
        build_strategy("ewc", lambda_=1.0)
    for name, kwargs in [("ewc", {"ewc_lambda": -1}), ("ewc", {"mode": "offline"}),
                         ("ewc", {"decay": 2.0}), ("si", {"xi": 0.0}),
                         ("lwf", {"temperature": 0}), ("lwf", {"alpha": [0.5, -1]}),
                         ("agem", {"sample_size": 0}), ("er", {"replay_ratio": -0.5}),
                         ("cwr", {"layer": 3})]:
        with pytest.raises(ConfigError):
            build_strategy(name, **kwargs)
    with pytest.raises(ValueError, match="cannot load a 'ewc' strategy state into 'si'"):
        SI().load_state_dict(EWC().state_dict())


def test_flags_tell_the_caller_what_to_do() -> None:
    for name, cls in STRATEGIES.items():
        assert cls.from_scratch == cls.trains_on_buffer == (name == "gdumb")
    assert build_strategy("gdumb").buffer_kind == "class_balanced"
    assert build_strategy("er").buffer_kind == "experience_balanced"
    assert build_strategy("agem").buffer_kind == "reservoir"
    assert build_strategy("finetune").buffer_kind is None
    assert build_strategy("finetune", replay_ratio=1.0).buffer_kind == "reservoir"
    assert build_strategy("ewc").buffer_kind is None


# --- the loop --------------------------------------------------------------------------


class Recorder(nn.Module):
    """A linear model that records the batch sizes it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3)
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return self.fc(x)


def test_er_mixes_replay_rows_into_the_batch() -> None:
    model = Recorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    asked: list[int] = []

    def replay(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        asked.append(n)
        return torch.ones(n, 2), torch.zeros(n, dtype=torch.long)

    batches = make_bucket(0, n=24, batch=8)
    out = train_bucket(model, ER(replay_ratio=0.5), batches, opt, "cpu", replay=replay)
    assert asked == [4, 4, 4] and model.sizes == [12, 12, 12]
    assert out["samples"] == 24 and out["replay_samples"] == 12

    model.sizes.clear()
    train_bucket(model, ER(), batches, opt, "cpu", replay=lambda n: None)  # empty buffer
    assert model.sizes == [8, 8, 8]

    x, y = batches[0]
    xr, yr = torch.randn(8, 2), torch.randint(0, 3, (8,))
    want = F.cross_entropy(model.fc(torch.cat((x, xr))), torch.cat((y, yr)))
    torch.testing.assert_close(ER().loss(model, x, y, (xr, yr)), want)


def test_loop_accepts_mappings_factories_and_bf16() -> None:
    b0 = make_bucket(0)
    rows = [{"image": x.numpy(), "label": y.numpy()} for x, y in b0]
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    calls = []

    def factory() -> list:
        calls.append(1)
        return rows

    out = train_bucket(model, build_strategy("ewc"), factory, opt, "cpu", epochs=2,
                       precision="bf16")
    assert len(calls) == 3  # two epochs and EWC's Fisher pass
    assert math.isfinite(out["loss"])


def test_loop_checks_its_inputs() -> None:
    model, strategy = make_model(), build_strategy("finetune")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    b0 = make_bucket(0)
    with pytest.raises(ValueError, match="one-shot iterator"):
        train_bucket(model, strategy, iter(b0), opt, "cpu")
    with pytest.raises(ValueError, match="epochs"):
        train_bucket(model, strategy, b0, opt, "cpu", epochs=0)
    with pytest.raises(ValueError, match="precision"):
        train_bucket(model, strategy, b0, opt, "cpu", precision="fp8")
    with pytest.raises(ValueError, match="yielded no batches"):
        train_bucket(model, strategy, [], opt, "cpu")
    with pytest.raises(ValueError, match="'image' and 'label'"):
        train_bucket(model, strategy, [{"x": 1}], opt, "cpu")
    with pytest.raises(ValueError, match="no rows"):
        evaluate(model, [], "cpu")


def test_evaluate_counts_correct_predictions() -> None:
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))  # predicts the larger coordinate
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [5.0, 0.0]])
    y = torch.tensor([0, 1, 1, 1, 1])  # rows 0, 1, 3 are right
    assert count_correct(model, [(x[:2], y[:2]), (x[2:], y[2:])], "cpu") == (3, 5)
    assert evaluate(model, [(x, y)], "cpu") == pytest.approx(0.6)


# --- EWC -------------------------------------------------------------------------------


def two_param_model(w: float, b: float) -> nn.Linear:
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(w)
        model.bias.fill_(b)
    return model


def test_ewc_penalty_by_hand() -> None:
    model = two_param_model(1.5, 1.0)
    assert EWC().mode == "separate"  # the CLEAR authors' (avalanche's default)
    ewc = EWC(ewc_lambda=0.4, mode="online")
    term = {"fisher": {"weight": torch.tensor([[2.0]]), "bias": torch.tensor([3.0])},
            "anchor": {"weight": torch.tensor([[0.5]]), "bias": torch.tensor([-1.0])}}
    ewc.load_state_dict({"strategy": "ewc", "buckets_seen": 1, "mode": "online",
                         "terms": [term]})
    # lambda/2 * (F_w (w - w*)^2 + F_b (b - b*)^2) = 0.2 * (2 * 1^2 + 3 * 2^2) = 2.8
    assert float(ewc.penalty(model).detach()) == pytest.approx(2.8)
    x, y = torch.randn(4, 1), torch.zeros(4, dtype=torch.long)
    wide = nn.Sequential(model, nn.Linear(1, 2))
    ewc2 = EWC(ewc_lambda=0.4, mode="online")
    ewc2.load_state_dict({"strategy": "ewc", "buckets_seen": 1, "mode": "online", "terms": [
        {k: {"0." + n: t for n, t in v.items()} for k, v in term.items()}]})
    want = F.cross_entropy(wide(x), y) + 2.8  # the new layer "1.*" is not penalised
    torch.testing.assert_close(ewc2.loss(wide, x, y), want)

    separate = EWC(ewc_lambda=0.4, mode="separate")
    second = {"fisher": {"weight": torch.tensor([[1.0]]), "bias": torch.tensor([0.0])},
              "anchor": {"weight": torch.tensor([[2.5]]), "bias": torch.tensor([0.0])}}
    separate.load_state_dict({"strategy": "ewc", "buckets_seen": 2, "mode": "separate",
                              "terms": [term, second]})
    # second term: 0.2 * (1 * (1.5 - 2.5)^2 + 0) = 0.2
    assert float(separate.penalty(model).detach()) == pytest.approx(3.0)


def test_fisher_is_the_mean_squared_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 3)
    x = torch.randn(5, 2)
    y = torch.tensor([0, 2, 1, 1, 0])
    # Closed form per sample: dCE/dz = softmax(z) - onehot(y); dW = that (x) x, db = that.
    with torch.no_grad():
        err = torch.softmax(model(x), dim=1) - F.one_hot(y, 3).float()
    want_w = torch.stack([torch.outer(err[i], x[i]) ** 2 for i in range(5)]).mean(0)
    want_b = (err ** 2).mean(0)
    got = fisher_diagonal(model, [(x[i:i + 1], y[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(got["weight"], want_w)
    torch.testing.assert_close(got["bias"], want_b)
    assert model.weight.grad is None and model.training

    # Batches of several rows: the square of each batch-mean gradient, averaged over batches.
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]
    manual = torch.zeros(3)
    for xb, yb in batches:
        model.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        manual += model.bias.grad ** 2 / 2
    torch.testing.assert_close(fisher_diagonal(model, batches)["bias"], manual)
    # Two workers with the same data: sums and batch counts double, the mean stays.
    doubled = fisher_diagonal(model, batches, all_reduce=lambda t: 2 * t)
    torch.testing.assert_close(doubled["bias"], manual)


def test_ewc_online_accumulates_and_separate_keeps_terms() -> None:
    b0, b1 = make_bucket(0), make_bucket(1)
    model = make_model()
    f0 = fisher_diagonal(model, b0)
    online, separate = EWC(mode="online", decay=0.5), EWC(mode="separate")
    for s in (online, separate):
        s.after_bucket(model, lambda: b0)
    with torch.no_grad():
        model[0].weight.add_(0.1)
    f1 = fisher_diagonal(model, b1)
    for s in (online, separate):
        s.after_bucket(model, lambda: b1)
    assert len(online.terms) == 1 and len(separate.terms) == 2
    torch.testing.assert_close(online.terms[0]["fisher"]["0.weight"],
                               f1["0.weight"] + 0.5 * f0["0.weight"])
    torch.testing.assert_close(online.terms[0]["anchor"]["0.weight"], model[0].weight.detach())
    torch.testing.assert_close(separate.terms[0]["fisher"]["2.bias"], f0["2.bias"])


# --- AGEM ------------------------------------------------------------------------------


def test_agem_projection_formula() -> None:
    g = torch.tensor([1.0, 2.0, -1.0])
    ref = torch.tensor([-1.0, 0.0, 1.0])  # g.ref = -2, ref.ref = 2
    out = project_gradient(g, ref)
    torch.testing.assert_close(out, g - (-2.0 / 2.0) * ref)  # [0, 2, 0]
    torch.testing.assert_close(out, torch.tensor([0.0, 2.0, 0.0]))
    assert float(torch.dot(out, ref)) == pytest.approx(0.0)
    same = torch.tensor([1.0, 0.0, 0.0])
    assert project_gradient(same, torch.tensor([1.0, 1.0, 0.0])) is same  # dot > 0
    assert project_gradient(same, torch.zeros(3)) is same


def test_agem_projects_the_model_gradient() -> None:
    model = make_model()
    agem = AGEM(sample_size=4)
    x, y = make_bucket(0)[0]
    xr, yr = x[:4], (y[:4] + 1) % 3  # memory that disagrees with the batch
    loss = agem.loss(model, x, y, (xr, yr))
    g_ref = agem._g_ref.clone()
    loss.backward()
    raw = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert float(torch.dot(raw, g_ref)) < 0
    agem.after_backward(model)
    new = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(new, project_gradient(raw, g_ref))
    assert abs(float(torch.dot(new, g_ref))) < 1e-5 * float(raw.norm() * g_ref.norm())
    assert agem.projected_steps == 1 and agem.replay_size(100) == 4

    model.zero_grad()
    agem.loss(model, x, y).backward()  # no memory yet: nothing to project
    before = [p.grad.clone() for p in model.parameters()]
    agem.after_backward(model)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))


# --- LwF -------------------------------------------------------------------------------


def test_lwf_loss_is_the_hand_formula() -> None:
    model = make_model()
    lwf = LwF(alpha=[0.0, 0.7, 1.3], temperature=2.0)
    x, y = make_bucket(0)[0]
    lwf.before_bucket(model, Bucket(0))
    torch.testing.assert_close(lwf.loss(model, x, y), F.cross_entropy(model(x), y))
    lwf.after_bucket(model, lambda: [])
    old = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    lwf.before_bucket(model, Bucket(1))

    z, z_old = model(x), old(x)
    t = 2.0
    kl = 0.0
    for b in range(x.shape[0]):  # sum_c q_c (log q_c - log p_c), then the batch mean
        q = torch.exp(z_old[b] / t) / torch.exp(z_old[b] / t).sum()
        p = torch.exp(z[b] / t) / torch.exp(z[b] / t).sum()
        kl = kl + (q * (q.log() - p.log())).sum()
    want = F.cross_entropy(z, y) + 0.7 * kl / x.shape[0]
    torch.testing.assert_close(lwf.loss(model, x, y), want)
    torch.testing.assert_close(distillation_loss(z, z_old, t), kl / x.shape[0])
    assert float(distillation_loss(z, z, t).detach()) == pytest.approx(0.0, abs=1e-6)
    assert lwf.alpha_at(1) == 0.7 and lwf.alpha_at(9) == 1.3  # the last value is reused
    # The old model is frozen: no gradient reaches it.
    lwf.loss(model, x, y).backward()
    assert all(p.grad is None for p in lwf.old_model(model).parameters())


# --- SI --------------------------------------------------------------------------------


class Quadratic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0]))


def test_si_importance_on_a_quadratic() -> None:
    a, lr, steps, xi, c = np.array([1.0, 3.0]), 0.1, 5, 0.01, 0.5
    model = Quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    si = SI(c=c, xi=xi)
    si.before_bucket(model, Bucket(0))
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * torch.tensor(a, dtype=torch.float32) * model.w ** 2).sum().backward()
        si.after_backward(model)
        opt.step()
    si.after_bucket(model, lambda: [])

    # Reference: L = sum a w^2 / 2, g = a w, w <- w - lr g; omega = -sum g * dw.
    w = np.array([1.0, -2.0])
    start, omega = w.copy(), np.zeros(2)
    for _ in range(steps):
        g = a * w
        new = w - lr * g
        omega += -g * (new - w)  # = lr * g^2
        w = new
    importance = omega / ((w - start) ** 2 + xi)
    np.testing.assert_allclose(si.importance["w"].numpy(), importance, rtol=1e-5)
    np.testing.assert_allclose(si.anchor["w"].numpy(), w, rtol=1e-6)

    with torch.no_grad():
        model.w.copy_(torch.tensor([0.5, 0.5]))
    want = c * (importance * (np.array([0.5, 0.5]) - w) ** 2).sum()
    assert float(si.penalty(model).detach()) == pytest.approx(want, rel=1e-5)

    # A second bucket adds its own importance to the first.
    si.before_bucket(model, Bucket(1))
    opt.zero_grad()
    (model.w ** 2).sum().backward()  # g = 2 w = [1, 1]
    si.after_backward(model)
    opt.step()  # w -> [0.4, 0.4]
    si.after_bucket(model, lambda: [])
    extra = (lr * 1.0) / (0.1 ** 2 + xi)  # omega = lr g^2, delta = -0.1
    np.testing.assert_allclose(si.importance["w"].numpy(), importance + extra, rtol=1e-5)


# --- CWR* ------------------------------------------------------------------------------


def test_cwr_consolidation_arithmetic() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 3, bias=False))
    head = model[2]
    cwr = CWRStar()
    cwr.before_bucket(model, Bucket(0, {0: 2, 1: 3}))
    assert torch.equal(head.weight, torch.zeros(3, 2))
    trained = torch.tensor([[1.0, 3.0], [2.0, 6.0], [7.0, 7.0]])
    with torch.no_grad():
        head.weight.copy_(trained)  # as if training had moved the temporary weights
    cwr.after_bucket(model, lambda: [])
    avg = (1 + 3 + 2 + 6) / 4  # over the rows of the bucket's classes 0 and 1
    cw0, cw1 = trained[0] - avg, trained[1] - avg
    torch.testing.assert_close(cwr.consolidated[0], cw0)
    torch.testing.assert_close(cwr.consolidated[1], cw1)
    assert cwr.past_counts == {0: 2, 1: 3}
    torch.testing.assert_close(head.weight[:2], torch.stack((cw0, cw1)))
    torch.testing.assert_close(head.weight[2], trained[2])  # never consolidated

    cwr.before_bucket(model, Bucket(1, {1: 1, 2: 4}))
    torch.testing.assert_close(head.weight, torch.stack((torch.zeros(2), cw1, torch.zeros(2))))
    assert not model[0].weight.requires_grad and head.weight.requires_grad  # backbone frozen
    trained2 = torch.tensor([[9.0, 9.0], [4.0, 0.0], [2.0, 2.0]])
    with torch.no_grad():
        head.weight.copy_(trained2)
    cwr.after_bucket(model, lambda: [])
    avg2 = (4 + 0 + 2 + 2) / 4
    w_past = math.sqrt(3 / 1)
    want1 = (cw1 * w_past + (trained2[1] - avg2)) / (w_past + 1)
    torch.testing.assert_close(cwr.consolidated[1], want1)
    torch.testing.assert_close(cwr.consolidated[2], trained2[2] - avg2)
    assert cwr.past_counts == {0: 2, 1: 4, 2: 4}
    torch.testing.assert_close(head.weight, torch.stack((cw0, want1, trained2[2] - avg2)))


def test_cwr_needs_class_counts_and_freezes_the_backbone_in_eval_mode() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    cwr = CWRStar()
    with pytest.raises(ValueError, match="class counts"):
        cwr.before_bucket(model, Bucket(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    b0 = make_bucket(0)
    train_bucket(model, cwr, b0, opt, "cpu", bucket=Bucket.from_labels(0, labels_of(b0)))
    first = model[0].weight.detach().clone()
    train_bucket(model, cwr, b0, opt, "cpu", bucket=Bucket.from_labels(1, labels_of(b0)))
    assert torch.equal(model[0].weight, first)  # frozen after the first bucket
    assert not model[1].training and model[2].training


def test_cwr_on_a_bare_linear_model_keeps_training_it() -> None:
    """A linear probe on frozen features is its own output layer: nothing to freeze."""
    model = nn.Linear(2, 3)
    cwr = CWRStar()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    b0 = make_bucket(0)
    for index in (0, 1):
        train_bucket(model, cwr, b0, opt, "cpu", bucket=Bucket.from_labels(index, labels_of(b0)))
    assert all(p.requires_grad for p in model.parameters())
    assert model.bias.abs().sum() > 0  # the bias trained too (CWR* resets only weights)


# --- GDumb -----------------------------------------------------------------------------


def test_gdumb_restarts_from_the_initial_weights_with_a_fresh_optimizer() -> None:
    state_sizes: list[int] = []

    class Spy(GDumb):
        """Records the optimizer's state size at the first step of each bucket."""

        def before_bucket(self, model: nn.Module, bucket: Bucket) -> None:
            super().before_bucket(model, bucket)
            self.first = True

        def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 replay: Any = None) -> torch.Tensor:
            if self.first:
                state_sizes.append(len(opt.state))
                self.first = False
            return super().loss(model, x, y, replay)

    model = make_model()
    initial = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    gdumb = Spy()
    assert gdumb.from_scratch and gdumb.trains_on_buffer
    b0 = make_bucket(0)
    train_bucket(model, gdumb, b0, opt, "cpu")
    assert not torch.equal(model[0].weight, initial["0.weight"]) and len(opt.state) == 4
    gdumb.before_bucket(model, Bucket(1))  # what train_bucket does first
    assert all(torch.equal(model.state_dict()[k], v) for k, v in initial.items())
    train_bucket(model, gdumb, b0, opt, "cpu")
    assert state_sizes == [0, 0]  # the momentum buffers were cleared for bucket 1
