"""Tuning never sees test rows, for every method (no Ray): the rows a Tune trial scores
are disjoint from the rows behind the final reported metric, and each plan's row count is
what its evaluation must score (the exactly-once check of every run).

Row identities come from ``Method.eval_row_ids``: window ids for the skill model, image
paths for the image methods, row ids for CLEAR. A cross-validated method is checked fold
by fold (a search with ``--set folds=[F]`` selects for fold F without its test rows).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import scenarios

from raylab import config as cfglib
from raylab.registry import get_method, list_methods


@pytest.fixture(scope="module")
def samples(sample_shards: Path, tiny_clear_stream: Path, detection_shards: Path,
            tmp_path_factory) -> dict:
    from raylab.data.imagefolder import convert_imagefolder, write_image_sample

    root = tmp_path_factory.mktemp("tuning_rows")
    images = write_image_sample(root / "raw", classes=4, train_per_class=30, test_per_class=10)
    convert_imagefolder(images, root / "images")
    return {"skill": sample_shards, "convnext": root / "images", "dino": root / "images",
            "clear": tiny_clear_stream, "detection": detection_shards,
            "minivit": root / "images", "reuse": root / "images",
            "stego": segmentation_shards(root)}


def segmentation_shards(root: Path) -> Path:
    """The segmentation sample, its training images five-cropped (the crops of one image
    must stay on one side of Tune's hold-out)."""
    from raylab.data.segmentation import convert_segmentation, write_segmentation_sample

    raw = write_segmentation_sample(root / "seg_raw")
    convert_segmentation(raw / "images", raw / "masks", root / "seg", five_crop=0.5,
                         classes=raw / "classes.yaml")
    return root / "seg"


#: Configs small enough to plan (nothing is trained).
SETTINGS = {"skill": {}, "convnext": {"optim.batch_size": 16},
            "dino": {"optim.batch_size": 16}, "clear": {}, "detection": {"val_fraction": 0.2},
            "minivit": {"optim.batch_size": 16},
            "reuse": {"optim.batch_size": 16,
                      "backbone_checkpoint": str(scenarios.reuse_backbone())},
            "stego": {"backbone": str(scenarios.stego_backbone()), "val_fraction": 0.2}}


def test_every_method_is_covered() -> None:
    assert set(SETTINGS) == set(list_methods())


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_tuning_never_scores_a_test_row(name: str, samples: dict) -> None:
    method = get_method(name)
    cfg = cfglib.apply_overrides(method.Config(), {"data": str(samples[name]),
                                                   **SETTINGS[name]})
    data = method.load(cfg)
    finals = method.plan(cfg, data, tune=False)
    assert finals
    for final in finals:
        # The search that selects this run's config (a fold's own, when cross-validated).
        run_cfg = cfglib.apply_overrides(cfg, {"folds": [final.name]}) if len(finals) > 1 \
            else cfg
        tuning = method.tune_config(run_cfg)
        # ASHA compares trials on every epoch's metric, and Tune refuses a result without it.
        assert getattr(tuning, "eval_every", 1) == 1, f"{name}: a trial skips evaluations"
        (trial,) = method.plan(tuning, method.load(tuning), tune=True)
        tuned = method.eval_row_ids(tuning, data, trial)
        tested = method.eval_row_ids(run_cfg, data, final)
        assert tuned and tested, (len(tuned), len(tested))
        assert not tuned & tested, f"{final.name}: Tune scores {len(tuned & tested)} test rows"
        assert final.eval_rows == len(tested)
        assert trial.eval_rows == len(tuned)
