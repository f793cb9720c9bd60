"""MiniViT end to end on the shared local Ray cluster: a plain ViT teacher trained in
process, then a multiplexed student distilled from it by 2 Train workers (DDP with shared
parameters), on the project's synthetic image sample (a fresh clone has it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylab.cli import main

pytestmark = pytest.mark.ray

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 4, 60, 20
VIT = ["--set", "model=vit_tiny_patch16_224", "--set", "input_size=32", "--set", "patch_size=8",
       "--set", "depth=4", "--set", "optim.batch_size=32", "--set", "optim.reference_batch=32",
       "--set", "optim.lr=1e-3", "--set", "optim.warmup_epochs=0", "--set", "aug.mixup=0",
       "--set", "aug.cutmix=0", "--set", "aug.auto_augment=", "--set", "aug.re_prob=0"]


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> Path:
    from raylab.data.imagefolder import convert_imagefolder, write_image_sample

    root = tmp_path_factory.mktemp("minivit_images")
    src = write_image_sample(root / "raw", classes=CLASSES, train_per_class=TRAIN_PER_CLASS,
                             test_per_class=TEST_PER_CLASS)
    convert_imagefolder(src, root / "shards")
    return root / "shards"


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_distilled_student_on_two_workers(ray_cluster, image_shards: Path, tmp_path: Path
                                          ) -> None:
    rc = main(["train", "minivit", "--data", str(image_shards), *VIT, "--set", "sharing=none",
               "--set", "transform=false", "--set", "optim.epochs=2", "--workers", "0",
               "--storage", str(tmp_path), "--name", "teacher"])
    assert rc == 0
    teacher = json.loads((tmp_path / "teacher" / "summary.json").read_text())
    assert teacher["params"] == teacher["plain_params"]  # sharing none: the plain ViT

    rc = main(["train", "minivit", "--data", str(image_shards), *VIT, "--set", "sharing=all",
               "--set", f"teacher={tmp_path / 'teacher' / 'run' / 'model'}",
               "--set", "optim.epochs=2", "--workers", "2", "--storage", str(tmp_path),
               "--name", "student"])
    assert rc == 0
    exp = tmp_path / "student"
    summary = json.loads((exp / "summary.json").read_text())
    # 4 layers of ViT-Tiny (d = 192, 3 heads) into one: 3 layers' attention + MLP go,
    # 4 x 2 head-mixing matrices of 3 x 3 come.
    d = 192
    layer = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    assert summary["params"] == teacher["params"] - 3 * layer + 4 * 2 * 9
    assert summary["compression"] == pytest.approx(teacher["params"] / summary["params"])
    # The teacher the workers loaded scores what its own run reported on the same images.
    assert summary["teacher_top1"] == pytest.approx(teacher["top1"])
    rows = _rows(exp / "run")
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["replica_drift"] == 0.0  # shared tensors all-reduced once, replicas equal
        assert r["test_rows"] == CLASSES * TEST_PER_CLASS
        total = r["train_loss_pred"] + r["train_loss_attn"] + 0.1 * r["train_loss_hidden"]
        assert r["train_loss"] == pytest.approx(total, rel=1e-4)  # eq. 12, beta 1, gamma 0.1
    assert rows[1]["train_loss"] < rows[0]["train_loss"]  # the student moves to the teacher
    # The saved student stores each shared tensor once.
    student_bytes = (exp / "run" / "model" / "state.pt").stat().st_size
    teacher_bytes = (tmp_path / "teacher" / "run" / "model" / "state.pt").stat().st_size
    assert student_bytes < 0.5 * teacher_bytes
    report = (exp / "report.md").read_text()
    assert "multiplexed student" in report and f"{summary['params']:,}" in report


def test_a_teacher_on_other_classes_is_refused(ray_cluster, image_shards: Path,
                                               tmp_path: Path, capsys) -> None:
    from raylab.data.imagefolder import convert_imagefolder, write_image_sample

    other = write_image_sample(tmp_path / "raw", classes=3, train_per_class=12,
                               test_per_class=2)
    convert_imagefolder(other, tmp_path / "other")
    rc = main(["train", "minivit", "--data", str(tmp_path / "other"), *VIT,
               "--set", "sharing=none", "--set", "transform=false", "--set", "optim.epochs=1",
               "--workers", "0", "--storage", str(tmp_path), "--name", "t3"])
    assert rc == 0
    rc = main(["train", "minivit", "--data", str(image_shards), *VIT,
               "--set", f"teacher={tmp_path / 't3' / 'run' / 'model'}",
               "--workers", "0", "--storage", str(tmp_path), "--name", "s"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "trained on classes" in err and "t3" in err
    assert not (tmp_path / "s" / "summary.json").exists()
