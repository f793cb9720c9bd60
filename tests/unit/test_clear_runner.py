"""The CLEAR learner without Ray: row ids and stores, batch augmentation, the stream walk
(the CLEAR task on the engine's loop with a plain worker context), and restarts (of the
stream service and of the learner) giving the same accuracy matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from raylab import config as cfglib
from raylab.continual.rows import (
    ROW_STRIDE,
    FeatureRows,
    ImageRows,
    row_id,
    split_row_id,
    stream_rows,
)
from raylab.continual.stream import StreamError, StreamService, strategy_flags
from raylab.data.clear import bucket_paths
from raylab.engine.context import LocalContext
from raylab.engine.keys import TEST
from raylab.engine.loop import build_and_run
from raylab.engine.restore import CheckpointFolder
from raylab.methods.clear import ClearConfig, make_strategy
from raylab.methods.clear.task import STREAM, ClearTask, bucket_metrics
from raylab.transforms.batch_aug import pad_crop_flip


@pytest.fixture(scope="module")
def stream(tiny_clear_stream: Path) -> Path:
    return tiny_clear_stream


def test_row_ids_round_trip() -> None:
    assert row_id(3, 17) == 3 * ROW_STRIDE + 17
    assert split_row_id(row_id(10, 0)) == (10, 0)
    with pytest.raises(ValueError):
        row_id(1, ROW_STRIDE)


def test_stream_rows_number_rows_in_shard_order(stream: Path) -> None:
    rows = stream_rows(stream, [1, 2])
    assert sorted(rows) == [1, 2]
    for b, (ids, labels) in rows.items():
        table = pq.read_table(bucket_paths(stream, b)[0])
        assert ids == [row_id(b, k) for k in range(table.num_rows)]
        assert labels == table.column("label").to_pylist()


def test_image_rows_fetch_in_requested_order(stream: Path) -> None:
    store = ImageRows(stream, 16)
    x1, y1 = store.bucket(1)
    x2, y2 = store.bucket(2)
    assert x1.dtype == torch.uint8 and x1.shape[1:] == (3, 16, 16)
    ids = [row_id(2, 3), row_id(1, 0), row_id(2, 0), row_id(1, 5)]
    x, y = store.fetch(ids)
    assert torch.equal(x, torch.stack([x2[3], x1[0], x2[0], x1[5]]))
    assert y.tolist() == [y2[3].item(), y1[0].item(), y2[0].item(), y1[5].item()]
    with pytest.raises(Exception, match="past the end of bucket 1"):
        store.fetch([row_id(1, 10_000)])


def test_feature_rows_embed_each_bucket_once(stream: Path) -> None:
    calls = []

    def embed(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return x.float().mean(dim=(2, 3))  # [B, 3]

    store = FeatureRows(ImageRows(stream, 8), embed, batch_size=5)
    x, _ = store.fetch([row_id(1, 0), row_id(1, 1)])
    store.fetch([row_id(1, 2)])
    assert x.shape == (2, 3) and x.dtype == torch.float32
    assert sum(calls) == len(store.images.bucket(1)[1])  # bucket 1 embedded once


def test_pad_crop_flip_takes_shifted_windows() -> None:
    x = torch.arange(6 * 2 * 5 * 5, dtype=torch.float32).view(6, 2, 5, 5) + 1
    out = pad_crop_flip(x, padding=2, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        windows = [padded[i, :, dy:dy + 5, dx:dx + 5] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
    # Reproducible for a seed; different images draw different crops.
    again = pad_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(pad_crop_flip(x, 0, flip=False), x)


def test_pad_crop_flip_flips_about_half() -> None:
    x = torch.arange(4, dtype=torch.float32).view(1, 1, 1, 4).repeat(2000, 1, 1, 1)
    out = pad_crop_flip(x, 0, flip=True, generator=torch.Generator().manual_seed(1))
    flipped = (out[:, 0, 0, 0] == 3).float().mean().item()
    assert 0.45 < flipped < 0.55


def test_bucket_metrics_running_means() -> None:
    # R so far: [[.5, .4, .3]]; now bucket index 1 with row [.6, .7, .5].
    m = bucket_metrics(TEST, 1, {1: 0.6, 2: 0.7, 3: 0.5}, [[0.5, 0.4, 0.3]])
    assert m["test_in_domain_acc"] == 0.7 and m["test_next_acc"] == 0.5
    assert m["test_next_domain"] == pytest.approx((0.4 + 0.5) / 2)
    assert m["test_seen_acc"] == pytest.approx((0.5 + 0.6 + 0.7) / 3)
    assert m["test_acc_bucket_3"] == 0.5
    last = bucket_metrics(TEST, 2, {1: 0.6, 2: 0.7, 3: 0.8}, [[0.5, 0.4, 0.3], [.6, .7, .5]])
    assert "test_next_acc" not in last  # no bucket after the last one
    assert last["test_next_domain"] == pytest.approx((0.4 + 0.5) / 2)


class TinyNet(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class TinyClearTask(ClearTask):
    """The CLEAR task with a small CNN instead of a timm ResNet (same loop, same hooks)."""

    def build_learner(self, run: dict) -> tuple[nn.Module, object]:
        return TinyNet(), ImageRows(self.cfg.data, 16)


def _cfg(stream: Path, strategy: str, **more: object) -> ClearConfig:
    return cfglib.apply_overrides(ClearConfig(), {
        "data": str(stream), "strategy": strategy, "optim.epochs": 2, "optim.batch_size": 8,
        "optim.lr": 0.05, "seed": 3, **more})


def _service(stream: Path, path: Path, cfg: ClearConfig, protocol: str = "iid",
             **more: object) -> StreamService:
    flags = strategy_flags(make_strategy(cfg), 20)
    return StreamService(path, bucket_rows=stream_rows(stream, [1, 2, 3, 4]), protocol=protocol,
                         seed=0, **flags, **more)


RUN = {"split": TEST, "num_classes": 4, "input_size": 16, "buckets": 4,
       "checkpoint_meta": {"method": "clear"}}


def _learn(cfg: ClearConfig, client: object, run_dir: Path | None = None,
           context: type[LocalContext] = LocalContext) -> LocalContext:
    """One learner walking the stream on the engine's loop; returns its context (reports)."""
    ctx = context(run_dir=run_dir, services={STREAM: client})
    build_and_run(lambda c: TinyClearTask(cfg, dict(RUN, run_dir=run_dir and str(run_dir)), c),
                  ctx, cfg.seed)
    return ctx


