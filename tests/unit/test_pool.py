"""Tests of raylab.data.pool: timestamped image pool converter (mtime, EXIF, CSV), reader,
inspect and the ``data convert pool`` command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from raylab.cli import main
from raylab.data.imagefolder import convert_imagefolder, write_image_sample
from raylab.data.inspect import format_inspection, inspect_shards
from raylab.data.pool import (
    convert_pool,
    exif_timestamp,
    parse_timestamp,
    read_pool_manifest,
    to_iso,
)
from raylab.data.shards import iter_rows
from raylab.errors import DataError

EXIF_IFD, DATETIME_ORIGINAL, OFFSET_ORIGINAL, DATETIME = 0x8769, 0x9003, 0x9011, 0x0132
# 2014-03-02 10:20:30 UTC, by hand: 44 years 1970-2013 with 11 leap days = 16071 days, then
# Jan 31 + Feb 28 + 1 = 60 days into 2014: 16131 * 86400 + 10*3600 + 20*60 + 30.
T_2014 = 16131 * 86400 + 37230
assert T_2014 == 1393755630


# ------------------------------------------------------------------------------ helpers

def _image(path: Path, size: tuple[int, int] = (6, 4), exif: Image.Exif | None = None,
           mtime: float | None = None) -> Path:
    """Write a tiny RGB image (PNG or JPEG by extension), optionally with EXIF and mtime."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {} if exif is None else {"exif": exif}
    Image.new("RGB", size, (200, 30, 60)).save(path, **kwargs)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _exif(original: str | None = None, offset: str | None = None,
          datetime: str | None = None, make: str | None = None) -> Image.Exif:
    exif = Image.Exif()
    if make is not None:
        exif[0x010F] = make
    if datetime is not None:
        exif[DATETIME] = datetime
    if original is not None:
        exif.get_ifd(EXIF_IFD)[DATETIME_ORIGINAL] = original
    if offset is not None:
        exif.get_ifd(EXIF_IFD)[OFFSET_ORIGINAL] = offset
    return exif


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _rows(dst: Path) -> list[dict]:
    return list(iter_rows(dst))


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    """a.png and sub/b.jpg, plus hidden files and folders that must be ignored."""
    src = tmp_path / "images"
    _image(src / "a.png", (6, 4), mtime=1_000_000_000)
    _image(src / "sub" / "b.jpg", (5, 7), mtime=1_500_000_000.5)
    _image(src / ".hidden.png")
    _image(src / ".cache" / "c.png")
    return src


def _no_temporary(folder: Path) -> None:
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------- timestamp parsing

@pytest.mark.parametrize(("text", "expected"), [
    ("1393755630", 1393755630.0),
    (" 1393755630.25 ", 1393755630.25),
    ("-86400", -86400.0),
    ("2014-03-02T10:20:30Z", T_2014),
    ("2014-03-02T10:20:30", T_2014),                 # naive: UTC
    ("2014-03-02 19:20:30+09:00", T_2014),
    ("2014-03-02T05:20:30-05:00", T_2014),
    ("2014-03-02", T_2014 - 37230),
    ("1970-01-01T00:00:00.5Z", 0.5),
])
def test_parse_timestamp(text: str, expected: float) -> None:
    assert parse_timestamp(text) == expected


@pytest.mark.parametrize(("text", "reason"), [
    ("nan", "not a finite number"), ("inf", "not a finite number"),
    ("1e300", "outside years 1-9999"), ("", "neither POSIX seconds nor ISO 8601"),
    ("yesterday", "'yesterday' is neither"), ("2014-13-02", "neither"),
])
def test_parse_timestamp_rejects(text: str, reason: str) -> None:
    found = parse_timestamp(text)
    assert isinstance(found, str) and reason in found


def test_to_iso() -> None:
    assert to_iso(T_2014) == "2014-03-02T10:20:30+00:00"
    assert to_iso(-1.5) == "1969-12-31T23:59:58.500000+00:00"


# ---------------------------------------------------------------------------------- mtime

