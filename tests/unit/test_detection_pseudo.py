"""Self-training's pseudo-labels without Ray: a detector's detections become the
annotation columns of coco shard rows (ids, xywh boxes, RLE masks, areas in mask pixels),
the shard set they make joins a training split, and bad inputs are one clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raylab import config as cfglib
from raylab.data.coco import coco_manifest, decode_masks, read_categories
from raylab.data.shards import write_shards
from raylab.engine.restore import export_folder
from raylab.errors import DataError
from raylab.tasks.detection.config import DetectionConfig
from raylab.tasks.detection.data import load_detection_data, read_batch
from raylab.tasks.detection.predict import read_image
from raylab.tasks.detection.pseudo import (
    IDS_PER_IMAGE,
    INPUT_COLUMNS,
    PseudoLabeler,
    _row_tables,
    pseudo_label,
)
from raylab.tasks.detection.task import build_model


def _random_detector(folder: Path, categories: list[dict]) -> Path:
    """An exported detector as a run writes it (random weights, every detection kept)."""
    cfg = cfglib.apply_overrides(DetectionConfig(), {
        "model": "vit_tiny_patch16_224", "image_size": 64, "window_size": 4,
        "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
        "global_blocks": [1], "channels": 16, "score_threshold": 0.0,
        "detections_per_image": 10})
    torch.manual_seed(0)
    model = build_model(cfg, len(categories) + 1)
    meta = {"method": "detection", "config": cfglib.to_dict(cfg), "categories": categories,
            "image_size": 64}
    return export_folder(folder / "model", model=model, epoch=1, step=1, meta=meta)


@pytest.fixture(scope="module")
def labeled(detection_shards: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Path, dict]:
    """The detector over the sample's validation images, as pseudo-label columns."""
    model = _random_detector(tmp_path_factory.mktemp("pseudo"),
                             read_categories(detection_shards / "train"))
    batch = {k: v for k, v in read_batch(detection_shards / "val").items()
             if k in INPUT_COLUMNS}
    return model, PseudoLabeler(str(model), threshold=0.0, device="cpu")(batch)


def test_rows_carry_the_detections_as_coco_annotations(labeled: tuple[Path, dict]) -> None:
    _, out = labeled
    assert len(out["image_id"]) == 8 and sum(len(a) for a in out["ann_ids"]) > 0
    for i, image_id in enumerate(out["image_id"]):
        n = len(out["ann_ids"][i])
        np.testing.assert_array_equal(out["ann_ids"][i],
                                      int(image_id) * IDS_PER_IMAGE + np.arange(n))
        assert len(out["boxes"][i]) == 4 * n and len(out["category_ids"][i]) == n
        assert set(out["category_ids"][i].tolist()) <= {1, 2, 3}
        assert (out["iscrowd"][i] == 0).all()
        h, w = int(out["height"][i]), int(out["width"][i])
        masks = decode_masks(list(out["masks"][i]), h, w)
        # The area is the mask's pixel count, and no mask is empty.
        np.testing.assert_array_equal(out["areas"][i], masks.sum(axis=(1, 2)))
        assert (masks.sum(axis=(1, 2)) > 0).all()
        boxes = out["boxes"][i].reshape(-1, 4)
        assert (boxes[:, :2] >= -1e-3).all() and (boxes[:, 0] + boxes[:, 2] <= w + 1e-3).all()


def test_the_threshold_keeps_exactly_the_detections_above_it(
        labeled: tuple[Path, dict], detection_shards: Path) -> None:
    model, low = labeled
    batch = {k: v for k, v in read_batch(detection_shards / "val").items()
             if k in INPUT_COLUMNS}
    high = PseudoLabeler(str(model), threshold=0.2, device="cpu")
    out = high(batch)
    for i in range(8):
        assert len(out["ann_ids"][i]) <= len(low["ann_ids"][i])
        h, w = int(batch["height"][i]), int(batch["width"][i])
        # The same detector by hand: scores >= 0.2 whose masks cover a pixel.
        expected = [d for d in high.detector(read_image(bytes(batch["image"][i])), 0)
                    if d["score"] >= 0.2 and decode_masks(
                        [d["segmentation"]["counts"]], h, w).any()]
        assert out["category_ids"][i].tolist() == [d["category_id"] for d in expected]


