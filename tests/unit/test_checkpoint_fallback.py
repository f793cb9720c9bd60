"""Resuming from damaged checkpoints (issue 6, fault tolerance item 3), without Ray.

``raylab.engine.restore.restore_latest`` tries the newest checkpoint first and falls back
to older ones with a warning; it never loads garbage and never half-restores a model. The
candidates come from ``raylab.runtime.worker.run_checkpoints``: the in-process mode
(``worker.LOCAL_RUN_DIR``) is exercised directly; the Ray mode through a
``ray.train.Checkpoint`` handed out by a patched ``ray.train.get_checkpoint`` (no
cluster: a local checkpoint needs none).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.fs
import pytest
import ray.train
import torch
from torch import nn

from raylab.cli import main
from raylab.engine.checkpoint import (
    META_FILE,
    STATE_FILE,
    check_compatible,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from raylab.engine.restore import checkpoint_candidates, list_checkpoints
from raylab.engine.restore import restore_latest as restore_from
from raylab.errors import CheckpointError
from raylab.runtime import worker
from raylab.runtime.worker import run_checkpoints


def restore_latest(**objects):
    """What a worker does on start: restore from the run's checkpoints (Ray's or the
    in-process run folder's), newest usable first."""
    return restore_from(run_checkpoints(), objects)

# Names as Ray Train and the in-process mode write them: creation time, so name order is
# age order.
OLD = "checkpoint_2025-01-01_10-00-00.000001"
NEW = "checkpoint_2025-01-01_10-05-00.000001"


def _model(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3))


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _save(folder: Path, seed: int, epoch: int, width: int = 8) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = _model(width)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()  # gives the optimizer per-parameter state (momentum buffers)
    save_checkpoint(folder, model=model, optimizer=opt, epoch=epoch, step=10 * (epoch + 1),
                    meta={"method": "toy"})
    return _weights(model)


@pytest.fixture()
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict, dict]:
    """An in-process run folder with two checkpoints: epoch 3 (older) and epoch 4."""
    folder = tmp_path / "run"
    old = _save(folder / OLD, seed=1, epoch=3)
    new = _save(folder / NEW, seed=2, epoch=4)
    monkeypatch.setattr(worker, "LOCAL_RUN_DIR", folder)

    def no_ray() -> None:
        raise AssertionError("in-process restore must not ask Ray Train for a checkpoint")

    monkeypatch.setattr(ray.train, "get_checkpoint", no_ray)
    return folder, old, new