@pytest.mark.parametrize("strategy_name", ["er", "gdumb", "ewc", "cwr"])
def test_learner_fills_the_accuracy_matrix(stream: Path, tmp_path: Path,
                                           strategy_name: str) -> None:
    cfg = _cfg(stream, strategy_name)
    svc = _service(stream, tmp_path / "s.json", cfg)
    reports = _learn(cfg, svc).reports
    assert [r["bucket"] for r in reports] == [1, 2, 3, 4]
    assert [r["epoch"] for r in reports] == [1, 2, 3, 4]
    out = svc.metrics()
    assert out["complete"] and set(out["metrics"]) >= {"in_domain", "next_domain"}
    assert all(0 <= a <= 1 for row in out["matrix"] for a in row)
    # With a buffer, bucket 2 replays rows of bucket 1 (GDumb trains on its buffer instead).
    if strategy_name == "er":
        assert reports[0]["replay_samples"] == 0
        assert reports[1]["replay_samples"] > 0
    # Each row of R is what the learner measured on that bucket, every test row once.
    test_rows = sum(len(svc.test_ids(b)) for b in (1, 2, 3, 4))
    for i, r in enumerate(reports):
        assert out["matrix"][i] == [r[f"test_acc_bucket_{b}"] for b in (1, 2, 3, 4)]
        assert r["test_rows"] == test_rows


class Crash(Exception):
    pass


def _crashing_after(index: int) -> type[LocalContext]:
    class CrashingContext(LocalContext):
        """Dies right after the report (and checkpoint) of bucket index ``index``."""

        def report(self, metrics: dict, checkpoint: dict | None = None) -> None:
            super().report(metrics, checkpoint)
            if metrics.get("epoch") == index + 1:
                raise Crash

    return CrashingContext


class RestartingClient:
    """Routes calls to the current service; after bucket ``restart_after`` is finished,
    replaces it by a fresh one built from the state file alone (a restarted actor)."""

    def __init__(self, service: StreamService, state: Path, restart_after: int) -> None:
        self.current, self.state_path, self.restart_after = service, state, restart_after

    def __getattr__(self, name: str) -> object:
        return getattr(self.current, name)

    def finish_bucket(self, bucket: int, accuracies: dict) -> dict:
        out = self.current.finish_bucket(bucket, accuracies)
        if bucket == self.restart_after:
            self.current = StreamService(self.state_path)
        return out


