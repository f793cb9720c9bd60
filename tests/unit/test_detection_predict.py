"""A trained detector on images (no Ray): predictions come back in the image's own pixels,
``raylab predict detection`` writes COCO results and pictures, bad inputs are one error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raylab import config as cfglib
from raylab.cli import main
from raylab.data.coco import decode_masks
from raylab.engine.restore import export_folder
from raylab.errors import CheckpointError, DataError
from raylab.tasks.detection.config import DetectionConfig
from raylab.tasks.detection.predict import (
    TrainedDetector,
    draw_detections,
    image_files,
    predict_folder,
)
from raylab.tasks.detection.task import build_model

CATEGORIES = [{"id": 3, "name": "circle", "supercategory": "shape"},
              {"id": 7, "name": "square", "supercategory": "shape"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported detector as a run writes it (random weights, every detection kept)."""
    cfg = cfglib.apply_overrides(DetectionConfig(), {
        "model": "vit_tiny_patch16_224", "image_size": 64, "window_size": 4,
        "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
        "global_blocks": [1], "channels": 16, "score_threshold": 0.0,
        "detections_per_image": 10})
    model = build_model(cfg, len(CATEGORIES) + 1)
    meta = {"method": "detection", "config": cfglib.to_dict(cfg), "categories": CATEGORIES,
            "image_size": 64}
    return export_folder(tmp_path_factory.mktemp("det") / "model", model=model, epoch=1,
                         step=1, meta=meta)


def test_predictions_are_in_the_images_own_pixels(model_dir: Path) -> None:
    detector = TrainedDetector(model_dir)
    image = np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8)
    found = detector(image, image_id=7)
    assert found, "a random detector with score threshold 0 keeps its top detections"
    for d in found:
        x, y, w, h = d["bbox"]
        assert d["image_id"] == 7 and d["category_id"] in (3, 7)
        assert 0 <= x and 0 <= y and x + w <= 90 + 1e-3 and y + h <= 50 + 1e-3
        assert d["segmentation"]["size"] == [50, 90]
        assert decode_masks([d["segmentation"]["counts"]], 50, 90).shape == (1, 50, 90)


def test_draw_tints_the_mask_and_leaves_the_rest() -> None:
    image = np.full((40, 40, 3), 100, np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 10:20] = 1
    from raylab.data.coco import encode_masks

    det = {"image_id": 1, "category_id": 3, "bbox": [10, 10, 10, 10], "score": 0.9,
           "segmentation": {"size": [40, 40], "counts": encode_masks(mask[None])[0].decode()}}
    drawn = np.asarray(draw_detections(image, [det], {3: "circle"}))
    assert not np.array_equal(drawn[15, 15], image[15, 15])  # inside: tinted
    assert np.array_equal(drawn[35, 35], image[35, 35])  # outside everything: unchanged
    low = np.asarray(draw_detections(image, [dict(det, score=0.1)], {3: "circle"}))
    assert np.array_equal(low, image)  # below min_score: not drawn


def test_predict_command_writes_results_and_pictures(model_dir: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate(((30, 40), (64, 48))):
        Image.fromarray(np.full((*size, 3), 60 * i, np.uint8)).save(images / f"im{i}.png")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main(["predict", "detection", str(images), str(out), "--checkpoint",
                 str(model_dir)]) == 0
    listed = json.loads((out / "images.json").read_text())
    assert [e["file_name"] for e in listed] == ["im0.png", "im1.png"]
    results = json.loads((out / "detections.json").read_text())
    assert {d["image_id"] for d in results} <= {1, 2}
    assert sorted(p.name for p in (out / "pictures").iterdir()) == ["im0.png", "im1.png"]


def test_bad_inputs_are_one_clear_error(model_dir: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(DataError, match="no images"):
        image_files(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        predict_folder(model_dir, tmp_path, tmp_path / "out")
    other = export_folder(tmp_path / "skill_model", model=build_model(
        cfglib.from_dict(DetectionConfig, json.loads((model_dir / "meta.json").read_text())[
            "config"]), 3), epoch=1, step=1, meta={"method": "skill"})
    with pytest.raises(CheckpointError, match="not of the detection method"):
        TrainedDetector(other)
    assert main(["predict", "detection", str(tmp_path), str(tmp_path / "o"),
                 "--checkpoint", str(tmp_path / "missing")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]
