"""Shared fixtures: the real data root, synthetic JIGSAWS and CLEAR samples, one local Ray
cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Set before Ray starts anywhere in the session (RAY_NOTES: faster 1-worker runs, no
# duplicated worker prints).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")


def data_root() -> Path:
    return Path(os.environ.get("RAYLAB_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic JIGSAWS-format sample converted to shards, once per session."""
    from raylab.data.jigsaws import convert_jigsaws, write_sample

    root = tmp_path_factory.mktemp("jigsaws_sample")
    write_sample(root / "raw", seed=0)
    convert_jigsaws(root / "raw", root / "shards")
    return root / "shards"


@pytest.fixture(scope="session")
def small_jigsaws_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Suturing only, every subject, trials 1-3 of 240-300 frames (~500 windows at step 10,
    a sixth of the full sample): for tests of the platform (faults, Tune, job submission)
    that need whole runs, not learning."""
    from raylab.data.jigsaws import convert_jigsaws, write_sample

    root = tmp_path_factory.mktemp("small_jigsaws")
    raw = write_sample(root / "raw", tasks=("Suturing",), trials=(1, 2, 3), frames=(240, 300),
                       seed=0)
    convert_jigsaws(raw, root / "shards")
    return root / "shards"


@pytest.fixture(scope="session")
def tiny_jigsaws_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two short Suturing trials of two subjects: enough for checks that stop before Ray."""
    from raylab.data.jigsaws import convert_jigsaws, write_sample

    root = tmp_path_factory.mktemp("tiny_jigsaws")
    raw = write_sample(root / "raw", tasks=("Suturing",), subjects="BD", trials=(1, 2),
                       frames=(100, 120))
    convert_jigsaws(raw, root / "shards")
    return root / "shards"


@pytest.fixture(scope="session")
def tiny_clear_stream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SYNTHETIC CLEAR stream: 5 buckets (bucket 0 unlabeled) of ~24 shape images (4
    classes, 32 px), drawn from the project's own image sample."""
    from raylab.data.clear import convert_clear, write_clear_sample
    from raylab.data.imagefolder import write_image_sample

    root = tmp_path_factory.mktemp("tiny_clear")
    src = write_image_sample(root / "shapes", classes=4, train_per_class=40, test_per_class=10)
    write_clear_sample(src, root / "raw", n_buckets=5, per_class_per_bucket=6, seed=0)
    convert_clear(root / "raw", root / "stream")
    return root / "stream"


@pytest.fixture(scope="session")
def detection_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SYNTHETIC detection sample (coloured shapes with exact masks, 3 classes, 64 px):
    32 training and 8 validation images, each split converted to coco shards."""
    from raylab.data.detection_sample import convert_sample, write_detection_sample

    root = tmp_path_factory.mktemp("detection_sample")
    write_detection_sample(root / "raw", images=32, val_images=8, size=64, classes=3)
    return convert_sample(root / "raw", root / "shards")


@pytest.fixture(autouse=True, scope="module")
def _no_ray_left_for_plain_tests(request: pytest.FixtureRequest) -> None:
    """Tests without the ``ray`` mark run with no Ray connected: a cluster left up by the
    integration tests forwards its workers' log lines into this process's stderr at any
    moment, into output the CLI tests capture and check line by line. Later Ray tests start
    it again (``ensure_ray``)."""
    if request.node.get_closest_marker("ray") is None:
        import sys

        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for every integration test (starting Ray costs seconds)."""
    ray = pytest.importorskip("ray")
    from raylab.runtime.cluster import ensure_ray

    ensure_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def python_api_example(ray_cluster, small_jigsaws_shards, tmp_path_factory):
    """``examples/python_api.py`` run once: a 3-fold skill run in-process, then a 2-trial
    search over the window (1 epoch each) on the shared cluster. Its search is
    also the experiment the Tune, analyze and resume tests read (one search for both)."""
    import runpy

    main = runpy.run_path(str(REPO / "examples" / "python_api.py"))["main"]
    out = tmp_path_factory.mktemp("python_api")
    return out, main(out, data=small_jigsaws_shards, epochs=1, trials=2, workers=0)
