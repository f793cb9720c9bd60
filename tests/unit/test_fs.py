"""raylab.data.fs.write_atomic: a reader sees the old or the new content, never part of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raylab.data import fs


def test_local_write_replaces_the_content_and_leaves_no_temporary_file(tmp_path: Path
                                                                       ) -> None:
    path = tmp_path / "new" / "state.json"  # the folder is created
    fs.write_atomic(path, b"old")
    fs.write_atomic(str(path), b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(path.parent) == ["state.json"]


def test_a_failed_write_leaves_the_old_content(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    fs.write_atomic(path, b"old")
    with pytest.raises(TypeError):
        fs.write_atomic(path, "not bytes")  # type: ignore[arg-type]  # fails mid-write

    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(fs.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        fs.write_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["state.json"]


def test_a_uri_is_one_put(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    puts = []
    monkeypatch.setattr(fs, "write_bytes", lambda path, data: puts.append((path, data)))
    monkeypatch.chdir(tmp_path)
    fs.write_atomic("s3://bucket/run/state.json", b"new")
    assert puts == [("s3://bucket/run/state.json", b"new")]
    assert os.listdir(tmp_path) == []  # no temporary file anywhere
