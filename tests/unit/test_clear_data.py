"""Tests of raylab.data.clear: CLEAR stream converter, readers and the synthetic drift sample."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from raylab.data.clear import (
    bucket_paths,
    buckets,
    clear_class_names,
    convert_clear,
    parse_buckets,
    read_stream_manifest,
    write_clear_sample,
)
from raylab.data.imagefolder import SAMPLE_CLASSES, convert_imagefolder, write_image_sample
from raylab.data.inspect import format_inspection, inspect_shards
from raylab.errors import ConfigError, DataError

TINY = dict(classes=3, train_per_class=50, test_per_class=10, size=16)
TINY_NAMES = sorted(SAMPLE_CLASSES[:3])
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]


# ------------------------------------------------------------------------------ helpers

def _reference_counts(n_classes: int, per_class: int, t: int, n_buckets: int) -> list[int]:
    """The README's class-prior formula, written out independently in loop form."""
    tau = 2 * t / (n_buckets - 1) - 1
    weights = [math.exp(0.8 * (-1 + 2 * k / (n_classes - 1)) * tau) for k in range(n_classes)]
    floor = math.ceil(0.25 * per_class)
    rest = n_classes * per_class - n_classes * floor
    share = [rest * w / sum(weights) for w in weights]
    counts = [math.floor(q) for q in share]
    by_fraction = sorted(range(n_classes), key=lambda k: (counts[k] - share[k], k))
    for k in by_fraction[:rest - sum(counts)]:
        counts[k] += 1
    return [floor + n for n in counts]


def _reference_drift(pixels: np.ndarray, t: int, n_buckets: int) -> np.ndarray:
    """The README's appearance formula: blur, contrast towards mean luminance, warmth."""
    s = t / (n_buckets - 1)
    image = Image.fromarray(pixels)
    if s > 0:
        image = image.filter(ImageFilter.GaussianBlur(0.3 * s * min(image.size) / 32))
    x = np.asarray(image, dtype=np.float64)
    luma = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]).mean()
    x = luma + (1 - 0.2 * s) * (x - luma)
    x[..., 0] *= 1 + 0.25 * s
    x[..., 2] *= 1 - 0.25 * s
    return np.clip(x, 0, 255).round()


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def _bucket_warmth(raw: Path, t: int) -> float:
    """Warmth of bucket t: mean over its images of mean(R - B), in grey levels."""
    images = [_pixels(p) for p in sorted((raw / str(t)).rglob("*.png"))]
    return float(np.mean([(x[..., 0] - x[..., 2]).mean() for x in images]))


def _paired_stats(source: Path, raw: Path, sources: dict[str, str]) -> tuple[float, float]:
    """Warmth gain (R/B ratio, output over source) and sharpness kept, over one bucket."""
    pairs = [(_pixels(raw / out), _pixels(source / src)) for out, src in sources.items()]
    red, blue = ([sum(x[..., c].sum() for x in side) for side in zip(*pairs)] for c in (0, 2))
    grad = [sum(np.abs(np.diff(x.mean(-1), axis=1)).sum() for x in side) for side in zip(*pairs)]
    return (red[0] / red[1]) / (blue[0] / blue[1]), grad[0] / grad[1]


def _folder_counts(raw: Path, t: int) -> dict[str, int]:
    return {p.name: len(list(p.glob("*.png"))) for p in sorted((raw / str(t)).iterdir())}


