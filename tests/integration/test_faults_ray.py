"""Faults during a run (issue 6, fault tolerance items 3 and 4), through the CLI.

* A shard deleted or damaged after training started: ``raylab train`` exits with one
  ``raylab: error:`` line naming the shard file, and the checkpoints and metrics.jsonl
  written before stay; once the file is back, rerunning under the same name resumes.
* The newest checkpoint of a Ray Train run is damaged: a rerun under the same name
  resumes from the checkpoint before it instead of crashing or starting over.

The skill runs are kept tiny as in test_skill_ray.py. ``materialize_mb=0`` and
``cache_mb=0`` make every epoch read the Parquet shards again (by default the sample is
read once into the object store and the windows replayed from memory, so a shard damaged
later would never be read). Why each test is deterministic is said in its docstring.

The first tests need no Ray: they check the mapping of read failures to a DataError on
exceptions built the way Ray wraps them.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from raylab.cli import main
from raylab.engine.checkpoint import STATE_FILE, load_checkpoint, load_meta
from raylab.errors import CheckpointError, DataError, shard_read_error

FOLD = "supertrial1"


# ------------------------------------------------------------ without Ray: the mapping


def _read(path: Path) -> None:
    """Read a Parquet file the way Ray Data's read tasks do (a dataset fragment)."""
    dataset = pds.dataset(source=[str(path)], format=pds.ParquetFileFormat(),
                          schema=pa.schema([("a", pa.int64())]))
    for fragment in dataset.get_fragments():
        list(fragment.scanner().to_batches())


def _as_ray_train_failure(exc: BaseException) -> BaseException:
    """``exc`` raised in a Ray task inside a Train worker, as ``trainer.fit()`` raises it."""
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import WorkerGroupError

    text = "".join(traceback.format_exception(exc))
    task_error = RayTaskError("ReadFiles->MapBatches(TrialWindows)", text, exc)
    return WorkerGroupError(f"[Rank 0]\n{text}", {0: task_error.as_instanceof_cause()})


