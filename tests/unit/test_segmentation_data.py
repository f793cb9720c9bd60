"""Segmentation shards: class maps, the converter on the synthetic sample and on real COCO /
CamVid images, five-crops, bad inputs, readers, inspect and the CLI."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raylab.cli import main
from raylab.data import segmentation as seg
from raylab.data.inspect import format_inspection, inspect_shards
from raylab.data.shards import iter_rows
from raylab.errors import ConfigError, DataError

PANOPTIC = Path("coco128") / "annotations" / "panoptic_categories.json"


def _rows(dst: Path) -> list[dict]:
    return list(iter_rows(dst))


def _write(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _identity_map(path: Path, n: int, void: list[int] | None = None) -> Path:
    names = ", ".join(f"c{i}" for i in range(n))
    path.write_text(f"classes: [{names}]\nvoid: {void or []}\n")
    return path


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seg_sample")
    return seg.write_segmentation_sample(root / "raw", seed=0, train_images=4, val_images=2,
                                         size=32)


# --------------------------------------------------------------------------- class maps

def test_camvid_class_map() -> None:
    cmap = seg.class_map("camvid")
    assert cmap.names[:4] == ["Sky", "Building", "Pole", "Road"] and len(cmap.names) == 11
    assert cmap.names[-1] == "Bicyclist" and cmap.source == "camvid"
    assert cmap.lut.shape == (256,) and cmap.lut.dtype == np.uint8
    assert list(cmap.lut[:12]) == [*range(11), seg.VOID]
    assert cmap.valid[:12].all() and not cmap.valid[12:].any()


def test_coco_panoptic_class_map(real_data_root: Path) -> None:
    path = real_data_root / PANOPTIC
    if not path.is_file():
        pytest.skip(f"{path} not found")
    cmap = seg.class_map(path)
    assert len(cmap.names) == 27 and cmap.source == str(path)
    assert cmap.names[:2] == ["person", "vehicle"]
    assert cmap.names.index("sky") == 25  # 12 thing supercategories, then 15 stuff ones
    assert {"furniture", "furniture-stuff", "food", "food-stuff"} <= set(cmap.names)
    assert cmap.lut[1] == 0  # person -> person
    assert cmap.names[cmap.lut[3]] == "vehicle"  # car
    assert cmap.names[cmap.lut[187]] == "sky"  # sky-other-merged (checked in the file)
    assert cmap.names[cmap.lut[189]] == "furniture-stuff"  # table-merged
    assert cmap.lut[0] == seg.VOID and cmap.lut[255] == seg.VOID and cmap.valid.all()
    assert cmap.lut[12] == seg.VOID and cmap.lut[91] == seg.VOID  # ids not in the file


def test_coco_map_order_follows_sorted_ids(tmp_path: Path) -> None:
    cats = [{"id": 7, "name": "road", "supercategory": "ground", "isthing": 0},
            {"id": 2, "name": "cat", "supercategory": "animal", "isthing": 1},
            {"id": 5, "name": "dog", "supercategory": "animal", "isthing": 1}]
    path = tmp_path / "cats.json"
    path.write_text(json.dumps({"categories": cats}))
    cmap = seg.class_map(path)
    assert cmap.names == ["animal", "ground"]
    assert list(cmap.lut[[0, 2, 5, 7, 3]]) == [seg.VOID, 0, 0, 1, seg.VOID]


def test_yaml_class_map_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_text("classes: [sky, road]\nmap: {7: sky, '9': 1, 3: road}\nvoid: [0, 255]\n")
    cmap = seg.class_map(path)
    assert cmap.names == ["sky", "road"]
    assert list(cmap.lut[[7, 9, 3, 0, 255]]) == [0, 1, 1, seg.VOID, seg.VOID]
    assert set(np.flatnonzero(cmap.valid)) == {0, 3, 7, 9, 255}
    assert seg.class_map(cmap) is cmap

    path.write_text("classes: [sky, road]\nmap: {7: grass}\n")
    with pytest.raises(DataError, match=r"map\.yaml.*7 -> 'grass' is not a class"):
        seg.class_map(path)
    path.write_text("classes: [sky]\nmap: {300: sky}\n")
    with pytest.raises(DataError, match=r"map\.yaml.*300 is not a mask value"):
        seg.class_map(path)
    path.write_text("classes: [sky]\nmap: {4: sky}\nvoid: [4]\n")
    with pytest.raises(DataError, match="both mapped"):
        seg.class_map(path)
    path.write_text("{nonsense: 1}\n")
    with pytest.raises(DataError, match="not a class map"):
        seg.class_map(path)
    with pytest.raises(ConfigError, match="neither a built-in class map"):
        seg.class_map("cityscapes")


# ----------------------------------------------------------------------------- convert

def test_convert_sample(sample: Path, tmp_path: Path) -> None:
    assert "SYNTHETIC" in (sample / "README.txt").read_text()
    dst = tmp_path / "shards"
    manifest = seg.convert_segmentation(sample / "images", sample / "masks", dst,
                                        classes=sample / "classes.yaml")
    extra = manifest["extra"]
    assert manifest["format"] == seg.FORMAT and manifest["rows"] == 6
    assert extra["class_names"] == ["sky", "grass", "road", "box", "disk"]
    assert extra["void"] == 255 and extra["counts"] == {"train": 4, "val": 2}
    assert extra["five_crop"] == {"ratio": 0.0, "splits": []} and extra["skipped"] == []
    assert extra["class_map_source"] == str(sample / "classes.yaml")
    assert seg.split_names(dst) == ["train", "val"]
    assert seg.split_rows(dst) == {"train": 4, "val": 2}
    assert seg.class_names(dst) == extra["class_names"]
    assert [Path(p).name for p in seg.split_paths(dst, "val")] == extra["split_shards"]["val"]
    with pytest.raises(DataError, match="split 'test' not in"):
        seg.split_paths(dst, "test")
    lut = {10: 0, 20: 1, 30: 2, 40: 3, 50: 4, 0: 255}
    pixels = np.zeros(5, np.int64)
    for row in _rows(dst):
        raw = np.array(Image.open(sample / "masks" / row["path"]))
        mask = seg.decode_mask(row["mask"])
        assert mask.dtype == np.uint8 and mask.shape == (row["height"], row["width"]) == (32, 32)
        assert row["image"] == (sample / "images" / row["path"]).read_bytes()
        for y, x in ((0, 0), (16, 16), (31, 5), (1, 1), (20, 30)):
            assert mask[y, x] == lut[int(raw[y, x])]
        assert (mask[0] == 255).all() and (mask[:, -1] == 255).all()
        assert mask[1, 1] == 0 and mask[30, 15] != 0  # sky at the top, ground below
        if row["split"] == "train":
            pixels += np.bincount(mask[mask != 255], minlength=5)
    assert extra["pixels"]["train"] == pixels.tolist()
    assert extra["void_pixels"]["train"] == 4 * (4 * 32 - 4)

    info = inspect_shards(dst)
    assert info["split_rows"] == {"train": 4, "val": 2}
    assert abs(sum(info["pixel_share"].values()) - 1) < 1e-9
    text = format_inspection(info)
    assert "train" in text and "sky" in text and "void" in text


def test_sample_is_deterministic(tmp_path: Path) -> None:
    a = seg.write_segmentation_sample(tmp_path / "a", seed=3, train_images=2, val_images=1,
                                      size=16)
    b = seg.write_segmentation_sample(tmp_path / "b", seed=3, train_images=2, val_images=1,
                                      size=16)
    for rel in ("images/train/0001.png", "masks/val/0000.png", "classes.yaml"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    values = np.unique(np.array(Image.open(a / "masks/train/0000.png")))
    assert set(values) <= {0, 10, 20, 30, 40, 50} and {0, 10}.issubset(values)


def test_five_crop_boxes() -> None:
    # (top, left, side, side) in torchvision's order: tl, tr, bl, br, centre
    assert seg.five_crop_boxes(4, 6, 0.5) == [(0, 0, 2, 2), (0, 4, 2, 2), (2, 0, 2, 2),
                                              (2, 4, 2, 2), (1, 2, 2, 2)]
    # side round(4 * 0.75) = 3; centre offsets round(0.5) = 0 and round(1.5) = 2
    assert seg.five_crop_boxes(4, 6, 0.75)[4] == (0, 2, 3, 3)
    assert seg.five_crop_boxes(6, 4, 1.0) == [(0, 0, 4, 4), (0, 0, 4, 4), (2, 0, 4, 4),
                                              (2, 0, 4, 4), (1, 0, 4, 4)]


def test_five_crop_boxes_match_torchvision() -> None:
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("torchvision.transforms.functional")
    for h, w, ratio in ((4, 6, 0.5), (4, 6, 0.75), (7, 10, 0.5), (360, 480, 0.5)):
        x = torch.arange(h * w).reshape(1, h, w)
        side = round(min(h, w) * ratio)
        crops = tf.five_crop(x, [side, side])
        for crop, (top, left, ch, cw) in zip(crops, seg.five_crop_boxes(h, w, ratio),
                                             strict=True):
            assert torch.equal(crop, x[:, top:top + ch, left:left + cw])


def test_convert_five_crop(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    values = np.arange(24, dtype=np.uint8).reshape(4, 6)
    pixels = np.stack([values * 10, values * 5, 255 - values], axis=-1).astype(np.uint8)
    for split in ("train", "val"):
        _write(raw / "images" / split / "a.png", pixels)
        _write(raw / "masks" / split / "a.png", values)
    Image.fromarray(pixels).save(raw / "images" / "train" / "b.jpg", quality=100)
    _write(raw / "masks" / "train" / "b.png", values)
    dst = tmp_path / "shards"
    manifest = seg.convert_segmentation(raw / "images", raw / "masks", dst,
                                        classes=_identity_map(tmp_path / "m.yaml", 24),
                                        five_crop=0.5)
    assert manifest["extra"]["counts"] == {"train": 10, "val": 1}
    assert manifest["extra"]["five_crop"] == {"ratio": 0.5, "splits": ["train"]}
    rows = {r["path"]: r for r in _rows(dst)}
    boxes = seg.five_crop_boxes(4, 6, 0.5)
    for i, (top, left, h, w) in enumerate(boxes):
        row = rows[f"train/a.png#crop{i}"]
        assert (row["height"], row["width"]) == (2, 2)
        expected = values[top:top + h, left:left + w]
        np.testing.assert_array_equal(seg.decode_mask(row["mask"]), expected)
        image = Image.open(io.BytesIO(row["image"]))
        assert image.format == "PNG"
        np.testing.assert_array_equal(np.array(image), pixels[top:top + h, left:left + w])
        jpeg = Image.open(io.BytesIO(rows[f"train/b.jpg#crop{i}"]["image"]))
        assert jpeg.format == "JPEG" and jpeg.size == (2, 2)
        np.testing.assert_array_equal(seg.decode_mask(rows[f"train/b.jpg#crop{i}"]["mask"]),
                                      expected)
    whole = rows["val/a.png"]
    assert (whole["height"], whole["width"]) == (4, 6)
    assert whole["image"] == (raw / "images" / "val" / "a.png").read_bytes()


def test_split_renaming_and_annot_folders(tmp_path: Path) -> None:
    root = tmp_path / "camvid_like"
    for folder in ("train2017", "val2017"):
        _write(root / folder / "x.png", np.zeros((4, 4, 3), np.uint8))
        _write(root / f"{folder}annot" / "x.png", np.full((4, 4), 11, np.uint8))
    dst = tmp_path / "shards"
    manifest = seg.convert_segmentation(root, root, dst, classes="camvid",
                                        splits=["train=train2017"])
    assert manifest["extra"]["split_folders"] == {"train": "train2017"}
    (row,) = _rows(dst)
    assert row["split"] == "train" and row["path"] == "train2017/x.png"
    assert (seg.decode_mask(row["mask"]) == 255).all()
    seg.convert_segmentation(root, root, dst, classes="camvid", overwrite=True,
                             splits={"a": "train2017", "b": "val2017"})
    assert seg.split_rows(dst) == {"a": 1, "b": 1}
    with pytest.raises(DataError, match=r"split folder\(s\) test not found.*train2017"):
        seg.convert_segmentation(root, root, tmp_path / "x", classes="camvid",
                                 splits="test")


def _bad_tree(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    for name in ("a", "b", "c", "d"):
        _write(raw / "images" / "train" / f"{name}.png", np.zeros((4, 6, 3), np.uint8))
    _write(raw / "masks" / "train" / "a.png", np.ones((4, 6), np.uint8))
    _write(raw / "masks" / "train" / "b.png", np.ones((5, 6), np.uint8))  # wrong size
    _write(raw / "masks" / "train" / "d.png", np.full((4, 6), 9, np.uint8))  # unknown value
    # c has no mask
    return raw


def test_bad_inputs_name_the_file_and_write_nothing(tmp_path: Path) -> None:
    raw = _bad_tree(tmp_path)
    cmap = _identity_map(tmp_path / "m.yaml", 2)
    dst = tmp_path / "shards"
    with pytest.raises(DataError) as err:
        seg.convert_segmentation(raw / "images", raw / "masks", dst, classes=cmap)
    text = str(err.value)
    assert str(raw / "images" / "train" / "b.png") in text
    assert "6x4" in text and "6x5" in text and "skip" in text
    assert not dst.exists() and not any(p.name.startswith(".shards") for p in tmp_path.iterdir())
    (raw / "masks" / "train" / "b.png").unlink()
    with pytest.raises(DataError, match=r"train/b\.png: no mask .*masks/train/b\.png"):
        seg.convert_segmentation(raw / "images", raw / "masks", dst, classes=cmap)
    _write(raw / "masks" / "train" / "b.png", np.ones((4, 6, 3), np.uint8))
    with pytest.raises(DataError, match=r"train/b\.png: mask .* not single-channel \(mode RGB"):
        seg.convert_segmentation(raw / "images", raw / "masks", dst, classes=cmap)
    (raw / "masks" / "train" / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="mask .*b.png"):
        seg.convert_segmentation(raw / "images", raw / "masks", dst, classes=cmap)
    (raw / "masks" / "train" / "b.png").unlink()
    (raw / "images" / "train" / "b.png").unlink()
    _write(raw / "masks" / "train" / "c.png", np.ones((4, 6), np.uint8))
    with pytest.raises(DataError, match=r"train/d\.png: mask .*d\.png holds value 9 .*m\.yaml"):
        seg.convert_segmentation(raw / "images", raw / "masks", dst, classes=cmap)
    assert not dst.exists()


def test_skip_bad_lists_the_skipped(tmp_path: Path) -> None:
    raw = _bad_tree(tmp_path)
    dst = tmp_path / "shards"
    manifest = seg.convert_segmentation(raw / "images", raw / "masks", dst, skip_bad=True,
                                        classes=_identity_map(tmp_path / "m.yaml", 2))
    skipped = manifest["extra"]["skipped"]
    assert [s["path"] for s in skipped] == ["train/b.png", "train/c.png", "train/d.png"]
    assert "6x5" in skipped[0]["reason"] and "no mask" in skipped[1]["reason"]
    assert "value 9" in skipped[2]["reason"]
    assert [r["path"] for r in _rows(dst)] == ["train/a.png"]
    assert inspect_shards(dst)["skipped"]["bad_file"] == skipped


def test_five_crop_ratio_checked(sample: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="five_crop"):
        seg.convert_segmentation(sample / "images", sample / "masks", tmp_path / "x",
                                 classes=sample / "classes.yaml", five_crop=1.5)


# ------------------------------------------------------------------------------ real data

def _copy_real(src_images: Path, src_masks: Path, dst: Path, count: int) -> None:
    for image in sorted(src_images.glob("*.jpg"))[:count]:
        (dst / "images" / "s").mkdir(parents=True, exist_ok=True)
        (dst / "masks" / "s").mkdir(parents=True, exist_ok=True)
        shutil.copy(image, dst / "images" / "s" / image.name)
        shutil.copy(src_masks / f"{image.stem}.png", dst / "masks" / "s" / f"{image.stem}.png")


def test_real_coco128(real_data_root: Path, tmp_path: Path) -> None:
    root = real_data_root / "coco128"
    if not (root / "semantic").is_dir() or not (real_data_root / PANOPTIC).is_file():
        pytest.skip(f"coco128 semantic masks not found under {root}")
    _copy_real(root / "images" / "val2017", root / "semantic" / "val2017", tmp_path / "raw", 3)
    cmap = seg.class_map(real_data_root / PANOPTIC)
    dst = tmp_path / "shards"
    seg.convert_segmentation(tmp_path / "raw" / "images", tmp_path / "raw" / "masks", dst,
                             classes=real_data_root / PANOPTIC, five_crop=0.5,
                             five_crop_splits=("s",))
    rows = _rows(dst)
    assert len(rows) == 15 and all("#crop" in r["path"] for r in rows)
    seen: set[int] = set()
    for row in rows:
        mask = seg.decode_mask(row["mask"])
        assert mask.shape == (row["height"], row["width"]) == (row["height"],) * 2
        assert Image.open(io.BytesIO(row["image"])).format == "JPEG"
        assert set(np.unique(mask)) <= {*range(27), 255}
        seen |= set(np.unique(mask).tolist())
    for image in sorted((tmp_path / "raw" / "images" / "s").iterdir()):
        raw = np.array(Image.open(tmp_path / "raw" / "masks" / "s" / f"{image.stem}.png"))
        crop0 = next(r for r in rows if r["path"] == f"s/{image.name}#crop0")
        side = crop0["height"]
        np.testing.assert_array_equal(seg.decode_mask(crop0["mask"]),
                                      cmap.lut[raw[:side, :side]])
    assert 255 in seen and len(seen - {255}) >= 3  # several coarse classes, some unlabelled


def test_real_camvid(real_data_root: Path, tmp_path: Path) -> None:
    root = real_data_root / "camvid"
    if not (root / "trainannot").is_dir():
        pytest.skip(f"camvid not found at {root}")
    _copy_real(root / "train", root / "trainannot", tmp_path / "raw", 3)
    dst = tmp_path / "shards"
    seg.convert_segmentation(tmp_path / "raw" / "images", tmp_path / "raw" / "masks", dst,
                             classes="camvid")
    for row in _rows(dst):
        assert (row["height"], row["width"]) == (360, 480)
        assert row["image"] == (tmp_path / "raw" / "images" / row["path"]).read_bytes()
        mask = seg.decode_mask(row["mask"])
        raw = np.array(Image.open(tmp_path / "raw" / "masks" / Path(row["path"])
                                  .with_suffix(".png")))
        np.testing.assert_array_equal(mask[raw < 11], raw[raw < 11])
        assert (mask[raw == 11] == 255).all()
        present = set(np.unique(mask).tolist())
        assert present <= {*range(11), 255}
        assert {0, 3} <= present  # street scenes: sky and road


# ----------------------------------------------------------------------------------- CLI

def test_cli_sample_convert_inspect(tmp_path: Path, capsys) -> None:
    raw, dst = str(tmp_path / "raw"), str(tmp_path / "shards")
    assert main(["data", "sample", "segmentation", raw, "--seed", "1", "--size", "32"]) == 0
    assert "classes.yaml" in capsys.readouterr().out
    assert main(["data", "convert", "segmentation", f"{raw}/images", f"{raw}/masks", dst,
                 "--classes", f"{raw}/classes.yaml", "--splits", "train,val",
                 "--five-crop", "0.5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"] == {"train": 24 * 5, "val": 8} and summary["classes"] == 5
    assert summary["skipped"] == 0 and summary["rows"] == 128
    assert main(["data", "inspect", dst]) == 0
    out = capsys.readouterr().out
    assert "segmentation" in out and "five-crops" in out and "grass" in out
    assert main(["data", "convert", "segmentation", f"{raw}/images", f"{raw}/masks", dst,
                 "--classes", f"{raw}/classes.yaml", "--splits", "t=train",
                 "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"] == {"t": 24}


def test_cli_errors(tmp_path: Path, capsys) -> None:
    raw, dst = tmp_path / "raw", str(tmp_path / "shards")
    seg.write_segmentation_sample(raw, train_images=1, val_images=1, size=16)
    assert main(["data", "convert", "segmentation", str(raw / "images"), str(raw / "masks"),
                 dst]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--classes MAP is required" in err[0]
    assert main(["data", "convert", "segmentation", str(raw / "images"), dst,
                 "--classes", "camvid"]) == 2
    assert "expected 3 paths" in capsys.readouterr().err
    assert main(["data", "convert", "imagefolder", str(raw), dst, "--five-crop", "0.5"]) == 2
    assert "--five-crop: only for segmentation" in capsys.readouterr().err
    assert main(["data", "convert", "segmentation", str(raw / "images"), str(raw / "masks"),
                 dst, "--classes", "camvid"]) == 2
    assert "neither maps nor marks void" in capsys.readouterr().err
    assert not Path(dst).exists()
