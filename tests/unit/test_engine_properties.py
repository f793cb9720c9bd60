"""The distributed properties of the shared engine, for every method (no Ray).

Each method's real worker-side task runs on the engine's loop over in-memory data
(tests/scenarios.py), in one process and in a 2-process ``torch.distributed`` group (gloo):

- gradient sync: after training, both workers hold identical weights, equal (to float
  tolerance) to one process with the same global batch and data order; with gradient
  accumulation too, including the short accumulation group at the end of each epoch;
- exactly-once evaluation: an evaluation split whose rows do not divide by the workers is
  scored row by row exactly once (the reported count);
- resume equivalence: stopped after epoch 1 and resumed from its checkpoint, a run ends
  with the uninterrupted run's weights (EMA and teacher included), its DINO center and its
  metrics.

CLEAR's learner is checked the same way in test_clear_distributed below.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import scenarios
import torch
from ddp import run_ranks

from raylab.engine.checkpoint import load_checkpoint
from raylab.engine.context import LocalContext
from raylab.engine.restore import list_checkpoints
from raylab.registry import list_methods

#: Metrics that depend on the clock, not on the computation.
TIMING = {"samples_per_s", "img_per_s", "first_step_unix_time", "bucket_seconds"}


def _same_replicas(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    drift = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a
             if not torch.equal(a[k], b[k])}
    worst = sorted(drift.items(), key=lambda kv: -kv[1])[:3]
    assert not drift, f"the workers' weights differ in {len(drift)} tensors, e.g. {worst}"


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-4, atol=2e-5,
                                   msg=lambda m, key=key: f"{key}: {m}")


def test_every_method_is_covered() -> None:
    """A new method adds its scenario here (CLEAR has its own below)."""
    assert set(list_methods()) == set(scenarios.SCENARIOS) | {"clear"}


@pytest.mark.parametrize(("name", "overrides"), [
    ("skill", {}),
    ("convnext", {}),
    ("convnext", {"grad_accum": 2}),
    ("dino", {}),
    ("minivit", {}),
], ids=["skill", "convnext", "convnext-accum2", "dino", "minivit"])
def test_two_workers_match_one_process(name: str, overrides: dict) -> None:
    one, one_reports = scenarios.train(name, overrides)
    (w0, r0), (w1, r1) = run_ranks(scenarios.train, 2, name, overrides)
    _same_replicas(w0, w1)
    _close(w0, one)
    # The same global batches: as many samples and steps, the same losses.
    assert [r["train_samples"] for r in r0] == [r["train_samples"] for r in one_reports]
    for two, single in zip(r0, one_reports):
        assert two["train_loss"] == pytest.approx(single["train_loss"], rel=1e-4)


def test_exactly_once_evaluation_with_an_odd_row_count() -> None:
    """23 evaluation windows over 2 workers: 12 + 11, every one scored once, the counts
    and the accuracy equal to one process's."""
    _, single = scenarios.train("skill")
    (_, r0), (_, r1) = run_ranks(scenarios.train, 2, "skill", {})
    assert [r["test_rows"] for r in r0] == [r["test_rows"] for r in r1] == [23, 23, 23]
    assert [r["test_rows"] for r in single] == [23, 23, 23]
    assert r0[-1]["test_accuracy"] == pytest.approx(single[-1]["test_accuracy"])
    assert sum(map(sum, r0[-1]["test_confusion"])) == 23


class Stop(Exception):
    pass


class StopsAfterEpoch1(LocalContext):
    """A worker that dies right after epoch 1's report and checkpoint."""

    def report(self, metrics: dict, checkpoint: dict | None = None) -> None:
        super().report(metrics, checkpoint)
        if metrics.get("epoch") == 1:
            raise Stop


def _deterministic(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in TIMING}