@pytest.fixture()
def parquet_files(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(3):
        path = tmp_path / f"part-{i:05d}.parquet"
        pq.write_table(pa.table({"a": list(range(2000))}), path)
        paths.append(path)
    return paths


def _failure_reading(path: Path) -> BaseException:
    try:
        _read(path)
    except Exception as exc:
        return _as_ray_train_failure(exc)
    raise AssertionError(f"{path} read fine")


def test_garbage_shard_is_named(parquet_files: list[Path]) -> None:
    bad = parquet_files[1]
    bad.write_bytes(b"not parquet" * 100)
    error = shard_read_error(_failure_reading(bad), map(str, parquet_files), "/runs/x/f")
    assert isinstance(error, DataError) and error.path == str(bad)
    message = str(error)
    assert message.startswith(f"{bad}: shard could not be read (unreadable Parquet data: ")
    assert "magic bytes" in message
    assert "kept in /runs/x/f" in message and "same --name" in message


def test_missing_shard_is_named_without_knowing_the_files(parquet_files: list[Path]) -> None:
    bad = parquet_files[2]
    bad.unlink()
    error = shard_read_error(_failure_reading(bad))
    assert error is not None
    assert str(error) == f"{bad}: shard could not be read (the file is missing)"


def test_damaged_data_pages_are_found_by_reading(parquet_files: list[Path]) -> None:
    """A damaged page fails with a message that names no file; the files are read."""
    bad = parquet_files[0]
    data = bytearray(bad.read_bytes())
    data[100:400] = b"\xff" * 300
    bad.write_bytes(bytes(data))
    failure = _failure_reading(bad)
    assert str(bad) not in "".join(str(e) for e in [failure])  # pyarrow does not name it
    assert shard_read_error(failure) is None  # nothing to go on
    error = shard_read_error(failure, [str(p) for p in parquet_files])
    assert error is not None and error.path == str(bad)


def test_a_module_named_like_a_shard_is_not_a_shard(parquet_files: list[Path]) -> None:
    """Ray's tracebacks name ``ray.data._internal.datasource_v2.formats.parquet``; with a
    damaged page (whose message names no file) the known files are read instead."""
    bad = parquet_files[0]
    data = bytearray(bad.read_bytes())
    data[100:400] = b"\xff" * 300
    bad.write_bytes(bytes(data))
    try:
        _read(bad)
    except Exception as exc:  # noqa: BLE001 (the damaged read's own error)
        cause = exc
    failure = _as_ray_train_failure(RuntimeError(
        "File ray/data/_internal/datasource_v2/formats/parquet.py, in read\n"
        f"ray.data._internal.datasource_v2.formats.parquet: {cause}"))
    error = shard_read_error(failure, [str(p) for p in parquet_files])
    assert error is not None and error.path == str(bad)


def test_other_failures_are_left_alone(parquet_files: list[Path]) -> None:
    assert shard_read_error(_as_ray_train_failure(KeyError("lr")), map(str, parquet_files)) \
        is None
    own = CheckpointError(f"{parquet_files[0]}: something raylab already explains")
    assert shard_read_error(_as_ray_train_failure(own), map(str, parquet_files)) is None


def test_fit_maps_the_failure(parquet_files: list[Path], tmp_path: Path) -> None:
    from raylab.runtime.trainer import _fit_naming_shards, dataset_files

    class Files:
        def input_files(self) -> list[str]:
            return [str(p) for p in parquet_files]

    class Failing:
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def fit(self) -> Any:
            raise self.exc

    assert dataset_files({"train": Files(), "test": Files(), "x": object()}) == \
        [str(p) for p in parquet_files]
    parquet_files[1].unlink()
    with pytest.raises(DataError) as info:
        _fit_naming_shards(Failing(_failure_reading(parquet_files[1])), {"train": Files()},
                           str(tmp_path / "run"))
    assert info.value.path == str(parquet_files[1])
    assert isinstance(info.value.__cause__, Exception)
    unrelated = RuntimeError("boom")
    with pytest.raises(RuntimeError) as raw:
        _fit_naming_shards(Failing(unrelated), {"train": Files()}, "run")
    assert raw.value is unrelated


# ------------------------------------------------------------ with Ray: the CLI end to end


def _train(shards: Path, storage: Path, name: str, *extra: str) -> int:
    return main(["train", "skill", "--data", str(shards), "--set", f"folds=[{FOLD}]",
                 "--set", "step=10", "--set", "checkpoint_every=1",
                 "--storage", str(storage), "--name", name, *extra])


#: Read the shards in every epoch (see the module docstring).
STREAM = ("--set", "materialize_mb=0", "--set", "cache_mb=0")


@pytest.fixture()
def shards(small_jigsaws_shards: Path, tmp_path: Path) -> Path:
    """A private copy of the session's sample shards, free to damage."""
    dst = tmp_path / "shards"
    shutil.copytree(small_jigsaws_shards, dst)
    return dst


def _training_shard(shards: Path) -> Path:
    """A shard holding Suturing trials that fold supertrial1 trains on (trial != 1)."""
    for path in sorted(shards.glob("part-*.parquet")):
        table = pq.read_table(path, columns=["task", "trial"]).to_pydict()
        if any(task == "Suturing" and trial != 1
               for task, trial in zip(table["task"], table["trial"])):
            return path
    raise AssertionError(f"no Suturing training shard in {shards}")


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("raylab: error: ")]
    assert lines, err[-3000:]
    return lines[-1]


def _names_shard(line: str, shard: Path, reason: str) -> bool:
    """The CLI's error line starts with the shard file (as given or resolved)."""
    return any(line.startswith(f"raylab: error: {name}: shard could not be read {reason}")
               for name in (shard, shard.resolve()))


