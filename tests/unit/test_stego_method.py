"""STEGO's method pieces without Ray: the k-means baseline, the head + probes model, the
feature job's extractor and crop, and the worker task on the engine with features whose
classes are known by construction."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scenarios
import torch
from PIL import Image

from raylab import config as cfglib
from raylab.engine.loop import build_and_run
from raylab.methods.stego.config import StegoConfig
from raylab.methods.stego.features import FeatureExtractor, decode_batch, square_crop
from raylab.methods.stego.models import (
    StegoModel,
    cosine_kmeans,
    feature_points,
    kmeans_predict,
    predict,
)
from raylab.methods.stego.task import partner_generator
from raylab.metrics.segmentation import unsupervised_miou

N_CLASSES = 3


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labelings of the same items agree up to renaming the labels."""
    return all(len(set(b[a == v])) == 1 for v in np.unique(a)) and \
        len(np.unique(a)) == len(np.unique(b))


def test_cosine_kmeans_finds_separated_directions() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:3] * 5
    truth = torch.arange(3).repeat_interleave(40)
    x = centres[truth] + 0.3 * torch.randn(120, 8, generator=g)
    centroids = cosine_kmeans(x, 3, 20, torch.Generator().manual_seed(1))
    assert torch.allclose(centroids.norm(dim=1), torch.ones(3), atol=1e-5)
    found = (torch.nn.functional.normalize(x, dim=1) @ centroids.T).argmax(1)
    assert same_partition(truth.numpy(), found.numpy())


def test_cosine_kmeans_refuses_fewer_points_than_clusters() -> None:
    with pytest.raises(ValueError, match="2 points for 3 clusters"):
        cosine_kmeans(torch.randn(2, 4), 3, 5, torch.Generator())


def test_kmeans_predict_upsamples_to_label_size() -> None:
    feats = torch.zeros(1, 2, 2, 2)
    feats[0, 0, :, 0] = 1  # left column points along channel 0
    feats[0, 1, :, 1] = 1  # right column along channel 1
    centroids = torch.eye(2)
    pred = kmeans_predict(centroids, feats, 4)
    assert pred.shape == (1, 4, 4)
    assert pred[0, :, 0].tolist() == [0] * 4 and pred[0, :, 3].tolist() == [1] * 4


def test_probe_losses_never_reach_the_head() -> None:
    """With the correspondence weights at 0 the head gets no gradient: the probes learn
    from the detached code only."""
    torch.manual_seed(0)
    model = StegoModel(16, 6, 0.0, N_CLASSES)
    feats = torch.randn(4, 16, 3, 3)
    labels = torch.randint(0, N_CLASSES, (4, 12, 12))
    loss, parts = model(feats, feats.flip(0), labels, weights=(0.0, 0.0, 0.0),
                        shifts=(0.1, 0.1, 0.1), samples=3, generator=torch.Generator())
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.head.parameters())
    assert model.linear_probe.conv.weight.grad.abs().sum() > 0
    assert model.cluster_probe.clusters.grad.abs().sum() > 0
    assert set(parts) >= {"loss_self", "loss_knn", "loss_rand", "loss_cluster",
                          "loss_linear", "loss_raw"}


def test_correspondence_loss_trains_the_head() -> None:
    torch.manual_seed(0)
    model = StegoModel(16, 6, 0.0, N_CLASSES)
    feats = torch.randn(4, 16, 3, 3)
    loss, _ = model(feats, feats.flip(0), torch.full((4, 6, 6), 255), weights=(1, 1, 1),
                    shifts=(0.1, 0.1, 0.1), samples=3, generator=torch.Generator())
    loss.backward()
    assert model.head.linear.weight.grad.abs().sum() > 0


def test_predict_gives_label_resolution_maps() -> None:
    model = StegoModel(16, 6, 0.1, N_CLASSES).eval()
    out = predict(model, torch.randn(2, 16, 3, 3), 12)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "cluster": (2, 12, 12), "linear": (2, 12, 12), "raw_linear": (2, 12, 12)}
    assert int(out["cluster"].max()) < N_CLASSES


def test_square_crop_resizes_the_shorter_side_then_takes_the_centre() -> None:
    ids = np.arange(40 * 20, dtype=np.uint8).reshape(20, 40) % 251  # H=20, W=40
    img = Image.fromarray(ids)
    out = square_crop(img, 10, Image.NEAREST)
    assert out.size == (10, 10)
    # 40x20 -> 20x10 (every second pixel); the centre 10 columns start at column 5,
    # i.e. source column 10.
    half = np.asarray(img.resize((20, 10), Image.NEAREST))
    assert np.array_equal(np.asarray(out), half[:, 5:15])


def test_decode_batch_round_trips_the_cache_bytes() -> None:
    feats = np.random.default_rng(0).normal(size=(2, 3, 2, 2)).astype(np.float16)
    labels = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    out = decode_batch({"index": np.array([3, 4]),
                        "feats": np.array([f.tobytes() for f in feats], dtype=object),
                        "label": np.array([x.tobytes() for x in labels], dtype=object),
                        "source": np.array(["a", "b"], dtype=object)}, [3, 2, 2], 4)
    assert set(out) == {"index", "feats", "label"}
    assert np.array_equal(out["feats"], feats) and np.array_equal(out["label"], labels)


