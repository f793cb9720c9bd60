"""Tests of raylab.data.shards: atomic writing and manifest validation."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from raylab.data.shards import iter_rows, read_manifest, shard_paths, write_shards
from raylab.errors import DataError


def _tables(sizes: list[int]) -> Iterator[pa.Table]:
    """Tables with an ``id`` column counting up across tables and a list column."""
    start = 0
    for n in sizes:
        ids = list(range(start, start + n))
        yield pa.table({"id": pa.array(ids, pa.int32()),
                        "vec": pa.array([[float(i)] * 2 for i in ids], pa.list_(pa.float32()))})
        start += n


def _leftovers(parent: Path) -> list[str]:
    """Hidden temporary or old folders left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    """A shard folder with 10 rows in shards of 4."""
    dst = tmp_path / "ds"
    write_shards(_tables([3, 5, 2]), dst, format="demo", extra={"k": 1}, rows_per_shard=4)
    return dst


def test_write_and_read_round_trip(shards: Path) -> None:
    manifest = read_manifest(shards, expected_format="demo")
    assert manifest["rows"] == 10
    assert manifest["schema_version"] == 1
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 2]
    assert [s["file"] for s in manifest["shards"]][0] == "part-00000.parquet"
    assert manifest["schema"] == {"id": "int32", "vec": "list<item: float>"}
    assert manifest["extra"] == {"k": 1}
    assert "created" in manifest
    assert json.loads((shards / "manifest.json").read_text()) == manifest
    assert _leftovers(shards.parent) == []


def test_shard_paths_and_iter_rows(shards: Path) -> None:
    paths = shard_paths(shards)
    assert len(paths) == 3 and all(os.path.isabs(p) and os.path.isfile(p) for p in paths)
    rows = list(iter_rows(shards, batch_size=3))
    assert [r["id"] for r in rows] == list(range(10))
    assert rows[7]["vec"] == [7.0, 7.0]
    assert list(iter_rows(shards, columns=["id"]))[0] == {"id": 0}
    with pytest.raises(DataError, match="unknown column.*nope"):
        list(iter_rows(shards, columns=["nope"]))


def test_empty_input_writes_empty_manifest(tmp_path: Path) -> None:
    manifest = write_shards(iter([]), tmp_path / "empty", format="demo")
    assert manifest["rows"] == 0 and manifest["shards"] == []
    assert read_manifest(tmp_path / "empty")["rows"] == 0


def test_existing_dst_needs_overwrite(shards: Path) -> None:
    with pytest.raises(DataError, match="already exists") as err:
        write_shards(_tables([1]), shards, format="demo")
    assert str(shards) in str(err.value)
    assert read_manifest(shards)["rows"] == 10
    write_shards(_tables([2]), shards, format="demo", overwrite=True)
    assert read_manifest(shards)["rows"] == 2
    assert len(list(shards.glob("*.parquet"))) == 1
    assert _leftovers(shards.parent) == []


def test_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    def broken() -> Iterator[pa.Table]:
        yield from _tables([5])
        raise DataError("bad input", path="x.txt", line=3)

    with pytest.raises(DataError, match="x.txt:3"):
        write_shards(broken(), tmp_path / "ds", format="demo", rows_per_shard=2)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old(shards: Path) -> None:
    def broken() -> Iterator[pa.Table]:
        yield from _tables([5])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_shards(broken(), shards, format="demo", overwrite=True)
    assert read_manifest(shards)["rows"] == 10
    assert _leftovers(shards.parent) == []


def _edit_manifest(dst: Path, **changes: object) -> None:
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest.update(changes)
    (dst / "manifest.json").write_text(json.dumps(manifest))


def test_missing_folder_and_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as err:
        read_manifest(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        read_manifest(tmp_path / "file")


def test_manifest_missing(shards: Path) -> None:
    (shards / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json not found") as err:
        read_manifest(shards)
    assert str(shards / "manifest.json") in str(err.value)


def test_manifest_corrupt_json(shards: Path) -> None:
    (shards / "manifest.json").write_text('{\n  "format": "demo",\n  oops\n}')
    with pytest.raises(DataError, match="invalid JSON") as err:
        read_manifest(shards)
    assert f"{shards / 'manifest.json'}:3:" in str(err.value)


def test_manifest_missing_keys_and_format(shards: Path) -> None:
    with pytest.raises(DataError, match="format is 'demo', expected 'jigsaws'"):
        read_manifest(shards, expected_format="jigsaws")
    manifest = json.loads((shards / "manifest.json").read_text())
    del manifest["shards"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="missing key.*shards") as err:
        read_manifest(shards)
    assert "manifest.json" in str(err.value)


def test_manifest_bad_shard_entries(shards: Path) -> None:
    _edit_manifest(shards, shards=[{"file": "../x.parquet", "rows": 1}], rows=1)
    with pytest.raises(DataError, match="expected \"shards\" to be a list"):
        read_manifest(shards)
    _edit_manifest(shards, shards=[{"file": "part-00000.parquet", "rows": 4}], rows=7)
    with pytest.raises(DataError, match="expected 4"):
        read_manifest(shards)


def test_shard_missing(shards: Path) -> None:
    (shards / "part-00001.parquet").unlink()
    with pytest.raises(DataError, match="missing") as err:
        read_manifest(shards)
    assert str(shards / "part-00001.parquet") in str(err.value)


def test_lying_row_count(shards: Path) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][2]["rows"] = 3
    manifest["rows"] = 11
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="holds 2 rows, manifest.json lists 3") as err:
        read_manifest(shards)
    assert "part-00002.parquet" in str(err.value)


def test_truncated_parquet(shards: Path) -> None:
    path = shards / "part-00001.parquet"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match="unreadable Parquet footer") as err:
        shard_paths(shards)
    assert str(path) in str(err.value)