def _epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in
            (run / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_epochs(run: Path) -> list[int]:
    """Epochs of the run's checkpoints; each must load (nothing half-written was kept)."""
    folders = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert folders, f"no checkpoint left in {run}"
    epochs = []
    for folder in folders:
        assert load_meta(folder)["method"] == "skill"
        epochs.append(load_checkpoint(folder)["epoch"])
    return epochs


@pytest.mark.ray
def test_shard_deleted_mid_run_in_process(ray_cluster, shards: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Deterministic: with ``--workers 0`` the loop runs in this process, so the shard is
    moved away inside the first checkpointed report, after epoch 1 has read everything
    and before epoch 2 starts reading."""
    from raylab.runtime import worker

    shard = _training_shard(shards)
    away = tmp_path / "moved-away.parquet"
    report = worker.RayContext.report
    lost = threading.Event()

    def report_then_lose_the_shard(self, metrics: dict, checkpoint: dict | None = None
                                   ) -> None:
        report(self, metrics, checkpoint)
        if checkpoint is not None and not lost.is_set():  # once, in the first run only
            shard.rename(away)
            lost.set()

    monkeypatch.setattr(worker.RayContext, "report", report_then_lose_the_shard)
    storage = tmp_path / "runs"
    rc = _train(shards, storage, "lost", *STREAM, "--set", "optim.epochs=4", "--workers", "0")
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    line = _error_line(err)
    run = storage.resolve() / "lost" / FOLD
    assert _names_shard(line, shard, "(the file is missing)"), line
    assert f"kept in {run}" in line
    assert _epochs(run) == [1]
    assert _checkpoint_epochs(run) == [0]

    # The file back, the same command resumes after epoch 1 and finishes.
    away.rename(shard)
    assert _train(shards, storage, "lost", *STREAM, "--set", "optim.epochs=4",
                  "--workers", "0") == 0
    assert _epochs(run) == [1, 2, 3, 4]
    assert (storage / "lost" / "summary.json").is_file()


class _DamageAfterFirstCheckpoint(threading.Thread):
    """Overwrite ``shard`` with garbage as soon as a checkpoint folder appears in ``run``."""

    def __init__(self, run: Path, shard: Path) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.shard = run, shard
        self.stopping = threading.Event()
        self.damaged = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            if self.run_dir.is_dir() and any(p.is_dir() for p in
                                             self.run_dir.glob("checkpoint_*")):
                self.shard.write_bytes(b"this is not a Parquet file\n" * 4096)
                self.damaged.set()
                return
            time.sleep(0.01)


@pytest.mark.ray
def test_shard_damaged_mid_run_in_a_worker(ray_cluster, shards: Path, tmp_path: Path,
                                           capsys) -> None:
    """A Ray Train worker reads the damaged shard inside a Ray Data task.

    Deterministic enough: the checkpoint folder appears while the worker's epoch-1
    report uploads it, after epoch 1 (train and test pass) has read every shard, and the
    watcher damages the shard within ~10 ms, while starting epoch 2's read takes the
    worker far longer. Should epoch 2 still slip through, epochs 3 and 4 read the shard
    again (``cache_mb=0``), so the run fails in any case; the assertions allow that.
    """
    shard = _training_shard(shards)
    storage = tmp_path / "runs"
    run = storage.resolve() / "broken" / FOLD
    watcher = _DamageAfterFirstCheckpoint(run, shard)
    watcher.start()
    try:
        rc = _train(shards, storage, "broken", *STREAM, "--set", "optim.epochs=4",
                    "--workers", "1")
    finally:
        watcher.stopping.set()
        watcher.join()
    err = capsys.readouterr().err
    assert watcher.damaged.is_set(), "no checkpoint appeared"
    assert rc == 2, err[-3000:]
    line = _error_line(err)
    assert _names_shard(line, shard, "("), line
    assert f"kept in {run}" in line
    epochs = _epochs(run)
    assert epochs[0] == 1 and epochs[-1] < 4, epochs
    # Every kept checkpoint loads and belongs to a reported epoch.
    assert set(_checkpoint_epochs(run)) <= {e - 1 for e in epochs}


@pytest.mark.ray
def test_damaged_latest_ray_checkpoint_falls_back(ray_cluster, small_jigsaws_shards: Path,
                                                  tmp_path: Path) -> None:
    """Ray Train keeps two checkpoints (num_to_keep=2); with the newer one truncated, the
    rerun resumes from the older one: it trains epoch 2 again, not from epoch 1 (a fresh
    start) and not epoch 3 (the damaged state)."""
    storage = tmp_path / "runs"
    assert _train(small_jigsaws_shards, storage, "ck", "--set", "optim.epochs=2",
                  "--workers", "1") == 0
    run = storage / "ck" / FOLD
    assert _epochs(run) == [1, 2]
    newest = max(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert load_checkpoint(newest)["epoch"] == 1
    state = newest / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])

    assert _train(small_jigsaws_shards, storage, "ck", "--set", "optim.epochs=3",
                  "--workers", "1") == 0
    assert _epochs(run) == [1, 2, 2, 3]
    summary = json.loads((storage / "ck" / "summary.json").read_text())
    assert summary["folds"][0]["epochs"] == 3
