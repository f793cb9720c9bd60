"""`raylab data sample/convert/inspect` and `raylab methods` through the CLI (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

from raylab.cli import main


def test_sample_convert_inspect_json(tmp_path: Path, capsys) -> None:
    assert main(["data", "sample", "jigsaws", str(tmp_path / "raw")]) == 0
    assert main(["data", "convert", "jigsaws", str(tmp_path / "raw"), str(tmp_path / "shards"),
                 "--tasks", "Suturing", "Knot_Tying"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "shards"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "jigsaws"
    # 8 subjects x 5 trials per task, one trial per task deliberately without a meta line.
    assert info["rows"] == 78
    assert set(info["counts"]) == {"Suturing", "Knot_Tying"}
    assert sum(sum(c.values()) for c in info["counts"].values()) == 78
    assert info["frames"] > 78 * 600 - 1
    assert main(["data", "inspect", str(tmp_path / "shards")]) == 0
    text = capsys.readouterr().out
    assert "Suturing" in text and "rows:" in text


def test_methods_lists_skill(capsys) -> None:
    assert main(["methods"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "skill" in names and "convnext" in names


def test_images_sample_convert_inspect(tmp_path: Path, capsys) -> None:
    raw, dst = str(tmp_path / "raw"), str(tmp_path / "shards")
    assert main(["data", "sample", "images", raw, "--classes", "3", "--train-per-class", "5",
                 "--test-per-class", "2", "--size", "16"]) == 0
    assert main(["data", "convert", "imagefolder", raw, dst, "--splits", "train,test"]) == 0
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert summary["splits"] == {"train": 15, "test": 6} and summary["skipped"] == []
    assert main(["data", "inspect", dst, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"format", "rows", "counts", "class_names", "split_shards", "skipped"} <= set(info)
    assert info["format"] == "imagefolder" and info["rows"] == 21
    assert info["counts"] == {"train": {"disk": 5, "ring": 5, "triangle": 5},
                              "test": {"disk": 2, "ring": 2, "triangle": 2}}
    assert info["class_names"] == ["disk", "ring", "triangle"]
    assert info["split_shards"] == {"train": 1, "test": 1}
    assert main(["data", "inspect", dst]) == 0
    text = capsys.readouterr().out
    assert "classes: 3 (disk, ring, triangle)" in text and "15 rows in 1 shard(s)" in text


def _one_error_line(capsys, pattern: str) -> None:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raylab: error: "), captured.err
    assert pattern in lines[0], lines[0]


def test_imagefolder_cli_errors(tmp_path: Path, capsys) -> None:
    raw, dst = tmp_path / "raw", str(tmp_path / "shards")
    assert main(["data", "convert", "imagefolder", str(tmp_path / "nope"), dst]) == 2
    _one_error_line(capsys, "source folder not found")
    assert main(["data", "sample", "images", str(raw), "--classes", "2",
                 "--train-per-class", "2", "--test-per-class", "1", "--size", "8"]) == 0
    capsys.readouterr()
    assert main(["data", "convert", "imagefolder", str(raw), dst, "--splits", "val"]) == 2
    _one_error_line(capsys, "split(s) val not found; present: test, train")
    assert main(["data", "convert", "imagefolder", str(raw), dst, "--tasks", "Suturing"]) == 2
    _one_error_line(capsys, "--tasks: only for jigsaws")
    assert main(["data", "sample", "jigsaws", str(tmp_path / "j"), "--size", "8"]) == 2
    _one_error_line(capsys, "--size: only for images")
    (raw / "train" / "disk" / "0000.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (raw / "train" / "disk" / "notes.txt").write_text("x")
    assert main(["data", "convert", "imagefolder", str(raw), dst]) == 2
    _one_error_line(capsys, "2 bad image file(s)")
    assert not (tmp_path / "shards").exists()
    assert main(["data", "convert", "imagefolder", str(raw), dst, "--skip-bad"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 5 and len(summary["skipped"]) == 2


def test_clear_sample_convert_inspect(tmp_path: Path, capsys) -> None:
    images, raw, dst = (str(tmp_path / n) for n in ("images", "raw", "stream"))
    assert main(["data", "sample", "images", images, "--classes", "3", "--train-per-class", "8",
                 "--test-per-class", "4", "--size", "8"]) == 0
    assert main(["data", "sample", "clear", raw, "--from", images, "--per-class", "2",
                 "--buckets", "5", "--seed", "1"]) == 0
    assert "synthetic CLEAR-style stream" in capsys.readouterr().out
    assert sorted(p.name for p in Path(raw).iterdir()) == ["0", "1", "2", "3", "4",
                                                           "README.txt", "drift.json"]
    assert main(["data", "convert", "clear", raw, dst, "--buckets", "0,2-4",
                 "--classes", "ring,disk"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["buckets"] == [0, 2, 3, 4] and summary["class_names"] == ["disk", "ring"]
    assert summary["unlabeled_buckets"] == [0] and summary["skipped"] == []
    assert main(["data", "inspect", dst, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "clear" and info["buckets"] == [0, 2, 3, 4]
    assert info["counts"] == summary["counts"] and info["counts"]["0"] == {}
    assert info["bucket_rows"]["0"] == 6 and info["class_names"] == ["disk", "ring"]
    assert sum(info["counts"]["3"].values()) == info["bucket_rows"]["3"]
    assert main(["data", "inspect", dst]) == 0
    text = capsys.readouterr().out
    assert "format:  clear" in text and "bucket 0" in text and "(unlabeled)" in text


def test_clear_cli_errors(tmp_path: Path, capsys) -> None:
    raw, dst = tmp_path / "raw", str(tmp_path / "stream")
    assert main(["data", "sample", "clear", str(raw)]) == 2
    _one_error_line(capsys, "--from IMAGEFOLDER is required")
    assert main(["data", "sample", "clear", str(raw), "--from", str(tmp_path / "nope")]) == 2
    _one_error_line(capsys, "source folder not found")
    assert main(["data", "sample", "images", str(raw), "--per-class", "3"]) == 2
    _one_error_line(capsys, "--per-class: only for clear, not images")
    assert main(["data", "convert", "clear", str(tmp_path / "nope"), dst]) == 2
    _one_error_line(capsys, "source folder not found; expected <src>/<bucket>/<class>/<image>")
    (raw / "1" / "a").mkdir(parents=True)
    (raw / "2").mkdir()
    assert main(["data", "convert", "clear", str(raw), dst]) == 2
    _one_error_line(capsys, "labelled bucket has no class folders")
    assert main(["data", "convert", "clear", str(raw), dst, "--buckets", "9"]) == 2
    _one_error_line(capsys, "bucket(s) 9 not found; present: 1-2")
    assert main(["data", "convert", "clear", str(raw), dst, "--buckets", "x"]) == 2
    _one_error_line(capsys, "buckets: expected integers and ranges")
    assert main(["data", "convert", "imagefolder", str(raw), dst, "--classes", "a"]) == 2
    _one_error_line(capsys, "--classes: only for clear or segmentation, not imagefolder")
    assert main(["data", "convert", "jigsaws", str(raw), dst, "--skip-bad"]) == 2
    _one_error_line(capsys, "--skip-bad: only for imagefolder or clear or coco or "
                            "segmentation or pool, not jigsaws")
    assert main(["data", "inspect", str(tmp_path / "nope")]) == 2
    _one_error_line(capsys, "shard folder not found")
    assert not Path(dst).exists()


def test_local_only_writers_refuse_a_store_uri(tmp_path: Path, capsys, monkeypatch) -> None:
    """A CLEAR stream and the samples are local folder trees: given s3://, one line
    saying so, and no local folder named `s3:` (what Path would have made of the URI)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    for argv in (["data", "convert", "clear", "src", "s3://bucket/stream"],
                 ["data", "sample", "images", "s3://bucket/sample"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"raylab: error: {argv[-1]}: this output is written to a "
                              "local folder only"), err
        assert err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
