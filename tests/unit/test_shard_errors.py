"""shard_read_error on raylab's own DataError for a shard, wrapped as Ray wraps it: the
file and the reason come from the DataError (the object, or its line in the traceback text
when Ray Data dropped the object), not from guessing at words. No Ray cluster is started."""

from __future__ import annotations

import pickle
import traceback
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raylab.errors import _READ_WORDS, CheckpointError, DataError, shard_read_error
from raylab.runtime.datasets import read_shard

SHARD = "s3://bucket/jig/part-00000.parquet"
KEPT = "s3://bucket/runs/del/holdout"


def _in_a_ray_data_task(error: DataError) -> BaseException:
    """``error`` raised by a Ray Data UDF inside a Train worker, as ``trainer.fit()`` raises
    it: Ray Data raises ``UserCodeException`` from it, Ray pickles that back to the caller
    (the chained DataError is lost; the traceback text keeps it) as a
    ``RayTaskError(UserCodeException)``, and Ray Train reports it as a worker failure."""
    from ray.exceptions import RayTaskError, UserCodeException
    from ray.train.v2.api.exceptions import WorkerGroupError

    try:
        try:
            raise error
        except DataError as e:
            raise UserCodeException("UDF failed to process a data block.") from e
    except UserCodeException as wrapped:
        text = "".join(traceback.format_exception(wrapped))
        returned = pickle.loads(pickle.dumps(wrapped))
    assert returned.__cause__ is None  # what Ray Data's callers see
    task_error = RayTaskError("MapBatches(read_shard_batch)", text, returned, pid=1, ip="x")
    return WorkerGroupError(f"[Rank 0]\n{task_error}", {0: task_error.as_instanceof_cause()})


def _in_a_ray_task(error: DataError) -> BaseException:
    """``error`` raised by a plain Ray task: Ray keeps it as the RayTaskError's cause."""
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import WorkerGroupError

    text = "".join(traceback.format_exception(error))
    task_error = RayTaskError("task", text, pickle.loads(pickle.dumps(error)), pid=1, ip="x")
    return WorkerGroupError("[Rank 0]", {0: task_error.as_instanceof_cause()})


def test_a_store_shard_missing_in_a_ray_data_task_is_named_with_its_reason() -> None:
    assert not any("missing" in word for word in _READ_WORDS)  # no phrase to match
    error = shard_read_error(_in_a_ray_data_task(DataError("the file is missing", SHARD)),
                             run_dir=KEPT)
    assert isinstance(error, DataError) and error.path == SHARD
    assert str(error).startswith(f"{SHARD}: shard could not be read (the file is missing); "
                                 f"checkpoints and metrics written so far are kept in {KEPT}")


def test_the_reason_is_the_data_errors_own() -> None:
    own = DataError("unreadable Parquet data (zstd decompression failed); expected a "
                    "complete, uncorrupted Parquet file (convert the dataset again)", SHARD)
    for failure in (_in_a_ray_data_task(own), _in_a_ray_task(own)):
        error = shard_read_error(failure, [SHARD])
        assert error is not None and error.reason == f"shard could not be read ({own.reason})"


def test_a_known_shard_with_spaces_in_its_name() -> None:
    shard = "s3://bucket/my data/part 1.parquet"
    error = shard_read_error(_in_a_ray_data_task(DataError("the file is missing", shard)),
                             [shard])
    assert error is not None and error.path == shard
    assert error.reason == "shard could not be read (the file is missing)"


def test_a_local_shard_is_described_as_it_is_now(tmp_path: Path) -> None:
    """As for pyarrow's own read errors: the local file is probed."""
    shard = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), shard)
    try:
        shard.unlink()
        read_shard(str(shard), ["a"])
    except DataError as e:
        failure = _in_a_ray_data_task(e)
    error = shard_read_error(failure, run_dir="/runs/x/f")
    assert str(error).startswith(f"{shard}: shard could not be read (the file is missing); ")
    shard.write_bytes(b"not parquet" * 100)  # damaged since: the probe says so
    assert "unreadable Parquet data" in str(shard_read_error(failure))


def test_other_raylab_errors_are_left_alone() -> None:
    assert shard_read_error(_in_a_ray_task(CheckpointError(f"{SHARD}: not a checkpoint"))) \
        is None
    manifest = DataError("cannot read manifest", "s3://bucket/jig/manifest.json")
    assert shard_read_error(_in_a_ray_task(manifest)) is None
    assert shard_read_error(_in_a_ray_data_task(manifest)) is None
