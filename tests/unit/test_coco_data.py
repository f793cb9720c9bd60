"""Tests of raylab.data.coco: the COCO converter, its checks, readers and ground-truth JSON."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from raylab.cli import main
from raylab.data.coco import (
    compressed_counts,
    convert_coco,
    decode_masks,
    encode_masks,
    read_categories,
    write_ground_truth_json,
)
from raylab.data.detection_sample import write_detection_sample
from raylab.data.inspect import format_inspection, inspect_shards
from raylab.data.shards import iter_rows, read_manifest, write_shards
from raylab.errors import DataError

SCHEMA = {"image_id": "int64", "file_name": "string", "image": "binary", "width": "int32",
          "height": "int32", "ann_ids": "list<item: int64>",
          "category_ids": "list<item: int32>", "boxes": "list<item: float>",
          "areas": "list<item: float>", "iscrowd": "list<item: int8>",
          "masks": "list<item: binary>"}


def _coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _check_round_trip(dst: Path, json_path: Path) -> int:
    """Every mask in the shards equals ``COCO.annToMask``; boxes, areas, ids equal the JSON.
    Returns the number of instances checked."""
    gt = _coco(json_path)
    n = 0
    for row in iter_rows(dst):
        image = gt.imgs[row["image_id"]]
        assert (row["width"], row["height"]) == (image["width"], image["height"])
        assert row["file_name"] == image["file_name"]
        assert row["ann_ids"] == [a["id"] for a in gt.imgToAnns[row["image_id"]]]
        masks = decode_masks(row["masks"], row["height"], row["width"])
        assert masks.shape == (len(row["ann_ids"]), row["height"], row["width"])
        for k, ann_id in enumerate(row["ann_ids"]):
            ann = gt.anns[ann_id]
            assert np.array_equal(masks[k], gt.annToMask(ann))
            assert row["category_ids"][k] == ann["category_id"]
            assert row["iscrowd"][k] == ann["iscrowd"]
            assert row["boxes"][4 * k:4 * k + 4] == pytest.approx(ann["bbox"], rel=1e-6)
            assert row["areas"][k] == pytest.approx(ann["area"], rel=1e-6)
            n += 1
    return n


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_detection_sample(tmp_path_factory.mktemp("coco") / "raw", images=8,
                                  val_images=2, size=64, seed=0)


@pytest.fixture(scope="module")
def converted(sample: Path) -> tuple[Path, dict]:
    dst = sample.parent / "shards"
    manifest = convert_coco(sample / "images" / "train",
                            sample / "annotations" / "instances_train.json", dst,
                            rows_per_shard=3)
    return dst, manifest


# ----------------------------------------------------------------------- synthetic data

def test_schema_rows_and_manifest(sample: Path, converted: tuple[Path, dict]) -> None:
    dst, manifest = converted
    data = json.loads((sample / "annotations" / "instances_train.json").read_text())
    assert read_manifest(dst, expected_format="coco")["schema"] == SCHEMA == manifest["schema"]
    assert [s["rows"] for s in manifest["shards"]] == [3, 3, 2]
    extra = manifest["extra"]
    assert extra["categories"] == data["categories"] == read_categories(dst)
    assert extra["source_json"] == str((sample / "annotations" / "instances_train.json")
                                       .resolve())
    assert extra["images_dir"] == str((sample / "images" / "train").resolve())
    assert extra["skipped"] == [] and extra["counts"]["images"] == 8
    rows = list(iter_rows(dst))
    assert [r["image_id"] for r in rows] == [i["id"] for i in data["images"]]
    for row in rows:
        assert row["image"] == (sample / "images" / "train" / row["file_name"]).read_bytes()
    first = pq.read_table(dst / "part-00000.parquet")
    assert first.schema.field("boxes").type.value_type == pa.float32()
    assert first.schema.field("masks").type.value_type == pa.binary()
    assert _check_round_trip(dst, sample / "annotations" / "instances_train.json") == len(
        data["annotations"])


def test_decode_encode_masks() -> None:
    rng = np.random.default_rng(0)
    masks = (rng.random((3, 7, 5)) > 0.5).astype(np.uint8)
    rles = encode_masks(masks)
    assert all(isinstance(r, bytes) for r in rles)
    assert np.array_equal(decode_masks(rles, 7, 5), masks)
    assert np.array_equal(decode_masks([r.decode() for r in rles], 7, 5), masks)
    assert decode_masks([], 7, 5).shape == (0, 7, 5) and encode_masks(masks[:0]) == []
    assert sum(compressed_counts(rles[0])) == 35
    assert int(mask_utils.area({"size": [7, 5], "counts": rles[0]})) == masks[0].sum()


def test_ground_truth_json(sample: Path, converted: tuple[Path, dict], tmp_path: Path) -> None:
    dst, _ = converted
    source = _coco(sample / "annotations" / "instances_train.json")
    path = write_ground_truth_json(dst, tmp_path / "gt.json")
    gt = _coco(path)
    assert sorted(gt.imgs) == sorted(source.imgs) and sorted(gt.anns) == sorted(source.anns)
    assert gt.dataset["categories"] == source.dataset["categories"]
    for ann_id, ann in gt.anns.items():
        assert np.array_equal(gt.annToMask(ann), source.annToMask(source.anns[ann_id]))
        assert ann["bbox"] == source.anns[ann_id]["bbox"]
        assert ann["area"] == source.anns[ann_id]["area"]
    ids = sorted(source.imgs)[:3]
    sub = _coco(write_ground_truth_json(dst, tmp_path / "sub.json", image_ids=ids))
    assert sorted(sub.imgs) == ids
    assert {a["image_id"] for a in sub.anns.values()} <= set(ids)
    with pytest.raises(DataError, match="image id\\(s\\) 999 not in this shard folder"):
        write_ground_truth_json(dst, tmp_path / "x.json", image_ids=[ids[0], 999])
    assert not (tmp_path / "x.json").exists()


def test_inspect(converted: tuple[Path, dict]) -> None:
    dst, manifest = converted
    info = inspect_shards(dst)
    counts = manifest["extra"]["counts"]
    assert info["format"] == "coco" and info["images"] == info["rows"] == 8
    assert info["counts"] == counts["per_category"]
    assert info["instances"] == counts["instances"]
    assert info["mask_kinds"] == counts["mask_kinds"] and info["crowd"] == 0
    assert info["skipped"] == {"image": [], "annotation": []}
    text = format_inspection(info)
    assert "images:  8 (0 without instances)" in text
    assert f"instances: {counts['instances']} in " in text and "polygon=" in text


def test_existing_dst_and_overwrite(sample: Path, tmp_path: Path) -> None:
    args = (sample / "images" / "val", sample / "annotations" / "instances_val.json")
    convert_coco(*args, tmp_path / "out")
    with pytest.raises(DataError, match="already exists"):
        convert_coco(*args, tmp_path / "out")
    assert convert_coco(*args, tmp_path / "out", overwrite=True)["rows"] == 2
    assert _leftovers(tmp_path) == []


def test_readers_reject_other_formats(tmp_path: Path) -> None:
    write_shards([pa.table({"x": [1]})], tmp_path / "demo", format="demo")
    with pytest.raises(DataError, match="format is 'demo', expected 'coco'"):
        read_categories(tmp_path / "demo")


# ------------------------------------------------------------------------- bad inputs

def _json(sample: Path) -> dict[str, Any]:
    return json.loads((sample / "annotations" / "instances_train.json").read_text())


def _write(path: Path, data: Any) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _first_ann(data: dict, kind: str = "polygon") -> dict:
    return next(a for a in data["annotations"]
                if isinstance(a["segmentation"], list) == (kind == "polygon"))


def _file_of(data: dict, ann: dict) -> str:
    return next(i["file_name"] for i in data["images"] if i["id"] == ann["image_id"])


def _box_outside(data: dict) -> tuple[str, str]:
    ann = _first_ann(data)
    ann["bbox"][0] = 70.0  # x beyond the 64-pixel image
    return f"annotation {ann['id']} ({_file_of(data, ann)}): box", "lies outside the 64x64"


def _degenerate_polygon(data: dict) -> tuple[str, str]:
    ann = _first_ann(data)
    ann["segmentation"] = [[10.0, 10.0, 20.0, 20.0]]
    return f"annotation {ann['id']} ({_file_of(data, ann)})", "degenerate polygon 1: 2 point"


def _zero_area_polygon(data: dict) -> tuple[str, str]:
    ann = _first_ann(data)
    ann["segmentation"] = [[10.0, 10.0, 20.0, 20.0, 30.0, 30.0]]
    return f"annotation {ann['id']} ({_file_of(data, ann)})", "degenerate polygon 1: zero area"


def _unknown_category(data: dict) -> tuple[str, str]:
    ann = _first_ann(data)
    ann["category_id"] = 77
    return f"annotation {ann['id']} ({_file_of(data, ann)})", "unknown category id 77"


def _unknown_image(data: dict) -> tuple[str, str]:
    ann = _first_ann(data)
    ann["image_id"] = 4242
    return f"annotation {ann['id']}: ", "image id 4242 not in images"


def _bad_rle(data: dict) -> tuple[str, str]:
    ann = _first_ann(data, "rle")
    seg = ann["segmentation"]
    seg["counts"] = [5, 7] if isinstance(seg["counts"], list) else "0"
    return f"annotation {ann['id']} ({_file_of(data, ann)})", "RLE run lengths sum to"


def _missing_image(data: dict) -> tuple[str, str]:
    image = data["images"][1]
    image["file_name"] = "nope.png"
    return f"image {image['id']} (nope.png)", "image file not found"


def _undecodable_image(data: dict) -> tuple[str, str]:
    image = data["images"][2]
    image["file_name"] = "broken.png"
    return f"image {image['id']} (broken.png)", "cannot decode image file"


CASES = {"box_outside": _box_outside, "degenerate_polygon": _degenerate_polygon,
         "zero_area_polygon": _zero_area_polygon, "unknown_category": _unknown_category,
         "unknown_image": _unknown_image, "bad_rle": _bad_rle, "missing_image": _missing_image,
         "undecodable_image": _undecodable_image}


@pytest.fixture()
def images(sample: Path, tmp_path: Path) -> Path:
    """A copy of the train images plus a truncated PNG ``broken.png``."""
    folder = tmp_path / "images"
    shutil.copytree(sample / "images" / "train", folder)
    data = (folder / "000001.png").read_bytes()
    (folder / "broken.png").write_bytes(data[: len(data) // 2])
    return folder


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_naming_it_and_writes_nothing(case: str, sample: Path, images: Path,
                                                      tmp_path: Path) -> None:
    data = _json(sample)
    where, what = CASES[case](data)
    path = _write(tmp_path / "bad.json", data)
    with pytest.raises(DataError) as err:
        convert_coco(images, path, tmp_path / "out")
    msg = str(err.value)
    assert msg.startswith(f"{path}: 1 problem(s) in the COCO data"), msg
    assert where in msg and what in msg, msg
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("case", list(CASES))
def test_skip_bad_records_it(case: str, sample: Path, images: Path, tmp_path: Path) -> None:
    data = _json(sample)
    where, what = CASES[case](data)
    manifest = convert_coco(images, _write(tmp_path / "bad.json", data), tmp_path / "out",
                            skip_bad=True)
    skipped = manifest["extra"]["skipped"]
    assert len(skipped) == 1 and set(skipped[0]) == {"kind", "id", "file", "reason"}
    assert what in skipped[0]["reason"]
    kind = skipped[0]["kind"]
    assert where.startswith(f"{kind} {skipped[0]['id']}")
    counts = manifest["extra"]["counts"]
    if kind == "image":
        image = next(i for i in data["images"] if i["id"] == skipped[0]["id"])
        lost = sum(1 for a in data["annotations"] if a["image_id"] == image["id"])
        assert counts["images"] == 7 and counts["instances"] == len(data["annotations"]) - lost
        assert f"its {lost} annotation(s) skipped with it" in skipped[0]["reason"]
    else:
        assert counts["images"] == 8 and counts["instances"] == len(data["annotations"]) - 1
    assert all(r["image_id"] != skipped[0]["id"] or kind == "annotation"
               for r in iter_rows(tmp_path / "out", columns=["image_id"]))
    info = inspect_shards(tmp_path / "out")
    assert info["skipped"][kind] == skipped
    assert f"skipped 1 bad {kind}(s): {kind} {skipped[0]['id']}" in format_inspection(info)


def test_every_problem_in_one_error(sample: Path, images: Path, tmp_path: Path) -> None:
    data = _json(sample)
    cases = [CASES[c](data) for c in ("box_outside", "missing_image", "undecodable_image")]
    stray, unknown = data["annotations"][-2:]
    stray["image_id"] = 4242
    unknown["category_id"] = 99
    cases += [(f"annotation {stray['id']}: ", "image id 4242 not in images"),
              (f"annotation {unknown['id']} ", "unknown category id 99")]
    path = _write(tmp_path / "bad.json", data)
    with pytest.raises(DataError, match=r"5 problem\(s\)") as err:
        convert_coco(images, path, tmp_path / "out")
    for where, what in cases:
        assert where in str(err.value) and what in str(err.value)
    assert not (tmp_path / "out").exists()


def test_many_problems_are_counted_and_listed_briefly(sample: Path, tmp_path: Path) -> None:
    data = _json(sample)
    for ann in data["annotations"]:
        ann["category_id"] = 50
    n = len(data["annotations"])
    path = _write(tmp_path / "bad.json", data)
    with pytest.raises(DataError, match=rf"{n} problem\(s\)") as err:
        convert_coco(sample / "images" / "train", path, tmp_path / "out")
    msg = str(err.value)
    assert msg.count("unknown category id 50") == 10 and msg.endswith(f"and {n - 10} more")
    manifest = convert_coco(sample / "images" / "train", path, tmp_path / "out", skip_bad=True)
    assert len(manifest["extra"]["skipped"]) == n and manifest["rows"] == 8
    assert manifest["extra"]["counts"]["images_without_instances"] == 8


@pytest.mark.parametrize("text,match", [
    ("{not json", "invalid JSON"),
    ("[]", "top level is not an object"),
    ('{"images": [], "annotations": []}', "missing key\\(s\\) categories"),
    ('{"images": {}, "annotations": [], "categories": []}', '"images" is not a list'),
    ('{"images": [], "annotations": [], "categories": [{"id": 1}]}', "category 0 is"),
])
def test_malformed_json(text: str, match: str, sample: Path, tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.json", text)
    with pytest.raises(DataError, match=match) as err:
        convert_coco(sample / "images" / "train", path, tmp_path / "out")
    assert str(path) in str(err.value)
    with pytest.raises(DataError, match="annotation file not found"):
        convert_coco(sample / "images" / "train", tmp_path / "nope.json", tmp_path / "out")
    with pytest.raises(DataError, match="images folder not found"):
        convert_coco(tmp_path / "nope", path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_keys_and_crowd_and_images_without_annotations(sample: Path,
                                                               tmp_path: Path) -> None:
    data = _json(sample)
    no_box = data["annotations"][0]
    del no_box["bbox"]
    crowd = next(a for a in data["annotations"][1:] if isinstance(a["segmentation"], dict))
    crowd["iscrowd"] = 1
    data["images"].append({"id": 500, "file_name": data["images"][0]["file_name"],
                           "width": 64, "height": 64})
    path = _write(tmp_path / "crowd.json", data)
    with pytest.raises(DataError, match=f"annotation {no_box['id']} .*missing key\\(s\\) bbox"):
        convert_coco(sample / "images" / "train", path, tmp_path / "out")
    manifest = convert_coco(sample / "images" / "train", path, tmp_path / "out", skip_bad=True)
    counts = manifest["extra"]["counts"]
    assert counts["crowd"] == 1 and counts["images"] == 9
    used = {a["image_id"] for a in data["annotations"][1:]}
    assert counts["images_without_instances"] == 1 + sum(
        1 for i in data["images"][:-1] if i["id"] not in used)
    row = next(r for r in iter_rows(tmp_path / "out") if r["image_id"] == 500)
    assert row["ann_ids"] == [] and row["masks"] == [] and row["boxes"] == []
    assert decode_masks(row["masks"], 64, 64).shape == (0, 64, 64)
    assert inspect_shards(tmp_path / "out")["crowd"] == 1


def test_image_size_must_match_json(sample: Path, tmp_path: Path) -> None:
    data = _json(sample)
    data["images"][0]["width"] = 65
    path = _write(tmp_path / "size.json", data)
    with pytest.raises(DataError, match="image file is 64x64 pixels but the JSON says 65x64"):
        convert_coco(sample / "images" / "train", path, tmp_path / "out")


def test_cli_convert_errors_and_skip_bad(sample: Path, images: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = _json(sample)
    _box_outside(data)
    path = str(_write(tmp_path / "bad.json", data))
    out = str(tmp_path / "out")
    assert main(["data", "convert", "coco", str(images), path, out]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raylab: error: ")
    assert "1 problem(s)" in lines[0] and "lies outside" in lines[0]
    assert main(["data", "convert", "coco", str(images), path]) == 2
    assert "expected 3 paths (IMAGES ANNOTATIONS.json DST), got 2" in capsys.readouterr().err
    assert main(["data", "convert", "coco", str(images), path, out, "--splits", "a"]) == 2
    assert "--splits: only for imagefolder or segmentation, not coco" in capsys.readouterr().err
    assert main(["data", "convert", "coco", str(images), path, out, "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["skipped"] == 1
    assert "skipped 0 bad image(s) and 1 bad annotation(s)" in captured.err
    assert main(["data", "inspect", out]) == 0
    assert "skipped 1 bad annotation(s)" in capsys.readouterr().out
    assert main(["data", "convert", "jigsaws", str(images), out, "x"]) == 2
    assert "expected 2 paths (SRC DST), got 3" in capsys.readouterr().err


# ---------------------------------------------------------------------------- real data

def _real(real_data_root: Path, *parts: str) -> Path:
    path = real_data_root.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path}")
    return path


@pytest.mark.data
@pytest.mark.parametrize("split", ["val2017", "train2017"])
def test_real_coco128_round_trip(split: str, real_data_root: Path, tmp_path: Path) -> None:
    root = _real(real_data_root, "coco128")
    json_path = root / "annotations" / f"instances_{split}.json"
    manifest = convert_coco(root / "images" / split, json_path, tmp_path / "out")
    data = json.loads(json_path.read_text())
    extra = manifest["extra"]
    assert extra["skipped"] == [] and manifest["rows"] == len(data["images"]) == 100
    names = {c["id"]: c["name"] for c in data["categories"]}
    expected = Counter(names[a["category_id"]] for a in data["annotations"])
    assert extra["counts"]["per_category"] == {n: expected[n] for n in names.values()}
    assert extra["counts"]["crowd"] == sum(a["iscrowd"] for a in data["annotations"]) > 0
    with_anns = {a["image_id"] for a in data["annotations"]}
    assert extra["counts"]["images_without_instances"] == sum(
        1 for i in data["images"] if i["id"] not in with_anns)
    assert extra["categories"] == [{k: c[k] for k in ("id", "name", "supercategory")}
                                   for c in data["categories"]]
    assert _check_round_trip(tmp_path / "out", json_path) == len(data["annotations"])
    info = inspect_shards(tmp_path / "out")
    assert info["counts"] == extra["counts"]["per_category"] and "person=" in (
        format_inspection(info))


@pytest.mark.data
def test_real_labelme_polygons(real_data_root: Path, tmp_path: Path) -> None:
    root = _real(real_data_root, "labelme_coco")
    manifest = convert_coco(root, root / "annotations.json", tmp_path / "out")
    counts = manifest["extra"]["counts"]
    assert counts["mask_kinds"] == {"polygon": 12, "rle": 0, "uncompressed_rle": 0}
    assert manifest["rows"] == 3 and counts["instances"] == 12
    assert _check_round_trip(tmp_path / "out", root / "annotations.json") == 12
    # Also with the image folder itself (file_name holds "JPEGImages/...").
    again = convert_coco(root / "JPEGImages", root / "annotations.json", tmp_path / "flat")
    assert again["extra"]["counts"] == counts


@pytest.mark.data
def test_real_coco128_bad_copy(real_data_root: Path, tmp_path: Path) -> None:
    root = _real(real_data_root, "coco128")
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    data = copy.deepcopy(data)
    ann = data["annotations"][0]
    image = next(i for i in data["images"] if i["id"] == ann["image_id"])
    ann["bbox"] = [image["width"] - 5.0, 0.0, 20.0, 20.0]
    path = _write(tmp_path / "bad.json", data)
    with pytest.raises(DataError, match=f"annotation {ann['id']} \\({image['file_name']}\\)"):
        convert_coco(root / "images" / "val2017", path, tmp_path / "out")
    manifest = convert_coco(root / "images" / "val2017", path, tmp_path / "out",
                            skip_bad=True)
    assert [s["id"] for s in manifest["extra"]["skipped"]] == [ann["id"]]
    assert manifest["extra"]["counts"]["instances"] == len(data["annotations"]) - 1
