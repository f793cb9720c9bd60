"""Tests of raylab.runtime.options: run flags and the storage check done before Ray starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raylab.errors import ConfigError, StorageError
from raylab.runtime.options import RunOptions, local_path


def test_defaults_validate() -> None:
    opts = RunOptions()
    opts.validate()
    assert (opts.workers, opts.cpus_per_worker, opts.gpus_per_worker) == (1, 1.0, 0.0)
    assert (opts.storage, opts.max_failures) == ("runs", 0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"workers": -1}, "--workers: expected an integer >= 0, got -1"),
    ({"cpus_per_worker": 0}, "--cpus-per-worker: expected > 0, got 0"),
    ({"gpus_per_worker": -0.5}, "--gpus-per-worker: expected >= 0, got -0.5"),
    ({"max_failures": -2}, "--max-failures: expected >= -1, got -2"),
    ({"name": "a/b"}, "--name: expected a plain folder name, got 'a/b'"),
    ({"name": ".hidden"}, "--name: expected a plain folder name, got '.hidden'"),
])
def test_validate_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        RunOptions(**kwargs).validate()
    assert str(info.value) == message


def test_validate_accepts_edge_values() -> None:
    RunOptions(workers=0, max_failures=-1, gpus_per_worker=0.5, name="exp-1").validate()


def test_relative_path_becomes_absolute_and_is_created(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    opts = RunOptions(storage="runs/sub")
    resolved = opts.resolved_storage()
    assert resolved == str(tmp_path.resolve() / "runs" / "sub")
    assert Path(resolved).is_dir()
    assert os.listdir(resolved) == []  # the write test leaves nothing behind
    assert not opts.is_remote


def test_file_uri(tmp_path: Path) -> None:
    target = tmp_path / "store"
    assert RunOptions(storage=f"file://{target}").resolved_storage() == str(target.resolve())
    assert target.is_dir()


@pytest.mark.parametrize("storage", ["file://runs", "file://otherhost/tmp/x"])
def test_file_uri_with_host_is_refused(storage: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError) as info:
        RunOptions(storage=storage).resolved_storage()
    assert str(info.value).startswith(f"--storage {storage!r}: expected file:///ABSOLUTE/PATH")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("uri", ["s3://bucket/x", "gs://bucket/runs/exp"])
def test_remote_uri_passes_through_untouched(uri: str, monkeypatch) -> None:
    from raylab.runtime import options

    asked = []  # the store itself is asked (test_object_storage.py); here: that it is
    monkeypatch.setattr(options, "check_remote_storage", asked.append)
    opts = RunOptions(storage=uri)
    assert opts.resolved_storage() == uri
    assert asked == [uri]
    assert opts.is_remote
    assert local_path(uri, "exp") is None


def test_unknown_scheme_names_the_scheme() -> None:
    with pytest.raises(StorageError) as info:
        RunOptions(storage="ftp://x").resolved_storage()
    message = str(info.value)
    assert message.startswith("--storage 'ftp://x': unknown scheme 'ftp'")
    assert "s3://" in message


def test_unwritable_location(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes anywhere; a path under a regular file never works
        (tmp_path / "file.txt").write_text("x")
        target = tmp_path / "file.txt" / "sub"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = locked / "sub"
    try:
        with pytest.raises(StorageError) as info:
            RunOptions(storage=str(target)).resolved_storage()
    finally:
        if os.geteuid() != 0:
            (tmp_path / "locked").chmod(0o700)
    assert str(info.value).startswith(f"--storage {target}: not writable (")


def test_existing_file_as_storage(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match=r"not writable"):
        RunOptions(storage=str(tmp_path / "f")).resolved_storage()


def test_local_path() -> None:
    assert local_path("/data/runs", "exp", "fold") == Path("/data/runs/exp/fold")


@pytest.mark.parametrize(("text", "expected"), [
    ("2", (2, 0)), ("0", (0, 0)), ("1-4", (1, 4)), (" 2-2 ", (2, 0))])
def test_parse_workers(text: str, expected: tuple[int, int]) -> None:
    from raylab.runtime.options import parse_workers

    assert parse_workers(text) == expected


@pytest.mark.parametrize("text", ["two", "1-", "-1", "1-x", "1.5"])
def test_parse_workers_rejects(text: str) -> None:
    from raylab.errors import ConfigError
    from raylab.runtime.options import parse_workers

    with pytest.raises(ConfigError, match="--workers: expected N or MIN-MAX"):
        parse_workers(text)


def test_elastic_workers_validate_and_map_to_a_range() -> None:
    from raylab.errors import ConfigError
    from raylab.runtime.trainer import scaling_config

    opts = RunOptions(workers=1, max_workers=3)
    opts.validate()
    assert opts.peak_workers == 3
    assert scaling_config(opts).num_workers == (1, 3)
    assert scaling_config(RunOptions(workers=2)).num_workers == 2
    for bad in (RunOptions(workers=3, max_workers=2), RunOptions(workers=0, max_workers=2)):
        with pytest.raises(ConfigError, match="MIN-MAX"):
            bad.validate()


def test_the_controller_poll_setting_reaches_ray_trains_controller() -> None:
    """raylab shortens the Train controller's poll (each report waits for it) through an
    environment variable that Train copies from the driver to its controller: if Ray
    renamed it or stopped copying it, the setting would silently do nothing."""
    from ray.train.v2._internal import constants
    from ray.train.v2._internal.execution.controller import controller

    from raylab.runtime.trainer import CONTROLLER_POLL_ENV, CONTROLLER_POLL_S

    assert CONTROLLER_POLL_ENV == constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR
    assert CONTROLLER_POLL_ENV in constants.ENV_VARS_TO_PROPAGATE
    assert "os.getenv(HEALTH_CHECK_INTERVAL_S_ENV_VAR" in Path(controller.__file__).read_text()
    assert 0 < float(CONTROLLER_POLL_S) < constants.DEFAULT_HEALTH_CHECK_INTERVAL_S
