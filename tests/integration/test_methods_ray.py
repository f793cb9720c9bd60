"""Every registered method runs one epoch in-process (``--workers 0``) on its data sample,
through the CLI, and writes what every run writes (as timm runs every registered model).

The samples are what a fresh clone has: the project's own synthetic JIGSAWS sample, image
sample and CLEAR stream drawn from it; a method added to the registry adds its entry to
SMOKE, or test_every_method_has_a_smoke_run fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import scenarios

from raylab.cli import main
from raylab.engine.checkpoint import load_meta
from raylab.registry import list_methods

pytestmark = pytest.mark.ray

#: The smallest run of each method that still goes through all of its code.
SMOKE = {
    "skill": ["--set", "folds=[supertrial1]", "--set", "step=10"],
    "convnext": ["--set", "model=convnext_atto", "--set", "input_size=32",
                 "--set", "optim.batch_size=32", "--set", "optim.reference_batch=32",
                 "--set", "optim.warmup_epochs=0", "--set", "max_train_rows=96"],
    "dino": ["--set", "arch=vit_tiny_patch16_224", "--set", "img_size=32",
             "--set", "patch_size=8", "--set", "depth=1", "--set", "n_local_crops=1",
             "--set", "out_dim=64", "--set", "hidden_dim=32", "--set", "bottleneck_dim=16",
             "--set", "optim.batch_size=16", "--set", "optim.warmup_epochs=0",
             "--set", "warmup_teacher_temp_epochs=0", "--set", "linear_probe_epochs=2",
             "--set", "max_train_rows=64"],
    "clear": ["--set", "model=test_resnet", "--set", "input_size=16",
              "--set", "optim.batch_size=8"],
    "minivit": ["--set", "model=vit_tiny_patch16_224", "--set", "input_size=32",
                "--set", "patch_size=8", "--set", "depth=2", "--set", "optim.batch_size=16",
                "--set", "optim.warmup_epochs=0", "--set", "max_train_rows=64"],
    # The backbone: a saved ResNet-10-T run (tests/scenarios.py), frozen, with an adapter.
    "reuse": ["--set", "input_size=32", "--set", "optim.batch_size=16",
              "--set", "optim.warmup_epochs=0", "--set", "max_train_rows=64",
              "--set", "adapters.every=1", "--set", "adapters.dim=8"],
    "detection": ["--set", "model=vit_tiny_patch16_224", "--set", "image_size=64",
                  "--set", "model_kwargs={depth: 2, embed_dim: 32, num_heads: 2, patch_size: 8}",
                  "--set", "window_size=4", "--set", "global_blocks=[1]", "--set", "channels=16",
                  "--set", "optim.batch_size=4", "--set", "max_train_rows=8",
                  "--set", "report_images=2"],
    # The backbone: a saved 2-block ViT DINO run (tests/scenarios.py).
    "stego": ["--set", "optim.batch_size=8", "--set", "kmeans_iters=5",
              "--set", "loss.feature_samples=4"],
}


@pytest.fixture(scope="module")
def samples(sample_shards: Path, tiny_clear_stream: Path, detection_shards: Path,
            tmp_path_factory) -> dict:
    from raylab.data.imagefolder import convert_imagefolder, write_image_sample

    root = tmp_path_factory.mktemp("method_samples")
    images = write_image_sample(root / "raw", classes=4, train_per_class=30, test_per_class=10)
    convert_imagefolder(images, root / "images")
    return {"skill": sample_shards, "convnext": root / "images", "dino": root / "images",
            "clear": tiny_clear_stream, "detection": detection_shards,
            "minivit": root / "images", "reuse": root / "images",
            "stego": segmentation_shards(root)}


def segmentation_shards(root: Path) -> Path:
    from raylab.data.segmentation import convert_segmentation, write_segmentation_sample

    raw = write_segmentation_sample(root / "seg_raw", train_images=12, val_images=4)
    convert_segmentation(raw / "images", raw / "masks", root / "seg",
                         classes=raw / "classes.yaml")
    return root / "seg"


def test_every_method_has_a_smoke_run() -> None:
    assert set(SMOKE) == set(list_methods())


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_one_epoch_in_process(ray_cluster, samples: dict, name: str, tmp_path: Path) -> None:
    extra = {"reuse": ["--set", f"backbone_checkpoint={scenarios.reuse_backbone()}"],
             "stego": ["--set", f"backbone={scenarios.stego_backbone()}"]}.get(name, [])
    rc = main(["train", name, "--data", str(samples[name]), *SMOKE[name], *extra,
               "--set", "optim.epochs=1", "--workers", "0", "--storage", str(tmp_path),
               "--name", "one"])
    assert rc == 0
    exp = tmp_path / "one"
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["method"] == name
    for file in ("config.yaml", "report.md"):
        assert (exp / file).stat().st_size > 0, file
    runs = [p.parent for p in exp.glob("*/metrics.jsonl")]
    assert runs, "no run wrote metrics.jsonl"
    for run in runs:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        # One epoch; CLEAR's epochs are the stream's 4 labelled buckets (1 pass each).
        expected = [1, 2, 3, 4] if name == "clear" else [1]
        assert [r["epoch"] for r in rows] == expected and rows[0]["run"] == run.name
        # The final model, where users find it, with what it needs besides the data.
        assert load_meta(run / "model")["method"] == name