@pytest.mark.parametrize("name", sorted(scenarios.SCENARIOS))
def test_resume_matches_the_uninterrupted_run(name: str, tmp_path: Path) -> None:
    full, full_reports = scenarios.train(name, run_dir=str(tmp_path / "full"))
    with pytest.raises(Stop):
        scenarios.train(name, run_dir=str(tmp_path / "cut"), context_class=StopsAfterEpoch1)
    resumed, resumed_reports = scenarios.train(name, run_dir=str(tmp_path / "cut"))
    assert [r["epoch"] for r in resumed_reports] == [2, 3]  # epoch 1 not trained again
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    for a, b in zip(full_reports[1:], resumed_reports):
        assert _deterministic(a) == _deterministic(b)
    last_full = load_checkpoint(list_checkpoints(tmp_path / "full")[0])
    last_resumed = load_checkpoint(list_checkpoints(tmp_path / "cut")[0])
    for key, value in last_full.get("extra", {}).items():
        if torch.is_tensor(value):  # DINO's center and schedules
            assert torch.equal(value, last_resumed["extra"][key]), key
    # Restored again from its last checkpoint, the finished run trains nothing and
    # reports its final metrics once more (what an interrupted Tune trial relies on).
    again, again_reports = scenarios.train(name, run_dir=str(tmp_path / "cut"))
    assert len(again_reports) == 1 and again_reports[0]["replayed_from_checkpoint"]
    assert _deterministic(again_reports[0]) == {**_deterministic(full_reports[-1]),
                                                "replayed_from_checkpoint": True}


def test_frozen_backbone_stays_bit_identical_on_two_workers() -> None:
    """Every backbone tensor of a frozen run (weights and BatchNorm statistics) is the
    saved checkpoint's, bit for bit, after 3 epochs on 2 workers; the head and adapters
    trained, and the two workers match one process (the reuse scenario's gradient-sync
    check)."""
    one, _ = scenarios.train("reuse")
    (w0, _), (w1, _) = run_ranks(scenarios.train, 2, "reuse", {})
    _same_replicas(w0, w1)
    _close(w0, one)
    saved = load_checkpoint(scenarios.reuse_backbone())["model"]
    model = {k.removeprefix("model."): v for k, v in w0.items() if k.startswith("model.")}
    trained = {k for k in model if k.startswith("fc.") or ".adapter." in k}
    assert {k for k in trained if ".adapter." in k} == {
        f"layer1.0.adapter.fc{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    for name, value in model.items():
        if name not in trained:
            assert torch.equal(value, saved[name.replace(".block.", ".")]), name
    # The adapter's zero-initialised last layer moved: it trained with the head.
    assert model["layer1.0.adapter.fc2.weight"].abs().sum() > 0


def test_dino_center_is_the_same_on_every_worker() -> None:
    (_, r0), (_, r1) = run_ranks(scenarios.train, 2, "dino", {})
    assert all(r["center_spread"] == 0.0 for r in r0)
    assert all(math.isfinite(r["train_loss"]) for r in r0)


@pytest.mark.parametrize("strategy", ["finetune", "lwf"])
def test_clear_step_two_workers_match_one_process(strategy: str) -> None:
    one = scenarios.clear_steps(strategy)
    w0, w1 = run_ranks(scenarios.clear_steps, 2, strategy)
    _same_replicas(w0, w1)
    _close(w0, one)


@pytest.mark.parametrize("strategy", ["er", "ewc"])
def test_clear_learners_stay_in_sync(tiny_clear_stream: Path, tmp_path: Path,
                                     strategy: str) -> None:
    """Two learners share each bucket (each its half of the rows and of the replay); the
    gradient all-reduce (and EWC's all-reduced Fisher) keep them identical, and they
    record the same accuracy matrix."""
    (w0, m0), (w1, m1) = run_ranks(scenarios.clear_learner, 2, str(tiny_clear_stream),
                                   str(tmp_path), strategy)
    _same_replicas(w0, w1)
    assert m0 == m1 and all(a is not None for row in m0 for a in row)
