"""Tests of raylab.data.imagefolder: conversion, validation, readers, synthetic sample."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raylab.data.imagefolder import (
    IMAGE_EXTENSIONS,
    SAMPLE_CLASSES,
    class_names,
    convert_imagefolder,
    split_paths,
    write_image_sample,
)
from raylab.data.inspect import format_inspection, inspect_shards
from raylab.data.shards import read_manifest, write_shards
from raylab.errors import ConfigError, DataError

SMALL = dict(classes=3, train_per_class=8, test_per_class=4, size=16)


def _rows(dst: Path, split: str) -> list[dict]:
    """All rows of one split, read through split_paths."""
    return [r for p in split_paths(dst, split) for r in pq.read_table(p).to_pylist()]


def _leftovers(parent: Path) -> list[str]:
    """Hidden temporary folders left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _jpeg(path: Path, seed: int = 0, size: int = 16) -> bytes:
    """Write a small noisy JPEG and return its bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return path.read_bytes()


def _tree(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """An ImageFolder tree: ``{split: {class: number of JPEGs}}``."""
    for split, classes in layout.items():
        for name, n in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _jpeg(root / split / name / f"{i}.jpg", seed=i)
    return root


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_sample(tmp_path_factory.mktemp("img") / "raw", seed=1, **SMALL)


@pytest.fixture(scope="module")
def converted(sample: Path) -> tuple[Path, dict]:
    dst = sample.parent / "shards"
    return dst, convert_imagefolder(sample, dst, rows_per_shard=10)


# ------------------------------------------------------------------------------ sample

def test_sample_layout_and_readme(sample: Path) -> None:
    names = sorted(SAMPLE_CLASSES[:3])
    assert sorted(p.name for p in (sample / "train").iterdir()) == names
    assert sorted(p.name for p in (sample / "test").iterdir()) == names
    assert len(list((sample / "train" / names[0]).glob("*.png"))) == 8
    assert len(list((sample / "test" / names[0]).glob("*.png"))) == 4
    with Image.open(sample / "train" / names[0] / "0000.png") as image:
        assert image.size == (16, 16) and image.mode == "RGB"
    assert (sample / "README.txt").read_text().startswith("SYNTHETIC IMAGE")


def test_sample_deterministic_and_replaceable(tmp_path: Path) -> None:
    a = write_image_sample(tmp_path / "a", seed=3, **SMALL)
    b = write_image_sample(tmp_path / "b", seed=3, **SMALL)
    c = write_image_sample(tmp_path / "c", seed=4, **SMALL)
    name = "train/disk/0003.png"
    assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / name).read_bytes() != (c / name).read_bytes()
    write_image_sample(a, seed=4, **SMALL)  # an earlier sample is replaced
    assert (a / name).read_bytes() == (c / name).read_bytes()
    assert _leftovers(tmp_path) == []


def test_sample_refuses_other_folders_and_bad_args(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not empty") as err:
        write_image_sample(tmp_path / "mine", **SMALL)
    assert str(tmp_path / "mine") in str(err.value)
    with pytest.raises(ConfigError, match="classes: expected 2..10"):
        write_image_sample(tmp_path / "x", classes=11)
    with pytest.raises(ConfigError, match="test_per_class"):
        write_image_sample(tmp_path / "x", test_per_class=0)
    assert (tmp_path / "mine" / "keep.txt").exists() and not (tmp_path / "x").exists()


# -------------------------------------------------------------------------- converting

def test_convert_sample(converted: tuple[Path, dict], sample: Path) -> None:
    dst, summary = converted
    names = sorted(SAMPLE_CLASSES[:3])
    assert summary["rows"] == 36 and summary["splits"] == {"test": 12, "train": 24}
    assert summary["class_names"] == names == class_names(dst)
    assert summary["counts"] == {"test": dict.fromkeys(names, 4),
                                 "train": dict.fromkeys(names, 8)}
    assert summary["skipped"] == []
    for split in ("train", "test"):
        rows = _rows(dst, split)
        assert {r["split"] for r in rows} == {split}
        for row in rows:
            folder_split, folder_class, _ = row["path"].split("/")
            assert folder_split == split and names[row["label"]] == folder_class
            assert row["image"] == (sample / row["path"]).read_bytes()
            assert (row["height"], row["width"]) == (16, 16)
    assert _leftovers(dst.parent) == []


def test_manifest_and_shards_per_split(converted: tuple[Path, dict]) -> None:
    dst, summary = converted
    manifest = read_manifest(dst, expected_format="imagefolder")
    extra = manifest["extra"]
    assert set(extra) >= {"class_names", "split_shards", "counts", "skipped", "source"}
    # 24 train rows in shards of 10 -> 10, 10, 4; 12 test rows -> 10, 2; never mixed.
    assert [len(extra["split_shards"][s]) for s in ("test", "train")] == [2, 3]
    assert extra["counts"] == summary["counts"]
    assert manifest["schema"] == {"image": "binary", "label": "int32", "split": "string",
                                  "path": "string", "height": "int32", "width": "int32"}
    paths = split_paths(dst, "train")
    assert all(Path(p).is_absolute() for p in paths)
    assert [pq.read_metadata(p).num_rows for p in paths] == [10, 10, 4]
    first = pq.read_table(paths[0]).column("label").to_pylist()
    assert len(set(first)) == 3  # shuffled: the first shard mixes every class
    with pytest.raises(DataError, match="split 'val' not in this shard folder; present: "
                                        "test, train"):
        split_paths(dst, "val")


def test_shuffle_is_seeded(tmp_path: Path, sample: Path) -> None:
    def order(seed: int, name: str) -> list[str]:
        convert_imagefolder(sample, tmp_path / name, seed=seed, splits=["train"])
        return [r["path"] for r in _rows(tmp_path / name, "train")]

    assert order(5, "a") == order(5, "b") != order(6, "c")


def test_inspect(converted: tuple[Path, dict]) -> None:
    dst, summary = converted
    info = inspect_shards(dst)
    assert info["format"] == "imagefolder" and info["rows"] == 36
    assert info["counts"] == summary["counts"]
    assert info["class_names"] == summary["class_names"]
    assert info["split_shards"] == {"test": 2, "train": 3}
    assert info["skipped"] == {"bad_file": []}
    text = format_inspection(info)
    assert "classes: 3" in text and "24 rows in 3 shard(s)" in text and "disk=8" in text


def test_labels_shared_across_splits(tmp_path: Path) -> None:
    src = _tree(tmp_path / "raw", {"train": {"a": 2, "b": 2, "c": 2}, "test": {"a": 1, "c": 1}})
    summary = convert_imagefolder(src, tmp_path / "all")
    assert summary["class_names"] == ["a", "b", "c"]
    assert summary["counts"]["test"] == {"a": 1, "b": 0, "c": 1}
    assert {r["path"]: r["label"] for r in _rows(tmp_path / "all", "test")} == {
        "test/a/0.jpg": 0, "test/c/0.jpg": 2}
    # Converting one split alone keeps the labels of the whole tree.
    only = convert_imagefolder(src, tmp_path / "test_only", splits=["test"])
    assert only["class_names"] == ["a", "b", "c"] and only["splits"] == {"test": 2}
    assert list(read_manifest(tmp_path / "test_only")["extra"]["split_shards"]) == ["test"]


def test_extensions_hidden_files_and_nesting(tmp_path: Path) -> None:
    src = _tree(tmp_path / "raw", {"train": {"a": 1, "b": 1}})
    Image.new("RGB", (5, 7)).save(src / "train" / "a" / "UPPER.PNG")
    Image.new("L", (4, 4)).save(src / "train" / "b" / "grey.bmp")
    _jpeg(src / "train" / "b" / "nested" / "deep.jpeg")
    (src / "train" / "a" / ".DS_Store").write_bytes(b"\0junk")
    (src / "train" / ".hidden_class").mkdir()
    (src / "README.txt").write_text("not a split")
    summary = convert_imagefolder(src, tmp_path / "out")
    assert summary["counts"] == {"train": {"a": 2, "b": 3}} and summary["skipped"] == []
    sizes = {r["path"]: (r["height"], r["width"]) for r in _rows(tmp_path / "out", "train")}
    assert sizes["train/a/UPPER.PNG"] == (7, 5) and "train/b/nested/deep.jpeg" in sizes
    assert {".jpg", ".jpeg", ".png", ".webp", ".tiff"} <= set(IMAGE_EXTENSIONS)


# ---------------------------------------------------------------------------- bad files

@pytest.fixture()
def with_bad(tmp_path: Path) -> Path:
    """A tree with a truncated JPEG and a text file among good images."""
    src = _tree(tmp_path / "raw", {"train": {"cat": 3, "dog": 3}, "test": {"cat": 1, "dog": 1}})
    data = _jpeg(src / "train" / "cat" / "cut.jpg", seed=9, size=64)
    (src / "train" / "cat" / "cut.jpg").write_bytes(data[: len(data) // 2])
    (src / "test" / "dog" / "notes.txt").write_text("labels are in the folder names\n")
    return src


def test_bad_files_fail_and_write_nothing(with_bad: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        convert_imagefolder(with_bad, tmp_path / "out")
    msg = str(err.value)
    assert msg.startswith(f"{with_bad}: 2 bad image file(s)")
    assert "test/dog/notes.txt (not an image file (extension .txt" in msg
    assert "train/cat/cut.jpg (cannot decode (image file is truncated" in msg
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_skip_bad_records_them(with_bad: Path, tmp_path: Path) -> None:
    summary = convert_imagefolder(with_bad, tmp_path / "out", skip_bad=True)
    assert summary["splits"] == {"test": 2, "train": 6}
    assert [s["path"] for s in summary["skipped"]] == ["test/dog/notes.txt",
                                                       "train/cat/cut.jpg"]
    extra = read_manifest(tmp_path / "out")["extra"]
    assert extra["skipped"] == summary["skipped"]
    info = inspect_shards(tmp_path / "out")
    assert info["skipped"]["bad_file"] == summary["skipped"]
    assert "skipped 2 bad file(s): test/dog/notes.txt" in format_inspection(info)


def test_many_bad_files_are_counted_and_listed_briefly(tmp_path: Path) -> None:
    src = _tree(tmp_path / "raw", {"train": {"a": 1}})
    for i in range(13):
        (src / "train" / "a" / f"fake{i:02d}.jpg").write_text("not a jpeg")
    with pytest.raises(DataError, match=r"13 bad image file\(s\)") as err:
        convert_imagefolder(src, tmp_path / "out")
    msg = str(err.value)
    assert "fake09.jpg (not a recognised image format)" in msg and "fake10" not in msg
    assert msg.endswith("and 3 more")


def test_split_without_any_decodable_image(tmp_path: Path) -> None:
    src = _tree(tmp_path / "raw", {"train": {"a": 1}, "test": {"a": 0}})
    (src / "test" / "a" / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="none of the split's 1 image file") as err:
        convert_imagefolder(src, tmp_path / "out", skip_bad=True)
    assert str(src / "test") in str(err.value)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------- errors

def test_missing_src_and_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="source folder not found; expected <src>/<split>/"):
        convert_imagefolder(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        convert_imagefolder(tmp_path / "file", tmp_path / "out")


def test_no_split_folders(tmp_path: Path) -> None:
    (tmp_path / "raw" / ".git").mkdir(parents=True)
    (tmp_path / "raw" / "a.jpg").write_text("x")
    with pytest.raises(DataError, match="no split folders") as err:
        convert_imagefolder(tmp_path / "raw", tmp_path / "out")
    assert str(tmp_path / "raw") in str(err.value)


def test_split_without_class_folders(tmp_path: Path) -> None:
    _jpeg(tmp_path / "raw" / "train" / "0.jpg")
    with pytest.raises(DataError, match="no class folders but 1 image file") as err:
        convert_imagefolder(tmp_path / "raw", tmp_path / "out")
    assert str(tmp_path / "raw" / "train") in str(err.value)


def test_unknown_splits(tmp_path: Path) -> None:
    src = _tree(tmp_path / "raw", {"train": {"a": 1}, "test": {"a": 1}})
    with pytest.raises(DataError, match="split\\(s\\) val, dev not found; present: test, "
                                        "train"):
        convert_imagefolder(src, tmp_path / "out", splits=["train", "val", "dev"])
    with pytest.raises(ConfigError, match="at least one split"):
        convert_imagefolder(src, tmp_path / "out", splits=[])


def test_split_without_images(tmp_path: Path) -> None:
    src = _tree(tmp_path / "raw", {"train": {"a": 1}, "test": {"a": 0, "b": 0}})
    (src / "test" / "a" / ".hidden.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="split has no image files") as err:
        convert_imagefolder(src, tmp_path / "out")
    assert str(src / "test") in str(err.value)


def test_existing_dst_and_overwrite(tmp_path: Path) -> None:
    src = _tree(tmp_path / "raw", {"train": {"a": 2, "b": 1}})
    convert_imagefolder(src, tmp_path / "out")
    with pytest.raises(DataError, match="already exists"):
        convert_imagefolder(src, tmp_path / "out", splits=["train"])
    shutil.rmtree(src / "train" / "b")
    assert convert_imagefolder(src, tmp_path / "out", overwrite=True)["rows"] == 2
    assert class_names(tmp_path / "out") == ["a"] and _leftovers(tmp_path) == []


def test_readers_reject_other_formats(tmp_path: Path) -> None:
    write_shards([pa.table({"x": [1]})], tmp_path / "demo", format="demo")
    with pytest.raises(DataError, match="format is 'demo', expected 'imagefolder'"):
        class_names(tmp_path / "demo")
    manifest_path = tmp_path / "demo" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format"] = "imagefolder"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match='"class_names"'):
        split_paths(tmp_path / "demo", "train")


def test_write_shards_group_by_and_late_extra(tmp_path: Path) -> None:
    seen: list[int] = []

    def tables():
        for split, n in (("a", 3), ("a", 2), ("b", 4)):
            seen.append(n)
            yield pa.table({"split": [split] * n, "i": list(range(n))})

    manifest = write_shards(tables(), tmp_path / "ds", format="demo", rows_per_shard=4,
                            group_by="split", extra=lambda shards: {"seen": list(seen),
                                                                    "n": len(shards)})
    assert [(s["group"], s["rows"]) for s in manifest["shards"]] == [("a", 4), ("a", 1),
                                                                     ("b", 4)]
    assert manifest["extra"] == {"seen": [3, 2, 4], "n": 3}
    with pytest.raises(ValueError, match="one 'split' value per table"):
        write_shards([pa.table({"split": ["a", "b"]})], tmp_path / "bad", format="demo",
                     group_by="split")
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def real_cifar(real_data_root: Path, tmp_path_factory: pytest.TempPathFactory,
               ) -> tuple[Path, Path, dict]:
    src = real_data_root / "cifar10"
    if not src.is_dir():
        pytest.skip(f"real CIFAR-10 copy not found at {src}")
    dst = tmp_path_factory.mktemp("cifar") / "shards"
    return src, dst, convert_imagefolder(src, dst)


@pytest.mark.data
def test_real_cifar(real_cifar: tuple[Path, Path, dict]) -> None:
    src, dst, summary = real_cifar
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    assert summary["class_names"] == names == class_names(dst)
    assert summary["splits"] == {"test": 1000, "train": 5000} and summary["skipped"] == []
    assert summary["counts"] == {"test": dict.fromkeys(names, 100),
                                 "train": dict.fromkeys(names, 500)}
    assert [len(split_paths(dst, s)) for s in ("test", "train")] == [1, 5]
    for split, per_class in (("train", 500), ("test", 100)):
        table = pa.concat_tables(pq.read_table(p, columns=["label", "path", "height", "width"])
                                 for p in split_paths(dst, split))
        labels, paths = table.column("label").to_pylist(), table.column("path").to_pylist()
        assert Counter(labels) == dict.fromkeys(range(10), per_class)
        assert all(p.split("/")[1] == names[k] for k, p in zip(labels, paths))
        assert set(table.column("height").to_pylist()) == {32} == set(
            table.column("width").to_pylist())


@pytest.mark.data
def test_real_cifar_bytes_round_trip(real_cifar: tuple[Path, Path, dict]) -> None:
    src, dst, _ = real_cifar
    rows = pq.read_table(split_paths(dst, "test")[0]).slice(0, 40).to_pylist()
    for row in rows:
        assert row["image"] == (src / row["path"]).read_bytes()
        with Image.open(io.BytesIO(row["image"])) as a, Image.open(src / row["path"]) as b:
            assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


@pytest.mark.data
def test_real_cifar_copy_with_a_bad_file(real_cifar: tuple[Path, Path, dict],
                                         tmp_path: Path) -> None:
    src, _, _ = real_cifar
    raw = tmp_path / "raw"
    shutil.copytree(src / "test", raw / "test")
    (raw / "test" / "cat" / "0000.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"1 bad image file\(s\).*test/cat/0000.jpg"):
        convert_imagefolder(raw, tmp_path / "out")
    summary = convert_imagefolder(raw, tmp_path / "out", skip_bad=True)
    assert summary["counts"]["test"]["cat"] == 99
