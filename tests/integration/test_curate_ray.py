"""``raylab curate clear`` end to end on the shared local Ray cluster: an image pool with
synthetic timestamps, a small open_clip model with random weights from a local file,
the embedding job (2 actors), the stream it writes read by ``data inspect`` and trained
on by ``raylab train clear``, curating again from the cache, resuming an interrupted
embedding, and a review applied.

The images are the CIFAR-10 subset's (30 per class) when ``$RAYLAB_DATA`` has it, else
the generated shape sample: the rankings of a random model are arbitrary either way, so
the checks are of the pipeline's invariants, not of what the model sees.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raylab.cli import main
from raylab.curation.clip import write_random_clip
from raylab.curation.review import stream_id
from raylab.data.clear import read_stream_manifest
from raylab.data.imagefolder import write_image_sample
from raylab.data.pool import convert_pool, write_timestamps_csv
from raylab.data.shards import read_manifest
from tests.conftest import data_root

pytestmark = pytest.mark.ray

PER_CLASS = 6
BUCKETS = 4  # bucket 0 unlabeled, 1-3 labelled


def _images(tmp: Path) -> Path:
    cifar = data_root() / "cifar10" / "train"
    if cifar.is_dir():
        out = tmp / "images"
        for folder in sorted(p for p in cifar.iterdir() if p.is_dir()):
            (out / folder.name).mkdir(parents=True)
            for f in sorted(folder.iterdir())[:30]:
                shutil.copy(f, out / folder.name / f.name)
        return out
    return write_image_sample(tmp / "sample", classes=4, train_per_class=60) / "train"


@pytest.fixture(scope="module")
def curated(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("curate")
    images = _images(tmp)
    write_timestamps_csv(images, tmp / "times.csv", seed=3)
    pool = tmp / "pool"
    convert_pool(images, pool, timestamps=str(tmp / "times.csv"), rows_per_shard=50)
    config, weights = write_random_clip(tmp / "model")
    queries = tmp / "queries.yaml"
    queries.write_text("templates: ['a photo of a {}.', 'a picture of a {}.']\n"
                       "classes:\n  cat:\n  dog: ['a photo of a dog.', 'a small dog.']\n"
                       "  ship:\n")
    args = ["curate", "clear", str(pool), None, "--queries", str(queries), "--model",
            f"open_clip:{config}", "--checkpoint", weights, "--buckets", str(BUCKETS),
            "--per-class", str(PER_CLASS), "--background", "4", "--actors", "2",
            "--batch-size", "16"]
    stream = tmp / "stream"
    args[3] = str(stream)
    assert main(args) == 0
    return {"tmp": tmp, "pool": pool, "stream": stream, "args": args, "weights": weights,
            "config": config, "queries": queries}


def test_the_stream_is_a_clear_stream(curated: dict, capsys: pytest.CaptureFixture) -> None:
    stream, pool = curated["stream"], curated["pool"]
    manifest = read_stream_manifest(stream)
    assert manifest["class_names"] == ["cat", "dog", "ship", "BACKGROUND"]
    assert manifest["buckets"] == [0, 1, 2, 3] and manifest["unlabeled_buckets"] == [0]
    pool_rows = read_manifest(pool)["rows"]
    # Quantile edges: every pool image falls in one bucket; bucket 0 keeps all of its own.
    times = pq.read_table(pool / read_manifest(pool)["shards"][0]["file"]).column(
        "timestamp").to_numpy()
    assert times.size and manifest["curation"]["outside_edges"] == 0
    selection = pq.read_table(stream / "curation" / "selection.parquet").to_pylist()
    for b in (1, 2, 3):
        counts = manifest["counts"][str(b)]
        assert all(counts[c] <= PER_CLASS for c in ("cat", "dog", "ship"))
        assert counts["BACKGROUND"] == 4
        assert manifest["bucket_rows"][str(b)] == sum(counts.values())
        assert sum(1 for r in selection if r["bucket"] == b) == manifest["bucket_rows"][str(b)]
    # Every labelled image is where the selection says, with its label.
    rows = {}
    for b in manifest["buckets"]:
        folder = stream / manifest["bucket_dirs"][str(b)]
        for shard in read_manifest(folder)["shards"]:
            for r in pq.read_table(folder / shard["file"],
                                   columns=["path", "label", "bucket"]).to_pylist():
                rows[r["path"]] = r
    assert len(rows) == manifest["rows"]  # no image in two buckets or twice
    for r in selection:
        assert rows[r["path"]]["label"] == r["label"] and rows[r["path"]]["bucket"] == r["bucket"]
    assert {r["label"] for p, r in rows.items() if r["bucket"] == 0} == {-1}
    # Bucket 0 holds every pool image older than the first edge (a quarter of the pool).
    assert manifest["bucket_rows"]["0"] in range(pool_rows // 4 - 1, pool_rows // 4 + 2)
    assert main(["data", "inspect", str(stream)]) == 0
    assert "clear" in capsys.readouterr().out
    assert (stream / "review" / "index.html").is_file()


def test_train_clear_runs_on_the_curated_stream(curated: dict, tmp_path: Path) -> None:
    rc = main(["train", "clear", "--data", str(curated["stream"]), "--set",
               "model=test_resnet", "--set", "input_size=16", "--set", "optim.epochs=1",
               "--set", "optim.batch_size=8", "--workers", "0", "--storage", str(tmp_path),
               "--name", "c"])
    assert rc == 0
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["buckets"] == [1, 2, 3]
    assert all(v is not None for row in summary["matrix"] for v in row)


def test_new_queries_reuse_the_cache_and_an_interrupted_job_resumes(
        curated: dict, capsys: pytest.CaptureFixture) -> None:
    tmp, args = curated["tmp"], list(curated["args"])
    cache = next((curated["pool"] / "embeddings").iterdir())
    parts = sorted(cache.glob("part-*.parquet"))
    before = {p.name: pq.read_table(p) for p in parts}
    # An interruption: one shard's embeddings never written (a half-written file never
    # exists: each is renamed into place whole).
    parts[1].unlink()
    queries = tmp / "new.yaml"
    queries.write_text("classes: [horse, truck]\n")
    args[3] = str(tmp / "stream2")
    args[args.index("--queries") + 1] = str(queries)
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = read_manifest(curated["pool"])["shards"][1]["rows"]
    assert f"embeddings: {rows} embedded" in out  # only the missing shard
    # The re-embedded shard equals the first run's (same model, same images).
    again = pq.read_table(parts[1])
    assert again.column("path").to_pylist() == before[parts[1].name].column("path").to_pylist()
    np.testing.assert_allclose(
        np.stack(again.column("embedding").to_numpy(zero_copy_only=False)),
        np.stack(before[parts[1].name].column("embedding").to_numpy(zero_copy_only=False)),
        atol=1e-5)
    assert read_stream_manifest(tmp / "stream2")["class_names"] == ["horse", "truck",
                                                                    "BACKGROUND"]
    assert main(args) == 2  # the stream exists: refused, not overwritten
    assert main([*args, "--overwrite"]) == 0
    assert "all from the cache" in capsys.readouterr().out


def test_apply_review_drops_the_rejected(curated: dict, tmp_path: Path) -> None:
    stream = tmp_path / "stream"
    shutil.copytree(curated["stream"], stream)
    selection = pq.read_table(stream / "curation" / "selection.parquet").to_pylist()
    rejected = [{"bucket": r["bucket"], "path": r["path"]} for r in selection[:3]]
    manifest = read_stream_manifest(stream)
    review = tmp_path / "review.json"
    review.write_text(json.dumps({"format": "raylab-clear-review",
                                  "stream": stream_id(manifest), "rejected": rejected}))
    assert main(["curate", "apply-review", str(stream), str(review)]) == 0
    after = read_stream_manifest(stream)
    assert after["rows"] == manifest["rows"] - 3
    left = {r["path"] for r in pq.read_table(stream / "curation" /
                                             "selection.parquet").to_pylist()}
    assert left == {r["path"] for r in selection} - {r["path"] for r in rejected}