def test_mtime_round_trip(pool: Path, tmp_path: Path) -> None:
    summary = convert_pool(pool, tmp_path / "out", rows_per_shard=1)
    assert summary == {"rows": 2, "shards": 2, "dst": str(tmp_path / "out"), "skipped": [],
                       "first": "2001-09-09T01:46:40+00:00",
                       "last": "2017-07-14T02:40:00.500000+00:00", "timestamps": "mtime"}
    rows = _rows(tmp_path / "out")
    assert [r["path"] for r in rows] == ["a.png", "sub/b.jpg"]
    assert [r["timestamp"] for r in rows] == [1_000_000_000.0, 1_500_000_000.5]
    assert [(r["height"], r["width"]) for r in rows] == [(4, 6), (7, 5)]
    assert rows[1]["image"] == (pool / "sub" / "b.jpg").read_bytes()  # bytes unchanged
    manifest = read_pool_manifest(tmp_path / "out")
    assert manifest["schema"] == {"image": "binary", "path": "string", "timestamp": "double",
                                  "height": "int32", "width": "int32"}
    extra = manifest["extra"]
    assert (extra["timestamps"], extra["first"], extra["skipped"]) == (
        "mtime", "2001-09-09T01:46:40+00:00", [])
    assert extra["source"] == str(pool.resolve())
    _no_temporary(tmp_path)


# ----------------------------------------------------------------------------------- EXIF

def test_exif_date_time_original(tmp_path: Path) -> None:
    src = tmp_path / "images"
    _image(src / "a.jpg", exif=_exif("2014:03:02 10:20:30", datetime="1999:01:01 00:00:00"))
    _image(src / "b.jpg", exif=_exif("2014:03:02 19:20:30", offset="+09:00"))
    _image(src / "c.png", exif=_exif(datetime="2000:01:01 00:00:00"))  # DateTime fallback
    summary = convert_pool(src, tmp_path / "out", timestamps="exif")
    assert [r["timestamp"] for r in _rows(tmp_path / "out")] == [T_2014, T_2014, 946684800.0]
    assert (summary["first"], summary["last"], summary["timestamps"]) == (
        "2000-01-01T00:00:00+00:00", "2014-03-02T10:20:30+00:00", "exif")


def test_exif_missing_or_unparseable_is_bad(tmp_path: Path) -> None:
    src = tmp_path / "images"
    _image(src / "good.jpg", exif=_exif("2014:03:02 10:20:30"))
    _image(src / "none.png")
    _image(src / "other.jpg", exif=_exif(make="Cam"))
    _image(src / "text.jpg", exif=_exif("2014-03-02 10:20:30"))
    _image(src / "zero.jpg", exif=_exif("0000:00:00 00:00:00"))
    _image(src / "zone.jpg", exif=_exif("2014:03:02 10:20:30", offset="JST"))
    with pytest.raises(DataError) as caught:
        convert_pool(src, tmp_path / "out", timestamps="exif")
    message = str(caught.value)
    assert message.startswith(f"{src}: 5 bad image file(s)")
    assert "none.png (no EXIF DateTimeOriginal or DateTime (found no EXIF data))" in message
    assert "other.jpg (no EXIF DateTimeOriginal or DateTime (found EXIF tags Make))" in message
    assert "text.jpg (EXIF DateTimeOriginal is '2014-03-02 10:20:30', expected" in message
    assert "zero.jpg (EXIF DateTimeOriginal is '0000:00:00 00:00:00'" in message
    assert "zone.jpg (EXIF DateTimeOriginal offset is 'JST'" in message
    assert not (tmp_path / "out").exists()
    _no_temporary(tmp_path)


def test_exif_timestamp_of_bytes(tmp_path: Path) -> None:
    path = _image(tmp_path / "a.jpg", exif=_exif("2014:03:02 05:20:30", offset="-05:00"))
    assert exif_timestamp(path.read_bytes()) == T_2014


# ------------------------------------------------------------------------------------ CSV

