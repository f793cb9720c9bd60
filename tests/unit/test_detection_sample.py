"""Tests of raylab.data.detection_sample: the synthetic COCO-format detection set."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from raylab.cli import main
from raylab.data.coco import convert_coco
from raylab.data.detection_sample import (
    MIN_VISIBLE,
    SAMPLE_CLASSES,
    write_detection_sample,
)
from raylab.errors import ConfigError, DataError

SMALL = dict(images=24, val_images=6, size=96)


def _load(raw: Path, split: str) -> dict:
    return json.loads((raw / "annotations" / f"instances_{split}.json").read_text())


def _mask(ann: dict, height: int, width: int) -> np.ndarray:
    """The annotation's mask as pycocotools' ``COCO.annToMask`` decodes it."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mask_utils.decode(rle).astype(bool)


def _kind(ann: dict) -> str:
    seg = ann["segmentation"]
    if isinstance(seg, list):
        return "polygon"
    return "uncompressed_rle" if isinstance(seg["counts"], list) else "rle"


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_detection_sample(tmp_path_factory.mktemp("det") / "raw", seed=0, **SMALL)


def test_layout_readme_and_categories(sample: Path) -> None:
    assert (sample / "README.txt").read_text().startswith("SYNTHETIC DETECTION")
    for split, n in (("train", 24), ("val", 6)):
        data = _load(sample, split)
        assert len(data["images"]) == n == len(list((sample / "images" / split).glob("*.png")))
        assert data["categories"] == [{"id": k + 1, "name": name, "supercategory": "shape"}
                                      for k, name in enumerate(SAMPLE_CLASSES[:3])]
        assert "SYNTHETIC" in data["info"]["description"]
        for image in data["images"]:
            with Image.open(sample / "images" / split / image["file_name"]) as im:
                assert im.size == (96, 96) and im.mode == "RGB"
    train, val = _load(sample, "train"), _load(sample, "val")
    ids = [i["id"] for i in train["images"] + val["images"]]
    ann_ids = [a["id"] for a in train["annotations"] + val["annotations"]]
    assert len(set(ids)) == len(ids) and len(set(ann_ids)) == len(ann_ids)


@pytest.mark.parametrize("split", ["train", "val"])
def test_masks_are_exact_and_boxes_their_extent(sample: Path, split: str) -> None:
    data = _load(sample, split)
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image in data["images"]:
        pixels = np.asarray(Image.open(sample / "images" / split / image["file_name"]))
        anns = by_image.get(image["id"], [])
        assert 1 <= len(anns) <= 4
        union = np.zeros(pixels.shape[:2], bool)
        for ann in anns:
            mask = _mask(ann, image["height"], image["width"])
            assert mask.sum() == ann["area"] >= MIN_VISIBLE
            assert not (mask & union).any(), "visible masks overlap"
            union |= mask
            colours = np.unique(pixels[mask], axis=0)
            assert len(colours) == 1, "an instance's mask holds other pixels than its colour"
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            assert ann["bbox"] == [float(v) for v in mask_utils.toBbox(rle)]
            assert ann["iscrowd"] == 0
        # The saturated (shape-coloured) pixels are exactly the union of the masks.
        spread = pixels.max(axis=2).astype(int) - pixels.min(axis=2)
        assert np.array_equal(spread > 90, union)


def test_occlusion_and_mask_kinds(sample: Path) -> None:
    data = _load(sample, "train")
    kinds = Counter(_kind(a) for a in data["annotations"])
    assert all(kinds[k] > 0 for k in ("polygon", "rle", "uncompressed_rle")), kinds
    images = {i["id"]: i for i in data["images"]}
    touching = 0
    for ann in data["annotations"]:
        if _kind(ann) == "polygon":
            continue
        # An occluded instance (RLE, not a ring) borders the mask of the shape above it.
        image = images[ann["image_id"]]
        mask = _mask(ann, image["height"], image["width"])
        grown = ndimage.binary_dilation(mask)
        others = [_mask(o, image["height"], image["width"]) for o in data["annotations"]
                  if o["image_id"] == ann["image_id"] and o["id"] != ann["id"]]
        touching += any((grown & o).any() for o in others)
    assert touching >= 5


def test_sizes_are_in_range(sample: Path) -> None:
    data = _load(sample, "train")
    sides = [max(a["bbox"][2:]) for a in data["annotations"] if _kind(a) == "polygon"]
    assert min(sides) >= 10 and max(sides) <= 64


def test_deterministic_replaceable_and_refuses_other_folders(tmp_path: Path) -> None:
    small = dict(images=3, val_images=1, size=48)
    a = write_detection_sample(tmp_path / "a", seed=3, **small)
    b = write_detection_sample(tmp_path / "b", seed=3, **small)
    c = write_detection_sample(tmp_path / "c", seed=4, **small)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    name = Path("images/train/000001.png")
    assert (a / name).read_bytes() != (c / name).read_bytes()
    write_detection_sample(a, seed=4, **small)  # an earlier sample is replaced
    assert (a / name).read_bytes() == (c / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        write_detection_sample(tmp_path / "mine", **small)
    for bad, match in ((dict(classes=6), "classes: expected 1..5"), (dict(size=16), "size"),
                       (dict(images=0), "images: expected >= 1"),
                       (dict(val_images=0), "val_images")):
        with pytest.raises(ConfigError, match=match):
            write_detection_sample(tmp_path / "x", **bad)
    assert not (tmp_path / "x").exists()


def test_converts_cleanly(sample: Path, tmp_path: Path) -> None:
    for split in ("train", "val"):
        data = _load(sample, split)
        manifest = convert_coco(sample / "images" / split,
                                sample / "annotations" / f"instances_{split}.json",
                                tmp_path / split)
        counts = manifest["extra"]["counts"]
        assert manifest["extra"]["skipped"] == []
        assert counts["images"] == len(data["images"])
        assert counts["instances"] == len(data["annotations"])
        names = {c["id"]: c["name"] for c in data["categories"]}
        assert counts["per_category"] == {n: sum(1 for a in data["annotations"]
                                                 if a["category_id"] == i)
                                          for i, n in names.items()}
        assert counts["mask_kinds"] == {k: sum(1 for a in data["annotations"] if _kind(a) == k)
                                        for k in ("polygon", "rle", "uncompressed_rle")}


def test_cli_sample_convert_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw, dst = tmp_path / "raw", tmp_path / "shards"
    assert main(["data", "sample", "detection", str(raw), "--images", "4", "--val-images",
                 "2", "--size", "64", "--classes", "4", "--seed", "1"]) == 0
    assert "synthetic COCO-format detection sample" in capsys.readouterr().out
    assert len(_load(raw, "val")["images"]) == 2
    assert [c["name"] for c in _load(raw, "train")["categories"]] == list(SAMPLE_CLASSES[:4])
    assert main(["data", "convert", "coco", str(raw / "images" / "train"),
                 str(raw / "annotations" / "instances_train.json"), str(dst)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 4 and summary["skipped"] == 0 and summary["categories"] == 4
    assert main(["data", "inspect", str(dst), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "coco" and info["images"] == 4
    assert info["instances"] == summary["instances"] == sum(info["counts"].values())
    assert main(["data", "sample", "detection", str(tmp_path / "x"), "--train-per-class",
                 "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "raylab: error: --train-per-class: only for images, not detection"
    assert main(["data", "sample", "images", str(tmp_path / "y"), "--val-images", "3"]) == 2
    assert "--val-images: only for detection, not images" in capsys.readouterr().err
