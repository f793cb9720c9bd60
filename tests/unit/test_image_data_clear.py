"""load_image_data on CLEAR streams and ImageFolder shards; DINO's knn_split (no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from raylab import config as cfglib
from raylab.data.clear import bucket_paths, clear_class_names, convert_clear, write_clear_sample
from raylab.data.imagefolder import (
    class_names,
    convert_imagefolder,
    split_paths,
    write_image_sample,
)
from raylab.errors import ConfigError, DataError
from raylab.methods.dino import DINOConfig, DINOMethod, DINOOptimConfig
from raylab.tasks.classification.data import ImageData, knn_split_name, load_image_data


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny ImageFolder shard folder and a 5-bucket CLEAR stream drawn from it."""
    root = tmp_path_factory.mktemp("clear_dino")
    src = write_image_sample(root / "shapes", classes=4, train_per_class=40, test_per_class=10)
    convert_imagefolder(src, root / "shards")
    write_clear_sample(src, root / "raw", n_buckets=5, per_class_per_bucket=6, seed=0)
    convert_clear(root / "raw", root / "stream")
    return {"shards": root / "shards", "stream": root / "stream"}


def _cfg(data: Path, **kw: Any) -> DINOConfig:
    batch = kw.pop("batch_size", 8)
    return DINOConfig(data=str(data), optim=DINOOptimConfig(batch_size=batch), **kw)


def _stream_cfg(stream: Path, **kw: Any) -> DINOConfig:
    splits = {"train_split": "bucket_00", "knn_split": "bucket_01", "eval_split": "bucket_02"}
    return _cfg(stream, **{**splits, **kw})


def test_stream_splits(folders: dict[str, Path]) -> None:
    stream = folders["stream"]
    data = load_image_data(_stream_cfg(stream))
    assert data.class_names == clear_class_names(stream)
    assert data.train_paths == bucket_paths(stream, 0)
    assert data.knn_paths == bucket_paths(stream, 1)
    assert data.eval_paths == bucket_paths(stream, 2)
    # write_clear_sample: N = 4 classes x 6 images per bucket
    assert (data.train_rows, data.knn_rows, data.eval_rows) == (24, 24, 24)


def test_stream_max_train_rows_limits_train_only(folders: dict[str, Path]) -> None:
    data = load_image_data(_stream_cfg(folders["stream"], max_train_rows=10))
    assert (data.train_rows, data.knn_rows) == (10, 24)
    with pytest.raises(DataError, match="split 'bucket_00' has 10 rows, fewer than "
                                        "optim.batch_size=16"):
        load_image_data(_stream_cfg(folders["stream"], max_train_rows=10, batch_size=16))


def test_stream_from_cli_overrides_and_check(folders: dict[str, Path]) -> None:
    cfg = cfglib.load(DINOConfig, None, [
        f"data={folders['stream']}", "train_split=bucket_00", "knn_split=bucket_01",
        "eval_split=bucket_02", "optim.batch_size=8"])
    assert cfg.knn_split == "bucket_01"
    DINOMethod().check(cfg)


def test_stream_unknown_split(folders: dict[str, Path]) -> None:
    available = "available: bucket_00, bucket_01, bucket_02, bucket_03, bucket_04"
    for key in ("train_split", "knn_split", "eval_split"):
        with pytest.raises(ConfigError, match=f"config key '{key}': 'bucket_9' is not a split "
                                              f"of this CLEAR stream; {available}"):
            load_image_data(_stream_cfg(folders["stream"], **{key: "bucket_9"}))


def test_stream_unlabeled_train_needs_knn_split(folders: dict[str, Path]) -> None:
    cfg = _stream_cfg(folders["stream"], knn_split="")
    with pytest.raises(ConfigError, match="config key 'knn_split': the train split "
                                          "'bucket_00' is unlabeled.*set knn_split"):
        load_image_data(cfg)
    with pytest.raises(ConfigError, match="knn_split"):
        DINOMethod().check(cfg)


def test_stream_unlabeled_knn_and_eval_split(folders: dict[str, Path]) -> None:
    stream = folders["stream"]
    with pytest.raises(ConfigError, match="config key 'knn_split': 'bucket_00' is unlabeled"):
        load_image_data(_stream_cfg(stream, train_split="bucket_03", knn_split="bucket_00"))
    with pytest.raises(ConfigError, match="config key 'eval_split': 'bucket_00' is unlabeled"):
        load_image_data(_stream_cfg(stream, train_split="bucket_03", eval_split="bucket_00"))


def test_stream_knn_split_must_differ_from_eval(folders: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="'knn_split' and 'eval_split' are both 'bucket_02'"):
        load_image_data(_stream_cfg(folders["stream"], knn_split="bucket_02"))


def test_stream_labelled_train_split_defaults_knn(folders: dict[str, Path]) -> None:
    stream = folders["stream"]
    cfg = _stream_cfg(stream, train_split="bucket_01", knn_split="")
    assert knn_split_name(cfg) == "bucket_01"
    data = load_image_data(cfg)
    assert data.knn_paths == data.train_paths == bucket_paths(stream, 1)
    assert data.knn_rows == data.train_rows == 24


def test_imagefolder_default_knn_is_train(folders: dict[str, Path]) -> None:
    shards = folders["shards"]
    data = load_image_data(_cfg(shards, max_train_rows=50))
    assert data.class_names == class_names(shards)
    assert data.train_paths == data.knn_paths == split_paths(shards, "train")
    assert data.eval_paths == split_paths(shards, "test")
    assert (data.train_rows, data.knn_rows, data.eval_rows) == (50, 50, 40)
    explicit = load_image_data(_cfg(shards, knn_split="train", max_train_rows=50))
    assert explicit == data
    DINOMethod().check(_cfg(shards))


def test_imagefolder_split_errors(folders: dict[str, Path]) -> None:
    shards = folders["shards"]
    for key in ("train_split", "eval_split", "knn_split"):
        with pytest.raises(ConfigError, match=f"config key '{key}': 'val' is not a split of "
                                              "this image shard folder; available: "):
            load_image_data(_cfg(shards, **{key: "val"}))
    with pytest.raises(ConfigError, match="'knn_split' and 'eval_split' are both 'test'"):
        load_image_data(_cfg(shards, knn_split="test"))
    with pytest.raises(ConfigError, match="'train_split' and 'eval_split' are both"):
        load_image_data(_cfg(shards, eval_split="train"))


def test_image_data_knn_defaults_to_train() -> None:
    data = ImageData(["a"], ["t.parquet"], ["e.parquet"], 5, 3)
    assert (data.knn_paths, data.knn_rows) == (["t.parquet"], 5)


def test_attention_figures_read_a_stream_bucket(folders: dict[str, Path], tmp_path: Path
                                                ) -> None:
    import torch

    from raylab.engine.checkpoint import save_checkpoint
    from raylab.methods.dino.method import attention_figures
    from raylab.methods.dino.task import build_student_teacher

    cfg = cfglib.apply_overrides(_stream_cfg(folders["stream"]), {
        "arch": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "depth": 1,
        "out_dim": 16, "hidden_dim": 16, "bottleneck_dim": 8})
    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfg)
    save_checkpoint(tmp_path / "ckpt", model=student, ema=teacher, epoch=0,
                    meta={"method": "dino", "config": cfglib.to_dict(cfg)})
    figures = attention_figures(tmp_path / "ckpt", cfg.data, cfg.eval_split, tmp_path / "out",
                                n_images=2)
    assert len(figures) == 2 and all(Path(p).is_file() for p in figures)