def test_csv_iso_and_numeric(pool: Path, tmp_path: Path) -> None:
    table = _csv(pool / "times.csv",  # beside the images: not taken for a bad image
                 "id,timestamp,path,note\n"
                 "1,2014-03-02T10:20:30Z,./a.png,x\n"
                 "\n"
                 "2,1393755631.5,sub//b.jpg,y\n")
    summary = convert_pool(pool, tmp_path / "out", timestamps=str(table))
    assert [r["timestamp"] for r in _rows(tmp_path / "out")] == [T_2014, T_2014 + 1.5]
    assert summary["timestamps"] == "csv:times.csv" and summary["skipped"] == []
    assert read_pool_manifest(tmp_path / "out")["extra"]["timestamps"] == "csv:times.csv"


@pytest.mark.parametrize(("text", "match"), [
    ("file,time\na.png,1\n", r"times\.csv:1: missing column\(s\) path, timestamp in the "
                             r"header row file,time"),
    ("", r"times\.csv:1: missing column\(s\) path, timestamp in the header row \(empty\)"),
    ("path,timestamp\na.png,1\nsub/b.jpg,soon\n", r"times\.csv:3: timestamp 'soon' is "
                                                  "neither POSIX seconds nor ISO 8601"),
    ("path,timestamp\na.png,nan\n", r"times\.csv:2: timestamp nan is not a finite number"),
    ("path,timestamp\na.png,1\nsub/b.jpg,2\n./a.png,3\n",
     r"times\.csv:4: duplicate path a\.png \(first on line 2\)"),
    ("path,timestamp\na.png,1\nsub/b.jpg,2\nc.png,3\n",
     r"times\.csv:4: no image file c\.png below .*images"),
    ("path,timestamp\na.png,1\n.cache/c.png,3\n", r"times\.csv:3: no image file \.cache/c"),
    ("path,timestamp\n,1\n", r"times\.csv:2: empty path"),
    ("path,timestamp\na.png\n", r"times\.csv:2: row has 1 field\(s\), the header 2"),
])
def test_csv_errors_name_file_and_line(pool: Path, tmp_path: Path, text: str,
                                       match: str) -> None:
    table = _csv(tmp_path / "times.csv", text)
    with pytest.raises(DataError, match=match):
        convert_pool(pool, tmp_path / "out", timestamps=str(table), skip_bad=True)
    assert not (tmp_path / "out").exists()
    _no_temporary(tmp_path)