def test_the_shards_join_the_training_split(labeled: tuple[Path, dict],
                                            detection_shards: Path, tmp_path: Path) -> None:
    _, out = labeled
    counts = {"images": 0, "instances": 0, "images_without_instances": 0}
    pseudo = tmp_path / "pseudo"
    write_shards(_row_tables(iter([out]), counts), pseudo, format="coco",
                 extra={"categories": read_categories(detection_shards / "train"),
                        "counts": counts})
    assert coco_manifest(pseudo)["rows"] == 8 == counts["images"]
    cfg = cfglib.apply_overrides(DetectionConfig(), {"data": str(detection_shards),
                                                     "pseudo": str(pseudo)})
    data = load_detection_data(cfg)
    assert data.pseudo_rows == 8 and data.train_rows == 32 and len(data.pseudo_paths) == 1
    # Pseudo-labels of another label set: one error naming the folder.
    other = tmp_path / "other"
    write_shards(_row_tables(iter([out]), dict(counts)), other, format="coco",
                 extra={"categories": [{"id": 1, "name": "cat", "supercategory": "x"}]})
    with pytest.raises(DataError, match="other.*categories differ"):
        load_detection_data(cfglib.apply_overrides(cfg, {"pseudo": str(other)}))


def test_bad_inputs_fail_before_ray_starts(labeled: tuple[Path, dict], tmp_path: Path) -> None:
    model, _ = labeled
    with pytest.raises(DataError, match=r"threshold must be in \[0, 1\)"):
        pseudo_label(model, tmp_path, tmp_path / "out", threshold=1.5)
    (tmp_path / "taken").mkdir()
    with pytest.raises(DataError, match="taken.*exists"):
        pseudo_label(model, tmp_path, tmp_path / "taken")


def test_pasted_objects_are_ground_truth_training_rows(detection_shards: Path,
                                                      tmp_path: Path) -> None:
    """A streamed file's rows draw their paste partners from the training rows of a
    labeled file: a labeled file from itself, a pseudo-labeled one from a labeled file
    drawn per epoch (only ground truth is pasted); a Tune trial's validation rows are
    neither trained on nor pasted, and pseudo-labeled rows are never held out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylab.tasks.detection.data import (
        COLUMNS,
        Partners,
        StreamedTrainFile,
        TrainRows,
        holdout_ids,
    )

    cfg = cfglib.apply_overrides(DetectionConfig(), {
        "data": str(detection_shards), "val_fraction": 0.25})
    labeled = load_detection_data(cfg).train_paths[0]
    table = pq.read_table(labeled, columns=COLUMNS)
    pseudo = str(tmp_path / "pseudo.parquet")
    ids = pa.array(table.column("image_id").to_numpy() + 10_000)
    pq.write_table(table.set_column(0, "image_id", ids), pseudo)
    assert table.column_names[0] == "image_id"
    val = set(holdout_ids([labeled], cfg.val_fraction))
    assert 0 < len(val) < table.num_rows
    stage = StreamedTrainFile(TrainRows(cfg, [labeled, pseudo], False, [labeled]),
                              Partners(prob=1.0, seed=0, epoch=lambda: 4), [labeled])
    labeled_ids = set(table.column("image_id").to_pylist()) - val
    for path in (labeled, pseudo):
        rows = stage(pq.read_table(path, columns=COLUMNS), path)
        own = set(rows.column("image_id").to_pylist())
        partners = set(rows.column("partner_image_id").to_pylist())
        assert partners <= labeled_ids and -1 not in partners
        # The hold-out cuts labeled files only: pseudo-labels are never scored.
        assert own == (labeled_ids if path == labeled else
                       set(ids.to_pylist()))
    # The same file, epoch and seed: the same partners (a resumed run's read task).
    again = stage(pq.read_table(pseudo, columns=COLUMNS), pseudo)
    np.testing.assert_array_equal(again.column("partner_image_id").to_numpy(),
                                  rows.column("partner_image_id").to_numpy())
