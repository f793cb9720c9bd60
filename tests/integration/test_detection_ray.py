"""Detection end to end on local Ray, on the SYNTHETIC detection sample (always there):
2 Train workers with LSJ and Simple Copy-Paste in Ray Data tasks, the loss falls, COCO AP
of every evaluation image is reported, the report draws detections and training samples,
and the same name resumes from its last checkpoint; then ``raylab predict detection``
on the run's model.

That the detector learns the sample to a high AP is a benchmark (BENCHMARKS.md, "Detection
on CPU"): it takes minutes, more than a test should.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylab.cli import main
from raylab.data.coco import decode_masks
from raylab.engine.checkpoint import load_meta

pytestmark = pytest.mark.ray

TINY_VITDET = ["--set", "model=vit_tiny_patch16_224", "--set", "image_size=64",
               "--set", "model_kwargs={depth: 2, embed_dim: 48, num_heads: 2, patch_size: 8}",
               "--set", "window_size=4", "--set", "global_blocks=[1]", "--set", "channels=32",
               "--set", "optim.batch_size=8", "--set", "optim.reference_batch=8",
               "--set", "optim.lr=1e-3", "--set", "optim.warmup_iters=2",
               "--set", "optim.schedule=cosine", "--set", "aug.scale_range=[0.8, 1.25]",
               "--set", "eval_every=1", "--set", "checkpoint_every=1",
               "--set", "report_images=2"]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_workers_train_evaluate_resume_and_predict(ray_cluster, detection_shards: Path,
                                                       tmp_path: Path) -> None:
    # Simple Copy-Paste between the rows of each Ray Data batch, on the CPU tasks.
    args = ["train", "detection", "--data", str(detection_shards), *TINY_VITDET,
            "--set", "aug.copy_paste.prob=0.5", "--storage", str(tmp_path), "--name", "det"]
    assert main([*args, "--workers", "2", "--set", "optim.epochs=2"]) == 0
    exp = tmp_path / "det"
    rows = _rows(exp / "run")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert all(r["train_samples"] == 32 for r in rows)  # 32 images, batch 8: no remainder
    # COCOeval on the chief over every evaluation image, gathered from both workers.
    assert all(r["test_rows"] == 8 for r in rows)
    assert all(0.0 <= r["test_bbox_AP"] <= 1.0 and 0.0 <= r["test_segm_AP50"] <= 1.0
               for r in rows)
    assert all(r["replica_drift"] == 0.0 for r in rows)
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["eval_images"] == 8 and summary["classes"] == ["circle", "square",
                                                                  "triangle"]
    assert summary["bbox"]["AP"] == pytest.approx(rows[-1]["test_bbox_AP"])
    report = (exp / "report.md").read_text()
    assert "| box |" in report and "| mask |" in report
    # AP by class frequency: every class in a bin by its training instances, and that
    # bin's AP in the metrics and the report.
    bins = summary["frequency_bins"]
    assert sorted(c for names in bins.values() for c in names) == summary["classes"]
    scored = [f"test_bbox_AP_{name}" for name, names in bins.items() if names]
    assert scored and all(0.0 <= rows[-1][k] <= 1.0 for k in scored if k in rows[-1])
    assert any(k in rows[-1] for k in scored)
    assert "AP by class frequency" in report
    assert len(list((exp / "pictures").glob("*.png"))) == 2
    assert "after Simple Copy-Paste" in report and (exp / "samples.png").is_file()
    model = exp / "run" / "model"
    assert load_meta(model)["method"] == "detection"

    # The trained model on a folder of images: COCO results and pictures.
    images = sorted((detection_shards.parent / "raw" / "images" / "val").iterdir())[:3]
    folder = tmp_path / "some_images"
    folder.mkdir()
    for path in images:
        (folder / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "predicted"
    assert main(["predict", "detection", str(folder), str(out), "--checkpoint", str(model),
                 "--min-score", "0.0"]) == 0
    detections = json.loads((out / "detections.json").read_text())
    assert {d["image_id"] for d in detections} <= {1, 2, 3}
    assert all(len(d["bbox"]) == 4 and d["segmentation"]["size"] == [64, 64]
               for d in detections)
    assert len(list((out / "pictures").glob("*.png"))) == 3

    # Self-training: the model labels the image folder in a Ray Data job (a coco shard
    # set).
    pseudo = tmp_path / "pseudo"
    assert main(["predict", "detection", str(folder), str(pseudo), "--checkpoint",
                 str(model), "--min-score", "0.0", "--pseudo-labels"]) == 0
    manifest = json.loads((pseudo / "manifest.json").read_text())
    assert manifest["format"] == "coco" and manifest["rows"] == 3
    # Every detection whose mask covers a pixel (the same model, the same images).
    assert manifest["extra"]["counts"]["instances"] == sum(
        int(decode_masks([d["segmentation"]["counts"]], 64, 64).any()) for d in detections)

    # The same name with a longer schedule continues at epoch 3 (in-process this time: a
    # checkpoint of 2 workers restores anywhere), now self-training: on the 32 labeled +
    # 3 pseudo-labeled images.
    assert main([*args, "--workers", "0", "--set", "optim.epochs=3",
                 "--set", f"pseudo={pseudo}"]) == 0
    assert [r["epoch"] for r in _rows(exp / "run")] == [1, 2, 3]
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["pseudo_images"] == 3 and summary["train_images"] == 32
    assert "32 training images + 3 pseudo-labeled" in (exp / "report.md").read_text()


def test_bad_split_folder_is_one_clear_error(ray_cluster, detection_shards: Path,
                                             tmp_path: Path, capsys) -> None:
    rc = main(["train", "detection", "--data", str(detection_shards), *TINY_VITDET,
               "--set", "eval_split=test2017", "--workers", "0", "--storage", str(tmp_path)])
    assert rc != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no coco shard folder for split 'test2017'" in err[0]


def test_the_augmentation_stream_follows_the_epoch_clock(ray_cluster,
                                                        detection_shards: Path) -> None:
    """What a resumed run relies on: the training rows a dataset planned afresh produces
    for epoch k (scale jitter, flip, paste partner and pasted objects) are those the first
    one produced for k, whatever Ray Data's block order; another epoch's differ. Held in
    the object store and streamed from the (one) shard file, the pool is the same 32
    images, so both paths make the same rows."""
    import hashlib
    from dataclasses import replace

    from raylab import config as cfglib
    from raylab.runtime.datasets import EpochClock
    from raylab.tasks.detection.config import DetectionConfig
    from raylab.tasks.detection.data import load_detection_data, train_dataset

    cfg = cfglib.apply_overrides(DetectionConfig(), {
        "data": str(detection_shards), "image_size": 64, "aug.jitter": "lsj",
        "aug.copy_paste.prob": 1.0, "seed": 5})
    data = load_detection_data(cfg)
    assert len(data.train_paths) == 1

    def epoch_rows(epoch: int, materialize_mb: int = cfg.materialize_mb) -> dict[int, str]:
        clock = EpochClock()  # a new run: a new dataset and a new clock
        ds = train_dataset(data.train_paths, replace(cfg, materialize_mb=materialize_mb),
                           data.label_map, epoch=clock)
        # A small epoch: without Ray Data's allocator (runtime.datasets).
        assert ds.context.op_resource_reservation_enabled is False
        clock.set(epoch)
        rows = {}
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i, image_id in enumerate(batch["image_id"]):
                digest = hashlib.sha256(batch["image"][i].tobytes())
                for key in ("boxes", "pasted", "ann_ids", "masks"):
                    digest.update(batch[key][i].tobytes())
                rows[int(image_id)] = digest.hexdigest()
                pasted.append(int(batch["pasted"][i].sum()))
        return rows

    pasted: list[int] = []
    first = epoch_rows(2)
    assert len(first) == data.train_rows
    assert sum(n > 0 for n in pasted) > data.train_rows // 2  # most images received objects
    assert epoch_rows(2) == first
    assert epoch_rows(2, materialize_mb=0) == first
    other = epoch_rows(3)
    assert other.keys() == first.keys()
    assert sum(other[k] != first[k] for k in first) == len(first)
