"""The storage pre-flight check (issue 6, fault tolerance item 5): a full disk or an
unwritable ``--storage`` is one clear error before training starts (no Ray here).

Read-only storage and a full disk are simulated by patching the calls the check makes
(root writes through ``chmod 0o555``, and tests cannot fill a disk); the real
``chmod`` case runs too when the test user is not root.
"""

from __future__ import annotations

import errno
import os
from collections import namedtuple
from pathlib import Path

import pytest

import raylab.runtime.cluster
import raylab.runtime.options as options
from raylab.cli import main
from raylab.errors import ConfigError, StorageError
from raylab.runtime.options import MIN_FREE_ENV, RunOptions, check_storage, min_free_mb

Usage = namedtuple("Usage", "total used free")
MiB = 2**20


@pytest.fixture(autouse=True)
def default_minimum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MIN_FREE_ENV, raising=False)


def _free(monkeypatch: pytest.MonkeyPatch, mib: float) -> None:
    monkeypatch.setattr(options.shutil, "disk_usage",
                        lambda path: Usage(10_000 * MiB, 0, int(mib * MiB)))


def test_creates_folder_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    assert check_storage(target) == target
    assert target.is_dir() and os.listdir(target) == []


def test_file_in_place_of_folder(tmp_path: Path) -> None:
    (tmp_path / "runs").write_text("x")
    with pytest.raises(StorageError) as info:
        check_storage(tmp_path / "runs")
    assert str(info.value) == (f"--storage {tmp_path / 'runs'}: not writable "
                               "(it is a file, expected a directory)")


def test_file_in_place_of_a_parent(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError) as info:
        check_storage(tmp_path / "f" / "runs")
    assert str(info.value) == f"--storage {tmp_path / 'f' / 'runs'}: not writable (Not a directory)"


def test_read_only_folder_for_real(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        try:  # root (and some file systems) write through the mode bits
            (locked / "probe").write_text("x")
        except PermissionError:
            pass
        else:
            pytest.skip("this user can write into a 0o555 folder (root?); simulated below")
        with pytest.raises(StorageError) as info:
            check_storage(locked)
    finally:
        locked.chmod(0o755)
    assert str(info.value) == f"--storage {locked}: not writable (Permission denied)"


@pytest.mark.parametrize(("code", "words"), [
    (errno.EROFS, "Read-only file system"),
    (errno.EACCES, "Permission denied"),
])
def test_read_only_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int,
                             words: str) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(options.tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(StorageError) as info:
        check_storage(tmp_path)
    assert str(info.value) == f"--storage {tmp_path}: not writable ({words})"


def test_disk_full_while_writing_the_probe(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(options.os, "fsync", full)
    with pytest.raises(StorageError) as info:
        check_storage(tmp_path)
    assert str(info.value) == f"--storage {tmp_path}: not writable (No space left on device)"
    assert os.listdir(tmp_path) == []  # the probe is gone even then


def test_too_little_free_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _free(monkeypatch, 12.4)
    with pytest.raises(StorageError) as info:
        check_storage(tmp_path)
    assert str(info.value) == (f"--storage {tmp_path}: not enough free space (12 MiB free, "
                               f"need 100 MiB; {MIN_FREE_ENV} sets the minimum)")


def test_minimum_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _free(monkeypatch, 12)
    monkeypatch.setenv(MIN_FREE_ENV, "10")
    assert min_free_mb() == 10
    check_storage(tmp_path)
    monkeypatch.setenv(MIN_FREE_ENV, "0")
    check_storage(tmp_path)
    monkeypatch.setenv(MIN_FREE_ENV, "500")
    with pytest.raises(StorageError, match=r"12 MiB free, need 500 MiB"):
        check_storage(tmp_path)
    assert check_storage(tmp_path, need_mb=1) == tmp_path  # an explicit need wins


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf"])
def test_bad_minimum_is_a_config_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(MIN_FREE_ENV, value)
    with pytest.raises(ConfigError) as info:
        min_free_mb()
    assert str(info.value) == f"{MIN_FREE_ENV}: expected a number of MiB >= 0, got {value!r}"


def test_default_minimum_is_100_mib() -> None:
    assert min_free_mb() == 100


def test_free_space_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(options.shutil, "disk_usage", broken)
    with pytest.raises(StorageError, match=r"cannot read its free space \(Input/output error\)"):
        check_storage(tmp_path)


def test_resolved_storage_runs_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    _free(monkeypatch, 1)
    with pytest.raises(StorageError, match="not enough free space"):
        RunOptions(storage=str(tmp_path / "runs")).resolved_storage()
    with pytest.raises(StorageError, match="not enough free space"):
        RunOptions(storage=f"file://{tmp_path / 'runs'}").resolved_storage()


@pytest.mark.parametrize("uri", ["s3://bucket/runs", "gs://bucket/runs"])
def test_remote_storage_is_not_probed(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def probe(*args: object, **kwargs: object) -> None:
        raise AssertionError("remote storage must not be probed locally")

    monkeypatch.setattr(options, "check_storage", probe)
    monkeypatch.setattr(options, "check_remote_storage", lambda uri: None)  # asks the store
    assert RunOptions(storage=uri).resolved_storage() == uri


@pytest.fixture(scope="module")
def shards(tiny_jigsaws_shards: Path) -> Path:
    return tiny_jigsaws_shards


@pytest.mark.parametrize("command", ["train", "tune"])
def test_cli_fails_before_ray_starts(command: str, shards: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was about to start; the storage error must come first")

    monkeypatch.setattr(raylab.runtime.cluster, "ensure_ray", refuse)
    _free(monkeypatch, 3)
    storage = tmp_path / "runs"
    rc = main([command, "skill", "--data", str(shards), "--storage", str(storage)])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert err == (f"raylab: error: --storage {storage}: not enough free space (3 MiB free, "
                   f"need 100 MiB; {MIN_FREE_ENV} sets the minimum)\n")
    assert os.listdir(storage) == []  # no experiment folder was started