def test_partners_are_drawn_alike_for_the_same_seed_epoch_and_rank() -> None:
    draw = lambda *a: torch.randint(7, (20,), generator=partner_generator(*a))  # noqa: E731
    assert torch.equal(draw(0, 3, 1), draw(0, 3, 1))
    assert not torch.equal(draw(0, 3, 1), draw(0, 4, 1))
    assert not torch.equal(draw(0, 3, 1), draw(0, 3, 0))


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_feature_extractor_embeds_crops_and_labels() -> None:
    """The job's actor on two images of different sizes: feature maps of the backbone's
    token grid, unit global keys, labels cut exactly like the image."""
    extractor = FeatureExtractor(str(scenarios.stego_backbone()), "teacher", 32)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 64, 3), dtype=np.uint8),
              rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)]
    masks = [np.tile(np.arange(64, dtype=np.uint8) // 16, (40, 1)),
             np.full((32, 32), 255, np.uint8)]
    out = extractor({"image": np.array([_png(i) for i in images], dtype=object),
                     "mask": np.array([_png(m) for m in masks], dtype=object),
                     "path": np.array(["a.png#crop1", "b.png"], dtype=object),
                     "split": np.array(["train", "val"], dtype=object)})
    assert out["shape"].tolist() == [[192, 4, 4]] * 2
    assert np.allclose(np.linalg.norm(out["key"], axis=1), 1, atol=1e-3)
    assert list(out["source"]) == ["a.png", "b.png"]
    label = np.frombuffer(out["label"][0], np.uint8).reshape(32, 32)
    # 64x40 -> 51x32 (nearest), centre 32 columns start at 9: source columns 11..51.
    expected = np.asarray(square_crop(Image.fromarray(masks[0]), 32, Image.NEAREST))
    assert np.array_equal(label, expected) and set(np.unique(label)) == {0, 1, 2, 3}


def test_task_trains_on_the_engine_and_scores_every_eval_row() -> None:
    """Three epochs of the worker task without Ray (tests/scenarios.py, "stego"): the
    baseline's k-means on features whose classes are separate directions matches them
    (mIoU 100 after matching); every evaluation row is scored."""
    scenario = scenarios.stego()
    cfg = scenario.config()
    ctx = scenarios.context(scenario)
    task = build_and_run(lambda c: scenario.task(cfg, scenario.run, c), ctx, cfg.seed)
    last = ctx.reports[-1]
    assert [r["epoch"] for r in ctx.reports] == [1, 2, 3]
    assert all(r["test_rows"] == 10 for r in ctx.reports)
    assert last["test_kmeans_miou"] == pytest.approx(100.0)
    assert last["test_kmeans_accuracy"] == pytest.approx(100.0)
    assert 0 <= last["test_cluster_miou"] <= 100 and np.isfinite(last["train_loss"])
    train = scenario.train
    assert torch.equal(task.bank, train["feats"])  # every training row, in index order
    centroids = task.kmeans_centroids()
    found = kmeans_predict(centroids, train["feats"].float(), 8)
    assert unsupervised_miou(found.numpy(), train["label"].numpy(), N_CLASSES)["miou"] == \
        pytest.approx(100.0)
    assert feature_points(train["feats"]).shape == (24 * 16, 12)


def test_two_workers_keep_identical_replicas_and_one_evaluation() -> None:
    """On 2 workers every worker holds the whole bank, the replicas stay identical (each
    draws its own KNN partners; DDP averages the gradients), and rank 0 scores all 10
    evaluation images."""
    from ddp import run_ranks

    (w0, r0), (w1, r1) = run_ranks(scenarios.train, 2, "stego", {})
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert [r["test_rows"] for r in r0] == [10, 10, 10]
    assert r0[-1]["test_kmeans_miou"] == pytest.approx(100.0)
    # 24 rows in global batches of 8: 3 steps of 4 rows on each worker, all counted.
    assert [r["train_samples"] for r in r0] == [24, 24, 24]


def test_config_refuses_a_missing_backbone_and_bad_weights() -> None:
    from raylab.errors import ConfigError
    from raylab.methods.stego import StegoMethod

    with pytest.raises(ConfigError, match="backbone"):
        StegoMethod().load(cfglib.from_dict(StegoConfig, {"data": "x"}))
    with pytest.raises(ConfigError, match="loss.knn_weight"):
        cfglib.validate(cfglib.from_dict(StegoConfig, {
            "data": "x", "backbone": "y", "loss": {"knn_weight": -1.0}}))
    with pytest.raises(ConfigError, match="eval_split"):
        cfglib.from_dict(StegoConfig, {"data": "x", "backbone": "y",
                                       "eval_split": "train"}).validate()


def test_same_partition_helper_catches_a_split_cluster() -> None:
    assert same_partition(np.array([0, 0, 1]), np.array([2, 2, 5]))
    assert not same_partition(np.array([0, 0, 1]), np.array([2, 3, 5]))


def test_load_names_a_bad_split_or_backbone(tmp_path) -> None:
    from raylab.data.segmentation import convert_segmentation, write_segmentation_sample
    from raylab.errors import CheckpointError, ConfigError
    from raylab.methods.stego import StegoMethod

    raw = write_segmentation_sample(tmp_path / "raw", train_images=3, val_images=2, size=16)
    convert_segmentation(raw / "images", raw / "masks", tmp_path / "seg",
                         classes=raw / "classes.yaml")
    method = StegoMethod()
    good = {"data": str(tmp_path / "seg"), "backbone": str(scenarios.stego_backbone())}
    data = method.load(cfglib.from_dict(StegoConfig, good))
    assert data.class_names == ["sky", "grass", "road", "box", "disk"]
    assert data.rows == {"train": 3, "val": 2} and data.cache is None
    with pytest.raises(ConfigError, match="eval_split.*train, val.*'test'"):
        method.load(cfglib.from_dict(StegoConfig, {**good, "eval_split": "test"}))
    with pytest.raises(CheckpointError, match="not a raylab DINO checkpoint"):
        method.load(cfglib.from_dict(StegoConfig, {
            **good, "backbone": str(scenarios.reuse_backbone())}))