@pytest.mark.parametrize("strategy_name", ["er", "lwf"])
def test_restarts_give_the_same_accuracy_matrix(stream: Path, tmp_path: Path,
                                                strategy_name: str) -> None:
    cfg = _cfg(stream, strategy_name)
    _learn(cfg, _service(stream, tmp_path / "a.json", cfg))
    reference = StreamService(tmp_path / "a.json").metrics()["matrix"]
    assert len({a for row in reference for a in row}) > 3  # a matrix worth comparing
    # A restarted stream service (the actor after a crash) resumes from its file.
    svc = _service(stream, tmp_path / "b.json", cfg)
    _learn(cfg, RestartingClient(svc, tmp_path / "b.json", restart_after=2))
    assert StreamService(tmp_path / "b.json").metrics()["matrix"] == reference
    # The learner crashes after bucket index 1's checkpoint, before the stream is told;
    # the resumed learner (from the run folder's checkpoint) tells it, then trains
    # buckets 3 and 4 only.
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        _learn(cfg, _service(stream, tmp_path / "c.json", cfg), run_dir,
               _crashing_after(1))
    partial = StreamService(tmp_path / "c.json").metrics()["matrix"]
    assert partial[1] == [None] * 4 and partial[2] == [None] * 4
    later = _learn(cfg, StreamService(tmp_path / "c.json"), run_dir).reports
    assert [r["bucket"] for r in later] == [3, 4]  # nothing twice, nothing skipped
    assert StreamService(tmp_path / "c.json").metrics()["matrix"] == reference


def test_resume_against_a_foreign_stream_state_fails(stream: Path, tmp_path: Path) -> None:
    """A run folder whose checkpoint says bucket 3 is done, with a fresh stream."""
    cfg = _cfg(stream, "er")
    CheckpointFolder(tmp_path / "run").save(
        model=TinyNet(), epoch=2, meta={"method": "clear"},
        extra={"strategy": make_strategy(cfg).state_dict(),
               "stream": {"bucket": 3, "accuracies": {str(b): .5 for b in (1, 2, 3, 4)}}})
    with pytest.raises(StreamError, match="bucket 3 is not finished|not finished yet"):
        _learn(cfg, _service(stream, tmp_path / "s.json", cfg), tmp_path / "run")