def test_csv_not_found(pool: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv: timestamps CSV not found; .*mtime\|exif"):
        convert_pool(pool, tmp_path / "out", timestamps=str(tmp_path / "nope.csv"))


def test_image_without_csv_row(pool: Path, tmp_path: Path) -> None:
    table = _csv(tmp_path / "times.csv", "path,timestamp\na.png,1393755630\n")
    with pytest.raises(DataError, match=r"1 bad image file\(s\).*sub/b\.jpg \(no timestamp "
                                        r"in CSV times\.csv\)"):
        convert_pool(pool, tmp_path / "out", timestamps=str(table))
    summary = convert_pool(pool, tmp_path / "out", timestamps=str(table), skip_bad=True)
    assert summary["rows"] == 1
    assert summary["skipped"] == [{"path": "sub/b.jpg", "reason": "no timestamp in CSV "
                                   "times.csv"}]


# ------------------------------------------------------------------ bad files and outputs

def test_bad_files_listed_together_then_skipped(pool: Path, tmp_path: Path) -> None:
    (pool / "broken.jpg").write_bytes(b"not a jpeg")
    (pool / "notes.txt").write_text("hello")
    with pytest.raises(DataError) as caught:
        convert_pool(pool, tmp_path / "out", rows_per_shard=1)
    message = str(caught.value)
    assert "2 bad image file(s)" in message and "--skip-bad" in message
    assert "broken.jpg (not a recognised image format)" in message
    assert "notes.txt (not an image file (extension .txt" in message
    assert not (tmp_path / "out").exists()
    _no_temporary(tmp_path)
    summary = convert_pool(pool, tmp_path / "out", skip_bad=True, rows_per_shard=1)
    assert summary["rows"] == 2 and summary["shards"] == 2
    assert [s["path"] for s in summary["skipped"]] == ["broken.jpg", "notes.txt"]
    assert read_pool_manifest(tmp_path / "out")["extra"]["skipped"] == summary["skipped"]
    assert [r["path"] for r in _rows(tmp_path / "out")] == ["a.png", "sub/b.jpg"]


def test_no_usable_image(tmp_path: Path) -> None:
    src = tmp_path / "images"
    _image(src / "a.png")
    with pytest.raises(DataError, match=r"none of the 1 image file\(s\) is usable"):
        convert_pool(src, tmp_path / "out", timestamps="exif", skip_bad=True)
    _no_temporary(tmp_path)


def test_missing_or_empty_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="image folder not found"):
        convert_pool(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    _image(tmp_path / "empty" / ".hidden" / "a.png")
    with pytest.raises(DataError, match=r"empty: no image files"):
        convert_pool(tmp_path / "empty", tmp_path / "out")


def test_existing_dst_refused_without_overwrite(pool: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert_pool(pool, out)
    with pytest.raises(DataError, match="output folder already exists"):
        convert_pool(pool, out)
    os.utime(pool / "a.png", (2_000_000_000, 2_000_000_000))
    assert convert_pool(pool, out, overwrite=True)["last"] == "2033-05-18T03:33:20+00:00"
    (pool / "broken.png").write_bytes(b"")
    with pytest.raises(DataError, match="1 bad image file"):
        convert_pool(pool, out, overwrite=True)
    assert read_pool_manifest(out)["extra"]["last"] == "2033-05-18T03:33:20+00:00"  # kept
    _no_temporary(tmp_path)


def test_read_pool_manifest_refuses_other_formats(tmp_path: Path) -> None:
    sample = write_image_sample(tmp_path / "raw", classes=2, train_per_class=2,
                                test_per_class=1, size=8)
    convert_imagefolder(sample, tmp_path / "shards")
    with pytest.raises(DataError, match=r"format is 'imagefolder', expected 'pool' \(an image "
                                        r"pool converted with `raylab data convert pool"):
        read_pool_manifest(tmp_path / "shards")
    with pytest.raises(DataError, match="shard folder not found"):
        read_pool_manifest(tmp_path / "nope")


# ----------------------------------------------------------------------- inspect and CLI

def test_inspect_pool(pool: Path, tmp_path: Path) -> None:
    convert_pool(pool, tmp_path / "out")
    info = inspect_shards(tmp_path / "out")
    assert (info["format"], info["rows"], info["shards"]) == ("pool", 2, 1)
    assert (info["first"], info["last"], info["timestamps"]) == (
        "2001-09-09T01:46:40+00:00", "2017-07-14T02:40:00.500000+00:00", "mtime")
    text = format_inspection(info)
    assert "rows:    2 in 1 shard(s)" in text
    assert ("time:    2001-09-09T01:46:40+00:00 .. 2017-07-14T02:40:00.500000+00:00 "
            "(UTC, from mtime)") in text


def test_cli_convert_pool(pool: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    table = _csv(tmp_path / "times.csv", "path,timestamp\na.png,2014-03-02T10:20:30Z\n")
    assert main(["data", "convert", "pool", str(pool), out, "--timestamps", str(table)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raylab: error: ")
    assert "sub/b.jpg (no timestamp in CSV times.csv)" in lines[0]
    assert main(["data", "convert", "pool", str(pool), out, "--timestamps", str(table),
                 "--skip-bad"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert (summary["rows"], summary["skipped"], summary["first"]) == (
        1, 1, "2014-03-02T10:20:30+00:00")
    assert "skipped 1 image(s), listed under extra.skipped" in captured.err
    assert main(["data", "convert", "pool", str(pool), out, "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out)["timestamps"] == "mtime"
    assert main(["data", "inspect", out]) == 0
    assert "time:    2001-09-09T01:46:40+00:00 .." in capsys.readouterr().out
    assert main(["data", "convert", "pool", str(pool)]) == 2
    assert "expected 2 paths (IMAGES DST), got 1" in capsys.readouterr().err
    assert main(["data", "convert", "imagefolder", str(pool), out + "2", "--timestamps",
                 "exif"]) == 2
    assert "--timestamps: only for pool, not imagefolder" in capsys.readouterr().err
