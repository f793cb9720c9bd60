"""The CLEAR learner without Ray: row ids and stores, batch augmentation, the stream walk,
and restarts (of the stream service and of the learner) giving the same accuracy matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from raylab.continual.rows import (
    ROW_STRIDE,
    FeatureRows,
    ImageRows,
    row_id,
    split_row_id,
    stream_rows,
)
from raylab.continual.runner import BucketSettings, run_stream
from raylab.continual.strategies import build_strategy
from raylab.continual.stream import StreamError, StreamService, strategy_flags
from raylab.data.clear import bucket_paths
from raylab.methods.clear_loop import bucket_metrics
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
    result = {"index": 1, "bucket": 2, "accuracies": {1: 0.6, 2: 0.7, 3: 0.5},
              "train": {"loss": 1.0, "samples": 10, "replay_samples": 0}, "seconds": 1.0}
    m = bucket_metrics(result, [[0.5, 0.4, 0.3]])
    assert m["epoch"] == 2 and m["in_domain_acc"] == 0.7 and m["next_acc"] == 0.5
    assert m["next_domain"] == pytest.approx((0.4 + 0.5) / 2)
    assert m["seen_acc"] == pytest.approx((0.5 + 0.6 + 0.7) / 3)
    assert m["acc_bucket_3"] == 0.5


class TinyNet(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


SETTINGS = BucketSettings(epochs=2, batch_size=8, lr=0.05, seed=3)


def _service(stream: Path, path: Path, strategy_name: str, protocol: str = "iid"
             ) -> tuple[StreamService, object]:
    strategy = build_strategy(strategy_name)
    flags = strategy_flags(strategy, 20)
    svc = StreamService(path, bucket_rows=stream_rows(stream, [1, 2, 3, 4]), protocol=protocol,
                        seed=0, **flags)
    return svc, strategy


@pytest.mark.parametrize("strategy_name", ["er", "gdumb", "ewc", "cwr"])
def test_run_stream_fills_the_accuracy_matrix(stream: Path, tmp_path: Path,
                                              strategy_name: str) -> None:
    svc, strategy = _service(stream, tmp_path / "s.json", strategy_name)
    torch.manual_seed(0)
    seen = []
    results = run_stream(svc, ImageRows(stream, 16), TinyNet(), strategy, SETTINGS, "cpu",
                         on_bucket=lambda r: seen.append(r["bucket"]))
    assert seen == [1, 2, 3, 4] and [r["index"] for r in results] == [0, 1, 2, 3]
    out = svc.metrics()
    assert out["complete"] and set(out["metrics"]) >= {"in_domain", "next_domain"}
    assert all(0 <= a <= 1 for row in out["matrix"] for a in row)
    # With a buffer, bucket 2 replays rows of bucket 1 (GDumb trains on its buffer instead).
    if strategy_name == "er":
        assert results[0]["train"]["replay_samples"] == 0
        assert results[1]["train"]["replay_samples"] > 0
    # Each row of R is what the learner measured on that bucket.
    for r in results:
        assert out["matrix"][r["index"]] == [r["accuracies"][b] for b in (1, 2, 3, 4)]


def _run(stream: Path, state: Path, strategy_name: str, crash_after: int | None = None,
         restart_service_after: int | None = None, resume_from: dict | None = None
         ) -> tuple[list[list[float]], list[dict]]:
    """One learner; optionally crashes after a checkpoint, or swaps in a fresh service
    (a restarted actor: same state file) after a bucket. Returns R and the checkpoints."""
    svc, strategy = _service(stream, state, strategy_name)
    torch.manual_seed(0)
    model = TinyNet()
    checkpoints: list[dict] = []
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        strategy.load_state_dict(resume_from["strategy"])

    class Crash(Exception):
        pass

    class Client:
        """Routes calls to the current service; after ``restart_service_after`` is
        finished, replaces it by a fresh one built from the state file alone."""

        current = svc

        def next_bucket(self, *args: object) -> dict | None:
            return self.current.next_bucket(*args)

        def test_ids(self, *args: object) -> list[int]:
            return self.current.test_ids(*args)

        def finish_bucket(self, bucket: int, accuracies: dict) -> dict:
            out = self.current.finish_bucket(bucket, accuracies)
            if bucket == restart_service_after:
                self.current = StreamService(state)
            return out

    def on_bucket(r: dict) -> None:
        checkpoints.append({"model": {k: v.clone() for k, v in model.state_dict().items()},
                            "strategy": strategy.state_dict(),
                            "stream": {"bucket": r["bucket"], "accuracies": r["accuracies"]}})
        if crash_after is not None and r["index"] == crash_after:
            raise Crash

    client = Client()
    try:
        run_stream(client, ImageRows(stream, 16), model, strategy, SETTINGS, "cpu",
                   on_bucket=on_bucket,
                   resume=None if resume_from is None else resume_from["stream"])
    except Crash:
        pass
    return StreamService(state).metrics()["matrix"], checkpoints


@pytest.mark.parametrize("strategy_name", ["er", "lwf"])
def test_restarts_give_the_same_accuracy_matrix(stream: Path, tmp_path: Path,
                                                strategy_name: str) -> None:
    reference, _ = _run(stream, tmp_path / "a.json", strategy_name)
    # A restarted stream service (the actor after a crash) resumes from its file.
    restarted, _ = _run(stream, tmp_path / "b.json", strategy_name, restart_service_after=2)
    assert restarted == reference
    assert len({a for row in reference for a in row}) > 3  # a matrix worth comparing
    # The learner crashes after bucket index 1's checkpoint, before the stream is told;
    # the resumed learner tells it, then trains buckets 3 and 4 only.
    partial, checkpoints = _run(stream, tmp_path / "c.json", strategy_name, crash_after=1)
    assert partial[1] == [None] * 4 and partial[2] == [None] * 4
    resumed, later = _run(stream, tmp_path / "c.json", strategy_name,
                          resume_from=checkpoints[-1])
    assert [c["stream"]["bucket"] for c in later] == [3, 4]  # nothing twice, nothing skipped
    assert resumed == reference


def test_resume_against_a_foreign_stream_state_fails(stream: Path, tmp_path: Path) -> None:
    svc, strategy = _service(stream, tmp_path / "s.json", "er")
    with pytest.raises(StreamError, match="bucket 3 is not finished|not finished yet"):
        run_stream(svc, ImageRows(stream, 16), TinyNet(), strategy, SETTINGS, "cpu",
                   resume={"bucket": 3, "accuracies": {1: .5, 2: .5, 3: .5, 4: .5}})


def test_two_learners_share_a_bucket_and_agree(stream: Path, tmp_path: Path) -> None:
    """world_size 2 without Ray: each learner gets half of the rows; accuracies summed."""
    svc, _ = _service(stream, tmp_path / "s.json", "finetune")
    info0 = svc.next_bucket(0, 2)
    info1 = svc.next_bucket(1, 2)
    assert not set(info0["train_ids"]) & set(info1["train_ids"]) or \
        info0["num_train"] % 2  # padded shards repeat a row only when the count is odd
    assert len(info0["train_ids"]) == len(info1["train_ids"]) == -(-info0["num_train"] // 2)
    test = svc.test_ids(1, 0, 2) + svc.test_ids(1, 1, 2)
    assert sorted(test) == sorted(svc.test_ids(1))
    assert np.intersect1d(test, info0["train_ids"] + info1["train_ids"]).size == 0


def test_frozen_dino_features_feed_a_linear_learner(stream: Path, tmp_path: Path) -> None:
    """The "unsupervised representation" rows: a DINO checkpoint's teacher is frozen, each
    bucket embedded once, and only a linear classifier trains."""
    from raylab import config as cfglib
    from raylab.methods.clear import ClearConfig, load_stream
    from raylab.methods.clear_loop import build_learner
    from raylab.methods.dino import DINOConfig, build_student_teacher
    from raylab.runtime.checkpoint import save_checkpoint

    dino = cfglib.apply_overrides(DINOConfig(), {
        "arch": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 8, "depth": 1,
        "out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8})
    student, teacher = build_student_teacher(dino)
    ckpt = save_checkpoint(tmp_path / "dino", model=student, ema=teacher,
                           meta={"method": "dino", "config": cfglib.to_dict(dino)})
    cfg = cfglib.apply_overrides(ClearConfig(), {"data": str(stream), "features": str(ckpt),
                                                 "strategy": "lwf"})
    info = load_stream(cfg)
    assert info.input_size == 16  # the DINO model's size, not the stream's 32 px
    model, rows = build_learner(cfg, len(info.class_names), info.input_size, "cpu")
    assert isinstance(model, nn.Linear) and model.in_features == 192  # ViT-Tiny width
    x, y = rows.fetch([row_id(1, 0), row_id(2, 1)])
    assert x.shape == (2, 192) and x.dtype == torch.float32 and y.shape == (2,)
    svc, strategy = _service(stream, tmp_path / "s.json", "lwf")
    run_stream(svc, rows, model, strategy, SETTINGS, "cpu")
    assert svc.metrics()["complete"]
    # The backbone stayed frozen: the checkpoint's teacher equals what embeds the rows.
    frozen = rows.embed.backbone
    assert not any(p.requires_grad for p in frozen.parameters())


def test_catch_up_adopts_the_unregistered_checkpoint_of_the_streams_last_bucket(
        tmp_path: Path) -> None:
    """A worker lost right after reporting bucket 2: the stream finished it and its
    checkpoint folder exists, but Ray Train hands back bucket 1's."""
    from raylab.continual.stream import StreamError
    from raylab.methods.clear_loop import catch_up
    from raylab.runtime.checkpoint import load_checkpoint, save_checkpoint

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