def test_two_learners_share_a_bucket_exactly(stream: Path, tmp_path: Path) -> None:
    """world_size 2 without Ray: the two shards of a bucket's training rows cover it, each
    worker gets as many rows (an odd count repeats exactly one row, as torch's
    DistributedSampler pads), and the test rows are partitioned, never padded."""
    svc = _service(stream, tmp_path / "s.json", _cfg(stream, "finetune"))
    info0, info1 = svc.next_bucket(0, 2), svc.next_bucket(1, 2)
    n = info0["num_train"]
    shards = info0["train_ids"] + info1["train_ids"]
    assert len(info0["train_ids"]) == len(info1["train_ids"]) == -(-n // 2)
    assert len(set(shards)) == n  # every training row, the padding repeats one at most
    assert len(shards) - n == n % 2
    one_worker = svc.next_bucket(0, 1)["train_ids"]
    assert set(shards) == set(one_worker)
    for b in (1, 2, 3, 4):
        parts = svc.test_ids(b, 0, 2) + svc.test_ids(b, 1, 2)
        assert sorted(parts) == sorted(svc.test_ids(b))  # each test row exactly once
        assert len(parts) == len(set(parts))
    test = svc.test_ids(1, 0, 2) + svc.test_ids(1, 1, 2)
    assert np.intersect1d(test, shards).size == 0


def test_frozen_dino_features_feed_a_linear_learner(stream: Path, tmp_path: Path) -> None:
    """The "unsupervised representation" rows: a DINO checkpoint's teacher is frozen, each
    bucket embedded once, and only a linear classifier trains."""
    from raylab.engine.checkpoint import save_checkpoint
    from raylab.methods.clear import load_stream
    from raylab.methods.clear.task import build_learner
    from raylab.methods.dino import DINOConfig
    from raylab.methods.dino.task import build_student_teacher

    dino = cfglib.apply_overrides(DINOConfig(), {
        "arch": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 8, "depth": 1,
        "out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8})
    student, teacher = build_student_teacher(dino)
    ckpt = save_checkpoint(tmp_path / "dino", model=student, ema=teacher,
                           meta={"method": "dino", "config": cfglib.to_dict(dino)})
    cfg = _cfg(stream, "lwf", features=str(ckpt))
    info = load_stream(cfg)
    assert info.input_size == 16  # the DINO model's size, not the stream's 32 px
    model, rows = build_learner(cfg, len(info.class_names), info.input_size, "cpu")
    assert isinstance(model, nn.Linear) and model.in_features == 192  # ViT-Tiny width
    x, y = rows.fetch([row_id(1, 0), row_id(2, 1)])
    assert x.shape == (2, 192) and x.dtype == torch.float32 and y.shape == (2,)
    svc = _service(stream, tmp_path / "s.json", cfg)

    class LinearTask(ClearTask):
        def build_learner(self, run: dict) -> tuple[nn.Module, object]:
            return model, rows

    ctx = LocalContext(services={STREAM: svc})
    build_and_run(lambda c: LinearTask(cfg, RUN, c), ctx, cfg.seed)
    assert svc.metrics()["complete"]
    # The backbone stayed frozen: the checkpoint's teacher equals what embeds the rows.
    frozen = rows.embed.backbone
    assert not any(p.requires_grad for p in frozen.parameters())


def test_catch_up_adopts_the_unregistered_checkpoint_of_the_streams_last_bucket(
        tmp_path: Path) -> None:
    """A worker lost right after reporting bucket 2: the stream finished it and its
    checkpoint folder exists, but Ray Train hands back bucket 1's."""
    from raylab.engine.checkpoint import load_checkpoint, save_checkpoint
    from raylab.methods.clear.task import catch_up

    def checkpoint(name: str, bucket: int, fill: float) -> dict:
        model = TinyNet()
        for p in model.parameters():
            p.data.fill_(fill)
        save_checkpoint(tmp_path / name, model=model, epoch=bucket - 1,
                        extra={"stream": {"bucket": bucket, "accuracies": {}}})
        return load_checkpoint(tmp_path / name)

    first = checkpoint("checkpoint_2026-01-01_00-00-01", 1, 1.0)
    checkpoint("checkpoint_2026-01-01_00-00-02", 2, 2.0)
    stream = {"buckets": [1, 2, 3, 4], "finished": [1, 2]}
    model = TinyNet()
    adopted = catch_up(stream, first, str(tmp_path), model)
    assert adopted is not None and adopted["extra"]["stream"]["bucket"] == 2
    assert all(torch.all(p == 2.0) for p in model.parameters())
    # In step (or the checkpoint one bucket ahead: the finish is replayed later): nothing.
    assert catch_up({"buckets": [1, 2, 3, 4], "finished": [1]}, first, str(tmp_path),
                    model) is None
    assert catch_up({"buckets": [1, 2, 3, 4], "finished": []}, first, str(tmp_path),
                    model) is None
    # Ahead with no checkpoint of its last bucket: refuse to continue inexactly.
    with pytest.raises(StreamError, match="checkpoint of bucket 3 is missing"):
        catch_up({"buckets": [1, 2, 3, 4], "finished": [1, 2, 3]}, first, str(tmp_path),
                 model)
    # No checkpoint registered at all, the stream one bucket in: adopt bucket 1's folder.
    stream = {"buckets": [1, 2, 3, 4], "finished": [1]}
    assert catch_up(stream, None, str(tmp_path), model)["extra"]["stream"]["bucket"] == 1


def test_one_stream_actor_per_run_folder(tmp_path: Path, monkeypatch) -> None:
    """A relative path, an absolute one and one through a symbolic link to the same run
    folder name one actor (they share the state file); another folder or URI another."""
    import zlib

    from raylab.methods.clear.method import stream_actor_name

    run = tmp_path / "exp" / "run"
    run.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "exp")
    monkeypatch.chdir(tmp_path)
    name = stream_actor_name(run)
    assert name == f"clear-stream-{zlib.crc32(str(run.resolve()).encode()):08x}"
    assert stream_actor_name("exp/run") == stream_actor_name(tmp_path / "link" / "run") == name
    assert stream_actor_name(tmp_path / "exp" / "other") != name
    uri = "s3://bucket/exp/run"
    assert stream_actor_name(uri) == f"clear-stream-{zlib.crc32(uri.encode()):08x}"
