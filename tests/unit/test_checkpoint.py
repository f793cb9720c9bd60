"""Tests of raylab.engine.checkpoint: a save/restore pair that resumes training exactly."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from raylab.engine.checkpoint import (
    META_FILE,
    STATE_FILE,
    load_checkpoint,
    load_meta,
    restore_checkpoint,
    save_checkpoint,
)
from raylab.errors import CheckpointError


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))


def _parts(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5 ** epoch)
    return opt, sched


def _step(model: nn.Module, opt: torch.optim.Optimizer, sched: object) -> float:
    """One training step whose data and dropout masks come from the global RNGs."""
    model.train()
    x = torch.randn(16, 4) + float(np.random.rand()) + random.random()
    y = torch.randint(0, 3, (16,))
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            _assert_same_state(a[k], b[k])
        else:
            assert a[k] == b[k], k


@pytest.fixture()
def trained(tmp_path: Path) -> tuple[Path, nn.Module, torch.optim.Optimizer, object]:
    """A model trained 3 steps and checkpointed at epoch 2, step 3."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = _model()
    opt, sched = _parts(model)
    for _ in range(3):
        _step(model, opt, sched)
    ckpt = save_checkpoint(tmp_path / "ckpt", model=model, optimizer=opt, scheduler=sched,
                           epoch=2, step=3, meta={"method": "toy", "classes": ["a", "b"]})
    return ckpt, model, opt, sched


def test_restore_gives_identical_state_and_next_step(trained) -> None:
    ckpt, model, opt, sched = trained
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    # The original run goes on right after the checkpoint...
    loss1 = _step(model, opt, sched)

    # ...and a fresh process (other RNG, other init) resumes from it.
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    model2 = _model()
    opt2, sched2 = _parts(model2)
    epoch, step = restore_checkpoint(load_checkpoint(ckpt), model=model2, optimizer=opt2,
                                     scheduler=sched2)
    assert (epoch, step) == (2, 3)
    _assert_same_state(saved_model, model2.state_dict())
    _assert_same_state(saved_opt, opt2.state_dict())
    assert opt2.state_dict()["state"][0]["step"] == 3
    assert sched2.state_dict()["last_epoch"] == 3
    assert sched2.get_last_lr() == pytest.approx([1e-2 * 0.5 ** 3])

    loss2 = _step(model2, opt2, sched2)
    assert loss1 == loss2
    _assert_same_state(model.state_dict(), model2.state_dict())
    _assert_same_state(opt.state_dict(), opt2.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_rng_round_trip_python_numpy_torch(tmp_path: Path) -> None:
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.randn(1)  # and in numpy's legacy state
    save_checkpoint(tmp_path, model=nn.Linear(1, 1))
    expected = (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(),
                torch.rand(3).tolist())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_checkpoint(load_checkpoint(tmp_path), model=nn.Linear(1, 1))
    got = (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(),
           torch.rand(3).tolist())
    assert got == expected


def test_restore_rng_false_leaves_rng_alone(tmp_path: Path) -> None:
    model = nn.Linear(1, 1)
    torch.manual_seed(1)
    save_checkpoint(tmp_path, model=model)
    state = load_checkpoint(tmp_path)
    torch.manual_seed(2)
    expected = torch.rand(2)
    torch.manual_seed(2)
    restore_checkpoint(state, model=model, restore_rng=False)
    assert torch.equal(torch.rand(2), expected)


def test_file_loads_with_weights_only(trained) -> None:
    ckpt = trained[0]
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "epoch", "step"} <= set(state)
    assert (state["epoch"], state["step"]) == (2, 3)
    assert load_meta(ckpt) == {"method": "toy", "classes": ["a", "b"]}


def test_wrapped_model_saves_plain_keys_and_ema(tmp_path: Path) -> None:
    model = _model()
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    save_checkpoint(tmp_path, model=nn.DataParallel(model), ema=ema)
    state = load_checkpoint(tmp_path)
    assert set(state["model"]) == set(model.state_dict())  # no "module." prefix
    plain, ema2 = _model(), _model()
    restore_checkpoint(state, model=plain, ema=ema2)
    _assert_same_state(plain.state_dict(), model.state_dict())
    _assert_same_state(ema2.state_dict(), ema.state_dict())


def test_writes_leave_no_temp_files(trained) -> None:
    ckpt, model, opt, sched = trained
    save_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched, epoch=3, step=4)
    assert sorted(p.name for p in ckpt.iterdir()) == [META_FILE, STATE_FILE]
    assert load_checkpoint(ckpt)["epoch"] == 3
    assert load_meta(ckpt) == {}


def test_truncated_state_is_a_checkpoint_error(trained) -> None:
    path = trained[0] / STATE_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(trained[0])
    message = str(info.value)
    assert message.startswith(f"{path}: corrupt or unsafe checkpoint")
    assert "\n" not in message


def test_garbage_state_is_a_one_line_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / STATE_FILE}: corrupt or unsafe checkpoint")
    assert "\n" not in str(info.value)


def test_missing_folder_and_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(missing)
    assert str(info.value) == f"{missing}: not a raylab checkpoint (no {STATE_FILE})"
    with pytest.raises(CheckpointError) as info:
        load_meta(tmp_path)
    assert str(info.value) == f"{tmp_path}: not a raylab checkpoint (no {META_FILE})"


def test_corrupt_meta_names_the_file(trained) -> None:
    path = trained[0] / META_FILE
    path.write_text('{"method": ')
    with pytest.raises(CheckpointError) as info:
        load_meta(trained[0])
    assert str(info.value).startswith(f"{path}: unreadable checkpoint metadata")
    json.loads(json.dumps(str(info.value)))  # a plain string