def _rows(dst: Path, bucket: int) -> list[dict]:
    return [r for p in bucket_paths(dst, bucket) for r in pq.read_table(p).to_pylist()]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def _png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _stream(root: Path, layout: dict[str, dict[str, int] | int]) -> Path:
    """A raw stream: ``{bucket: {class: n}}``, or ``{bucket: n}`` for loose images."""
    root.mkdir(parents=True, exist_ok=True)
    for bucket, classes in layout.items():
        (root / bucket).mkdir(exist_ok=True)
        if isinstance(classes, int):
            for i in range(classes):
                _png(root / bucket / f"{i}.png", seed=i)
        else:
            for name, n in classes.items():
                (root / bucket / name).mkdir(exist_ok=True)
                for i in range(n):
                    _png(root / bucket / name / f"{i}.png", seed=i)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny generated ImageFolder and an 11-bucket CLEAR sample drawn from it."""
    root = tmp_path_factory.mktemp("clear")
    source = write_image_sample(root / "source", seed=1, **TINY)
    return source, write_clear_sample(source, root / "raw", per_class_per_bucket=4, seed=3)


@pytest.fixture(scope="module")
def tiny_stream(tiny: tuple[Path, Path]) -> tuple[Path, dict]:
    _, raw = tiny
    return raw.parent / "stream", convert_clear(raw, raw.parent / "stream", rows_per_shard=5)


# ------------------------------------------------------------------------------ sample

def test_sample_layout_and_docs(tiny: tuple[Path, Path]) -> None:
    _, raw = tiny
    assert sorted(int(p.name) for p in raw.iterdir() if p.is_dir()) == list(range(11))
    assert not [p for p in (raw / "0").iterdir() if p.is_dir()]  # bucket 0: unlabeled
    assert len(list((raw / "0").glob("*.png"))) == 3 * 4
    for t in range(1, 11):
        assert sorted(_folder_counts(raw, t)) == TINY_NAMES
    readme = (raw / "README.txt").read_text()
    assert readme.startswith("SYNTHETIC CLEAR")
    for text in ("NOT the CLEAR benchmark", "sigma_t = 0.3 * s_t", "c_t = 1 - 0.2 * s_t",
                 "R <- R (1 + 0.25 s_t)", "exp(0.8 d_k tau_t)", "ceil(0.25 * P)"):
        assert text in readme
    drift = json.loads((raw / "drift.json").read_text())
    assert drift["synthetic"] is True and drift["class_names"] == TINY_NAMES
    assert [b["bucket"] for b in drift["buckets"]] == list(range(11))
    assert [b["labeled"] for b in drift["buckets"]] == [False] + [True] * 10
    assert drift["buckets"][10]["contrast"] == pytest.approx(0.8)


def test_sample_prior_drift_follows_formula(tiny: tuple[Path, Path]) -> None:
    _, raw = tiny
    drift = json.loads((raw / "drift.json").read_text())
    for t in range(11):
        expected = dict(zip(TINY_NAMES, _reference_counts(3, 4, t, 11)))
        assert drift["buckets"][t]["counts"] == expected
        assert sum(expected.values()) == 12 and min(expected.values()) >= 1
        if t:
            assert _folder_counts(raw, t) == expected
    first = [b["counts"][TINY_NAMES[0]] for b in drift["buckets"]]
    last = [b["counts"][TINY_NAMES[-1]] for b in drift["buckets"]]
    assert first == sorted(first, reverse=True) and last == sorted(last) and last[-1] > last[0]


def test_sample_uses_each_image_once(tiny: tuple[Path, Path]) -> None:
    source, raw = tiny
    drift = json.loads((raw / "drift.json").read_text())
    sources = {out: src for b in drift["buckets"] for out, src in b["sources"].items()}
    written = {p.relative_to(raw).as_posix() for p in raw.rglob("*.png")}
    assert set(sources) == written and len(written) == 11 * 12
    assert len(set(sources.values())) == len(sources)  # no source image reused
    assert {s.split("/")[0] for s in sources.values()} == {"train", "test"}
    for out, src in sources.items():
        if not out.startswith("0/"):
            assert out.split("/")[1] == src.split("/")[1]  # class kept
        assert (source / src).is_file()


def test_sample_appearance_drift(tiny: tuple[Path, Path]) -> None:
    source, raw = tiny
    drift = json.loads((raw / "drift.json").read_text())
    for t in (0, 1, 6, 10):  # every image is the documented transform of its source
        for out, src in list(drift["buckets"][t]["sources"].items())[:4]:
            expected = _reference_drift(_pixels(source / src).astype(np.uint8), t, 11)
            assert np.abs(_pixels(raw / out) - expected).max() <= 1
    # Random shape colours make bucket means noisy here; compare each image with its source.
    warmth, sharpness = zip(*(_paired_stats(source, raw, b["sources"])
                              for b in drift["buckets"]))
    # Clipping of saturated colours makes them monotone only coarsely (CIFAR: strictly).
    assert warmth[0] == pytest.approx(1, abs=0.02) and warmth[0] < warmth[5] < warmth[10]
    assert warmth[10] > 1.5
    assert sharpness[0] == pytest.approx(1, abs=0.02) and sharpness[0] > sharpness[5]
    assert sharpness[5] > sharpness[10] and sharpness[10] < 0.85


def test_sample_deterministic_and_replaceable(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    source, raw = tiny
    again = write_clear_sample(source, tmp_path / "a", per_class_per_bucket=4, seed=3)
    assert _digest(again) == _digest(raw)
    other = write_clear_sample(source, tmp_path / "a", per_class_per_bucket=4, seed=4)
    assert _digest(other) != _digest(raw)  # an earlier sample is replaced
    assert _leftovers(tmp_path) == []


def test_sample_errors_write_nothing(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    source, _ = tiny
    with pytest.raises(DataError, match="source too small for 11 buckets of 9 images") as err:
        write_clear_sample(source, tmp_path / "out", per_class_per_bucket=9)
    msg = str(err.value)
    assert str(source) in msg and "has 60" in msg and "per_class_per_bucket <= 5 fits" in msg
    with pytest.raises(ConfigError, match="n_buckets: expected 3..100, got 2"):
        write_clear_sample(source, tmp_path / "out", n_buckets=2)
    with pytest.raises(ConfigError, match="per_class_per_bucket: expected >= 1"):
        write_clear_sample(source, tmp_path / "out", per_class_per_bucket=0)
    with pytest.raises(DataError, match="class\\(es\\) cat not found in the source; present: "
                                        "disk, ring, triangle"):
        write_clear_sample(source, tmp_path / "out", classes=["disk", "cat"])
    with pytest.raises(ConfigError, match="classes: expected at least two class names"):
        write_clear_sample(source, tmp_path / "out", classes=["disk"])
    with pytest.raises(DataError, match="source folder not found"):
        write_clear_sample(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="folder is not empty"):
        write_clear_sample(source, tmp_path / "mine", per_class_per_bucket=2)
    assert not (tmp_path / "out").exists() and (tmp_path / "mine" / "keep.txt").exists()
    assert _leftovers(tmp_path) == []


def test_sample_class_subset_and_bucket_count(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    source, _ = tiny
    raw = write_clear_sample(source, tmp_path / "raw", n_buckets=4, per_class_per_bucket=6,
                             classes=["ring", "disk"])
    assert sorted(p.name for p in raw.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    for t in (1, 2, 3):
        assert _folder_counts(raw, t) == dict(zip(["disk", "ring"],
                                                  _reference_counts(2, 6, t, 4)))


# -------------------------------------------------------------------------- converting

def test_convert_round_trip(tiny: tuple[Path, Path], tiny_stream: tuple[Path, dict]) -> None:
    _, raw = tiny
    dst, summary = tiny_stream
    drift = json.loads((raw / "drift.json").read_text())
    assert summary["buckets"] == list(range(11)) == buckets(dst)
    assert summary["class_names"] == TINY_NAMES == clear_class_names(dst)
    assert summary["unlabeled_buckets"] == [0] and summary["skipped"] == []
    assert summary["rows"] == 132 and summary["bucket_rows"] == {str(t): 12 for t in range(11)}
    assert summary["counts"]["0"] == {}
    for t in range(1, 11):
        assert summary["counts"][str(t)] == drift["buckets"][t]["counts"]
    for t in range(11):
        paths = bucket_paths(dst, t)
        assert all(Path(p).is_absolute() and f"bucket_{t:02d}" in p for p in paths)
        assert [pq.read_metadata(p).num_rows for p in paths] == [5, 5, 2]
        for row in _rows(dst, t):
            assert row["bucket"] == t and row["image"] == (raw / row["path"]).read_bytes()
            assert (row["height"], row["width"]) == (16, 16)
            if t == 0:
                assert row["label"] == -1
            else:  # one label per class name in every bucket
                assert TINY_NAMES[row["label"]] == row["path"].split("/")[1]
    assert _leftovers(dst.parent) == []


def test_stream_manifest(tiny_stream: tuple[Path, dict], tiny: tuple[Path, Path]) -> None:
    dst, summary = tiny_stream
    manifest = read_stream_manifest(dst)
    assert manifest["format"] == "clear"
    assert manifest["bucket_dirs"] == {str(t): f"bucket_{t:02d}" for t in range(11)}
    assert manifest["counts"] == summary["counts"]
    assert manifest["source"] == str(tiny[1].resolve())
    assert manifest["selection"] == {"classes": None, "buckets": None}
    assert manifest["schema"] == {"image": "binary", "label": "int32", "bucket": "int32",
                                  "path": "string", "height": "int32", "width": "int32"}
    bucket = json.loads((dst / "bucket_03" / "manifest.json").read_text())
    assert bucket["format"] == "clear_bucket" and bucket["extra"]["bucket"] == 3
    assert bucket["extra"]["class_names"] == TINY_NAMES
    with pytest.raises(DataError, match="bucket 11 not in this stream; present: 0-10"):
        bucket_paths(dst, 11)


def test_inspect_stream(tiny_stream: tuple[Path, dict]) -> None:
    dst, summary = tiny_stream
    info = inspect_shards(dst)
    assert info["format"] == "clear" and info["rows"] == 132
    assert info["buckets"] == list(range(11)) and info["class_names"] == TINY_NAMES
    assert info["counts"] == summary["counts"] and info["bucket_rows"] == summary["bucket_rows"]
    assert info["unlabeled_buckets"] == [0] and info["bucket_shards"]["4"] == 3
    text = format_inspection(info)
    assert "buckets: 11 in time order" in text and "(unlabeled)" in text
    assert "bucket 10" in text and "12 rows in 3 shard(s)" in text
    one = inspect_shards(dst / "bucket_02")
    assert one["format"] == "clear_bucket" and set(one["counts"]["bucket 2"]) == set(TINY_NAMES)


def test_labels_shared_and_bucket_zero_forms(tmp_path: Path) -> None:
    src = _stream(tmp_path / "loose", {"0": 3, "1": {"a": 2, "b": 1}, "2": {"b": 1, "c": 2}})
    summary = convert_clear(src, tmp_path / "s1")
    assert summary["class_names"] == ["a", "b", "c"] and summary["unlabeled_buckets"] == [0]
    assert summary["counts"] == {"0": {}, "1": {"a": 2, "b": 1, "c": 0},
                                 "2": {"a": 0, "b": 1, "c": 2}}
    assert {r["path"]: r["label"] for r in _rows(tmp_path / "s1", 2)} == {
        "2/b/0.png": 1, "2/c/0.png": 2, "2/c/1.png": 2}
    one = _stream(tmp_path / "one", {"0": {"unlabeled": 2}, "1": {"a": 1, "b": 1}})
    assert convert_clear(one, tmp_path / "s2")["bucket_rows"]["0"] == 2
    labelled = _stream(tmp_path / "lab", {"0": {"a": 1, "b": 1}, "1": {"a": 1, "b": 1}})
    summary = convert_clear(labelled, tmp_path / "s3")
    assert summary["unlabeled_buckets"] == [] and summary["counts"]["0"] == {"a": 1, "b": 1}
    _png(labelled / "0" / "loose.png")
    with pytest.raises(DataError, match="bucket 0 mixes image files and class folders"):
        convert_clear(labelled, tmp_path / "s4")


# ------------------------------------------------------------------------------ filters

@pytest.fixture()
def three(tmp_path: Path) -> Path:
    return _stream(tmp_path / "raw", {"0": 2, "1": {"a": 2, "b": 1, "c": 1},
                                      "2": {"a": 1, "b": 2, "c": 1}, "10": {"a": 1, "c": 3}})


def test_filters(three: Path, tmp_path: Path) -> None:
    summary = convert_clear(three, tmp_path / "ac", classes="c,a", buckets="1-2")
    assert summary["buckets"] == [1, 2] and summary["class_names"] == ["a", "c"]
    assert summary["counts"] == {"1": {"a": 2, "c": 1}, "2": {"a": 1, "c": 1}}
    assert {r["label"] for r in _rows(tmp_path / "ac", 2)} == {0, 1}
    assert read_stream_manifest(tmp_path / "ac")["selection"] == {"classes": ["a", "c"],
                                                                  "buckets": [1, 2]}
    # A bucket subset keeps the labels of the whole stream.
    late = convert_clear(three, tmp_path / "late", buckets=[10, 0])
    assert late["buckets"] == [0, 10] and late["class_names"] == ["a", "b", "c"]
    assert late["counts"]["10"] == {"a": 1, "b": 0, "c": 3}
    assert parse_buckets("0, 2-4,3") == [0, 2, 3, 4] and parse_buckets([5, 1]) == [1, 5]
    for spec in ("a", "3-", "-1", "", "5-3", [1.5]):
        with pytest.raises(ConfigError, match="buckets: expected integers and ranges"):
            parse_buckets(spec)


def test_filter_errors(three: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(DataError, match="class\\(es\\) x, y not found in any labelled bucket; "
                                        "present: a, b, c") as err:
        convert_clear(three, out, classes=["y", "a", "x"])
    assert str(three) in str(err.value)
    with pytest.raises(DataError, match="bucket\\(s\\) 3-5, 11 not found; present: 0-2, 10"):
        convert_clear(three, out, buckets="1,3-5,11")
    with pytest.raises(ConfigError, match="classes: expected at least one class"):
        convert_clear(three, out, classes=" , ")
    with pytest.raises(DataError, match="bucket 10 is empty: no image files of the selected "
                                        "classes") as err:
        convert_clear(three, out, classes="b")
    assert str(three / "10") in str(err.value)
    assert not out.exists() and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------- errors

def test_source_errors(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(DataError, match="source folder not found; expected <src>/<bucket>/"):
        convert_clear(tmp_path / "nope", out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        convert_clear(tmp_path / "file", out)
    (tmp_path / "empty" / ".git").mkdir(parents=True)
    with pytest.raises(DataError, match="no bucket folders") as err:
        convert_clear(tmp_path / "empty", out)
    assert str(tmp_path / "empty") in str(err.value)
    odd = _stream(tmp_path / "clear10", {"labeled_images": {"a": 1}, "1": {"a": 1}})
    with pytest.raises(DataError, match="non-integer bucket folder name\\(s\\) labeled_images;"
                                        ".*clear10/labeled_images"):
        convert_clear(odd, out)
    twice = _stream(tmp_path / "twice", {"1": {"a": 1}, "01": {"a": 1}})
    with pytest.raises(DataError, match="folders 01 and 1 are the same bucket"):
        convert_clear(twice, out)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_bucket_errors(tmp_path: Path) -> None:
    out = tmp_path / "out"
    no_classes = _stream(tmp_path / "a", {"0": 1, "1": {"x": 1}, "2": 2})
    with pytest.raises(DataError, match="labelled bucket has no class folders but 2 image "
                                        "file\\(s\\) directly inside") as err:
        convert_clear(no_classes, out)
    assert str(no_classes / "2") in str(err.value)
    empty = _stream(tmp_path / "b", {"0": 1, "1": {"x": 1}, "2": {"x": 0, "y": 0}})
    (empty / "2" / "x" / ".hidden.png").write_bytes(b"x")
    with pytest.raises(DataError, match="bucket 2 is empty: no image files;") as err:
        convert_clear(empty, out)
    assert str(empty / "2") in str(err.value)
    zero = _stream(tmp_path / "c", {"0": 0, "1": {"x": 1}})
    with pytest.raises(DataError, match="bucket 0 is empty"):
        convert_clear(zero, out)
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.fixture()
def with_bad(tmp_path: Path) -> Path:
    """Good buckets 0-2 and, in the last bucket, a truncated PNG and a text file."""
    src = _stream(tmp_path / "raw", {"0": 2, "1": {"a": 2, "b": 2}, "2": {"a": 2, "b": 1}})
    (src / "2" / "b" / "cut.png").write_bytes((src / "2" / "b" / "0.png").read_bytes()[:-40])
    (src / "2" / "a" / "notes.txt").write_text("x")
    return src


def test_bad_files_fail_and_write_nothing(with_bad: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        convert_clear(with_bad, tmp_path / "out")
    msg = str(err.value)
    assert msg.startswith(f"{with_bad}: 2 bad image file(s)")
    assert "2/a/notes.txt (not an image file (extension .txt" in msg
    assert "2/b/cut.png (cannot decode" in msg
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_skip_bad_records_them(with_bad: Path, tmp_path: Path) -> None:
    summary = convert_clear(with_bad, tmp_path / "out", skip_bad=True)
    assert summary["bucket_rows"] == {"0": 2, "1": 4, "2": 3}
    assert [s["path"] for s in summary["skipped"]] == ["2/a/notes.txt", "2/b/cut.png"]
    assert read_stream_manifest(tmp_path / "out")["skipped"] == summary["skipped"]
    bucket = json.loads((tmp_path / "out" / "bucket_02" / "manifest.json").read_text())
    assert [s["path"] for s in bucket["extra"]["skipped"]] == ["2/a/notes.txt", "2/b/cut.png"]
    info = inspect_shards(tmp_path / "out")
    assert "skipped 2 bad file(s): 2/a/notes.txt" in format_inspection(info)
    only_bad = _stream(tmp_path / "r2", {"1": {"a": 1}, "2": {"a": 0}})
    (only_bad / "2" / "a" / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="bucket 2 is empty: none of its 1 image file"):
        convert_clear(only_bad, tmp_path / "out2", skip_bad=True)
    assert not (tmp_path / "out2").exists()


def test_existing_dst_and_overwrite(three: Path, tmp_path: Path) -> None:
    convert_clear(three, tmp_path / "out")
    with pytest.raises(DataError, match="already exists"):
        convert_clear(three, tmp_path / "out", buckets="1")
    assert convert_clear(three, tmp_path / "out", buckets="1", overwrite=True)["rows"] == 4
    assert buckets(tmp_path / "out") == [1] and _leftovers(tmp_path) == []


def test_readers_reject_other_folders(three: Path, tmp_path: Path) -> None:
    images = write_image_sample(tmp_path / "img", classes=2, train_per_class=1,
                                test_per_class=1, size=8)
    convert_imagefolder(images, tmp_path / "shards")
    with pytest.raises(DataError, match="format is 'imagefolder', expected 'clear'"):
        buckets(tmp_path / "shards")
    with pytest.raises(DataError, match="stream folder not found"):
        clear_class_names(tmp_path / "nope")
    convert_clear(three, tmp_path / "out")
    path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["bucket_rows"]["2"] = 7
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="bucket 2 holds 4 rows, manifest.json lists 7"):
        read_stream_manifest(tmp_path / "out")
    manifest["bucket_rows"] = [4, 4]
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match='expected "buckets" to be a list of ints'):
        buckets(tmp_path / "out")
    del manifest["class_names"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="missing key\\(s\\) class_names"):
        bucket_paths(tmp_path / "out", 1)


# ---------------------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def cifar_stream(real_data_root: Path, tmp_path_factory: pytest.TempPathFactory,
                 ) -> tuple[Path, Path, Path, dict]:
    src = real_data_root / "cifar10"
    if not src.is_dir():
        pytest.skip(f"real CIFAR-10 copy not found at {src}")
    root = tmp_path_factory.mktemp("cifar_clear")
    raw = write_clear_sample(src, root / "raw", seed=0)
    return src, raw, root / "stream", convert_clear(raw, root / "stream")


@pytest.mark.data
def test_real_cifar_sample(cifar_stream: tuple[Path, Path, Path, dict]) -> None:
    src, raw, dst, summary = cifar_stream
    drift = json.loads((raw / "drift.json").read_text())
    assert summary["class_names"] == CIFAR_NAMES and summary["unlabeled_buckets"] == [0]
    assert summary["bucket_rows"] == {str(t): 400 for t in range(11)}
    for t in range(1, 11):
        expected = dict(zip(CIFAR_NAMES, _reference_counts(10, 40, t, 11)))
        assert summary["counts"][str(t)] == expected == drift["buckets"][t]["counts"]
        assert min(expected.values()) >= 10
    assert summary["counts"]["1"]["airplane"] > 2 * summary["counts"]["10"]["airplane"]
    assert summary["counts"]["10"]["truck"] > 2 * summary["counts"]["1"]["truck"]
    sources = [s for b in drift["buckets"] for s in b["sources"].values()]
    assert len(sources) == len(set(sources)) == 4400
    assert Counter(s.split("/")[0] for s in sources).keys() == {"train", "test"}
    warmth = [_bucket_warmth(raw, t) for t in range(11)]
    assert all(a < b for a, b in zip(warmth, warmth[1:])), warmth
    assert warmth[10] - warmth[0] > 40  # grey levels
    # The class mix changes the mean sharpness too; compare each image with its source.
    sharpness = [_paired_stats(src, raw, b["sources"])[1] for b in drift["buckets"]]
    assert all(a > b for a, b in zip(sharpness, sharpness[1:])), sharpness
    labels = [r["label"] for r in _rows(dst, 10)]
    assert Counter(labels) == {k: n for k, n in enumerate(_reference_counts(10, 40, 10, 11))}