def _fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(99)
    model = _model()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _truncate(folder: Path) -> None:
    data = (folder / STATE_FILE).read_bytes()
    (folder / STATE_FILE).write_bytes(data[: len(data) // 2])


def _garbage(folder: Path) -> None:
    (folder / STATE_FILE).write_bytes(b"\x00garbage" * 512)


def _empty(folder: Path) -> None:
    (folder / STATE_FILE).write_bytes(b"")


def _no_meta(folder: Path) -> None:
    (folder / META_FILE).unlink()


def _broken_meta(folder: Path) -> None:
    (folder / META_FILE).write_text('{"method": ')


def _no_state(folder: Path) -> None:
    (folder / STATE_FILE).unlink()


def _not_a_training_state(folder: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, folder / STATE_FILE)


def _bad_epoch(folder: Path) -> None:
    state = torch.load(folder / STATE_FILE, weights_only=True)
    state["epoch"] = -7
    torch.save(state, folder / STATE_FILE)


def _other_model(folder: Path) -> None:
    shutil.rmtree(folder)
    _save(folder, seed=3, epoch=4, width=16)


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate, "corrupt or unsafe checkpoint"),
    "garbage": (_garbage, "corrupt or unsafe checkpoint"),
    "empty": (_empty, "corrupt or unsafe checkpoint"),
    "no_meta": (_no_meta, f"no {META_FILE}"),
    "broken_meta": (_broken_meta, "unreadable checkpoint metadata"),
    "no_state": (_no_state, f"no {STATE_FILE}"),
    "foreign_state": (_not_a_training_state, "not a raylab training state"),
    "bad_epoch": (_bad_epoch, "'epoch' is -7"),
    "other_model": (_other_model, "does not fit"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_falls_back_to_previous_checkpoint(run, kind: str, caplog) -> None:
    folder, old, _ = run
    damage, reason = CORRUPTIONS[kind]
    damage(folder / NEW)
    model, opt = _fresh()
    with caplog.at_level(logging.WARNING, logger="raylab"):
        next_epoch, step, state = restore_latest(model=model, optimizer=opt)
    assert (next_epoch, step) == (4, 40)  # the older checkpoint: epoch 3 done
    assert state is not None and state["epoch"] == 3
    assert _same(_weights(model), old)
    assert opt.state_dict()["state"], "optimizer state not restored"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    skipped = [w for w in warnings if w.startswith(f"skipping unusable checkpoint: {folder / NEW}")]
    assert len(skipped) == 1, warnings
    assert reason in skipped[0]
    assert all("\n" not in w for w in warnings)
    assert any("resumed from the older checkpoint" in w and OLD in w for w in warnings)


def test_good_latest_is_used_without_warning(run, caplog) -> None:
    _, _, new = run
    model, opt = _fresh()
    with caplog.at_level(logging.WARNING, logger="raylab"):
        assert restore_latest(model=model, optimizer=opt)[:2] == (5, 50)
    assert _same(_weights(model), new)
    assert not caplog.records


def test_no_checkpoint_is_a_fresh_start(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(worker, "LOCAL_RUN_DIR", tmp_path)
    (tmp_path / ".tmp_checkpoint_2025-01-01_10-00-00.1").mkdir()  # a cut write, ignored
    model, _ = _fresh()
    with caplog.at_level(logging.WARNING, logger="raylab"):
        assert restore_latest(model=model) == (0, 0, None)
    assert not caplog.records


def test_all_unreadable_starts_from_scratch_loudly(run, caplog) -> None:
    folder, _, _ = run
    _truncate(folder / NEW)
    _garbage(folder / OLD)
    model, opt = _fresh()
    before = _weights(model)
    with caplog.at_level(logging.WARNING, logger="raylab"):
        assert restore_latest(model=model, optimizer=opt) == (0, 0, None)
    assert _same(_weights(model), before)
    assert not opt.state_dict()["state"]
    text = caplog.text
    assert f"skipping unusable checkpoint: {folder / NEW}" in text
    assert f"skipping unusable checkpoint: {folder / OLD}" in text
    assert "FROM SCRATCH" in text and str(folder) in text
    # Nothing is deleted: the damaged files stay for inspection.
    assert sorted(p.name for p in folder.iterdir()) == [OLD, NEW]


def test_checkpoints_of_another_configuration_raise(run) -> None:
    """Readable checkpoints that fit no model mean another configuration: starting afresh
    would push that run's good checkpoints out, so this is an error."""
    folder, _, _ = run
    _other_model(folder / NEW)
    _other_model(folder / OLD)
    model, opt = _fresh()
    before = _weights(model)
    with pytest.raises(CheckpointError) as info:
        restore_latest(model=model, optimizer=opt)
    message = str(info.value)
    assert message.startswith(f"{folder / NEW}: checkpoint does not fit this run")
    assert "another configuration" in message and "--name" in message
    assert "shape" in message
    assert _same(_weights(model), before)


def test_ray_mode_falls_back_to_sibling(run, monkeypatch, caplog) -> None:
    folder, old, _ = run
    _truncate(folder / NEW)
    # A newer folder that Ray Train never registered (an upload cut short) is not tried.
    _save(folder / "checkpoint_2025-01-01_10-09-00.000001", seed=5, epoch=9)
    latest = ray.train.Checkpoint.from_directory(str(folder / NEW))
    monkeypatch.setattr(worker, "LOCAL_RUN_DIR", None)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: latest)
    model, opt = _fresh()
    with caplog.at_level(logging.WARNING, logger="raylab"):
        assert restore_latest(model=model, optimizer=opt)[:2] == (4, 40)
    assert _same(_weights(model), old)
    assert f"skipping unusable checkpoint: {folder / NEW}" in caplog.text


def test_ray_mode_without_checkpoint(monkeypatch) -> None:
    monkeypatch.setattr(worker, "LOCAL_RUN_DIR", None)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    assert restore_latest(model=_model()) == (0, 0, None)


# ------------------------------------------------------------- sibling listing (pure)


@pytest.fixture()
def storage(tmp_path: Path) -> Path:
    names = ["checkpoint_2025-01-01_10-00-00.000001", "checkpoint_2025-01-01_10-01-00.000001",
             "checkpoint_2025-01-01_10-02-00.000001", "checkpoint_2025-01-01_10-03-00.000001",
             ".tmp_checkpoint_2025-01-01_10-04-00.000001", "tensorboard"]
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("")
    return tmp_path


@pytest.mark.parametrize("filesystem", [None, pyarrow.fs.LocalFileSystem()],
                         ids=["os", "pyarrow"])
def test_candidates_are_latest_then_older_siblings(storage: Path, filesystem) -> None:
    latest = str(storage / "checkpoint_2025-01-01_10-02-00.000001")
    assert checkpoint_candidates(latest + "/", filesystem) == [
        latest,
        str(storage / "checkpoint_2025-01-01_10-01-00.000001"),
        str(storage / "checkpoint_2025-01-01_10-00-00.000001"),
    ]
    assert list_checkpoints(str(storage), filesystem)[0].endswith("10-03-00.000001")
    assert len(list_checkpoints(str(storage), filesystem)) == 4


def test_candidates_edge_cases(tmp_path: Path) -> None:
    custom = str(tmp_path / "my_checkpoint")
    assert checkpoint_candidates(custom) == [custom]
    lonely = str(tmp_path / "missing" / "checkpoint_x")
    assert checkpoint_candidates(lonely) == [lonely]
    assert list_checkpoints(tmp_path / "missing") == []
    assert list_checkpoints(str(tmp_path / "missing"), pyarrow.fs.LocalFileSystem()) == []


# ------------------------------------------------ load_checkpoint / restore_checkpoint


@pytest.mark.parametrize(("state", "reason"), [
    ([1, 2, 3], "holds a list, expected a dict"),
    ({"epoch": 1}, "no 'model' weights"),
    ({"model": {"w": [1.0]}}, "'model' entry 'w' holds a list, expected a tensor"),
    ({"model": {}, "epoch": "3"}, "'epoch' is '3'"),
    ({"model": {}, "optimizer": [1]}, "'optimizer' holds a list"),
    ({"model": {}, "optimizer": {"state": {}}}, "lacks its 'state' or 'param_groups'"),
    ({"model": {}, "rng": {"torch": torch.zeros(3)}}, "'rng' is not"),
])
def test_load_checkpoint_validates_structure(tmp_path: Path, state, reason: str) -> None:
    torch.save(state, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / STATE_FILE}: not a raylab training state (")
    assert reason in message and "\n" not in message


def test_mismatch_is_refused_before_anything_changes(tmp_path: Path) -> None:
    _save(tmp_path, seed=1, epoch=0, width=16)
    state = load_checkpoint(tmp_path)
    model, opt = _fresh()
    before, opt_before = _weights(model), opt.state_dict()
    with pytest.raises(CheckpointError, match=r"does not fit this run \('model' does not fit"):
        restore_checkpoint(state, model=model, optimizer=opt, where="ck")
    assert _same(_weights(model), before)
    assert opt.state_dict() == opt_before


def test_optimizer_mismatch_is_named(tmp_path: Path) -> None:
    _save(tmp_path, seed=1, epoch=0)
    state = load_checkpoint(tmp_path)
    model = _model()
    two_groups = torch.optim.SGD([{"params": model[0].parameters()},
                                  {"params": model[2].parameters()}], lr=0.1)
    with pytest.raises(CheckpointError, match="'optimizer' has 1 parameter group"):
        check_compatible(state, model=model, optimizer=two_groups)
    check_compatible(state, model=_model(), optimizer=None)  # the model alone fits


def test_unwritable_checkpoint_folder_is_a_storage_error(tmp_path: Path) -> None:
    from raylab.errors import StorageError

    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="cannot write checkpoint"):
        save_checkpoint(tmp_path / "file" / "ckpt", model=_model())


def test_assess_on_corrupt_checkpoint_is_one_line(tmp_path: Path, capsys) -> None:
    from raylab.methods.skill import SkillConfig
    from raylab.methods.skill.method import checkpoint_meta
    from raylab.methods.skill.task import build_model
    from raylab.transforms.windows import ChannelStats

    cfg = SkillConfig()
    stats = ChannelStats(np.zeros(76), np.ones(76))
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, model=build_model(cfg), meta=checkpoint_meta(cfg, stats, "f"))
    _truncate(ckpt)
    code = main(["assess", "--checkpoint", str(ckpt), str(tmp_path / "rec.txt")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"raylab: error: {ckpt / STATE_FILE}: corrupt or unsafe checkpoint")
    assert "\n" not in err and "Traceback" not in err
