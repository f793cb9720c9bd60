"""Every registered method, as timm tests every registered model: its default config
validates, its default search space parses against that config, it states what Tune
optimises, and the global batch is split between workers before Ray starts (no Ray)."""

from __future__ import annotations

import pytest

from raylab import config as cfglib
from raylab.engine.batching import per_worker_batch, shuffle_seed, with_last
from raylab.errors import ConfigError
from raylab.registry import get_method, list_methods
from raylab.runtime.options import RunOptions
from raylab.runtime.search_space import parse_space

METHODS = sorted(list_methods())


@pytest.mark.parametrize("name", METHODS)
def test_default_config_validates_and_round_trips(name: str) -> None:
    method = get_method(name)
    cfg = method.Config()
    cfglib.validate(cfg)
    again = cfglib.from_dict(method.Config, cfglib.to_dict(cfg))
    assert cfglib.to_dict(again) == cfglib.to_dict(cfg)
    assert {"data", "seed", "precision"} <= set(cfglib.to_dict(cfg))


@pytest.mark.parametrize("name", METHODS)
def test_default_search_space_parses(name: str) -> None:
    method = get_method(name)
    space = parse_space(method.Config, dict(method.default_space))
    assert [d.key for d in space] == list(method.default_space)
    for dim in space:
        cfglib.field_type(method.Config, dim.key)  # a real config key


@pytest.mark.parametrize("name", METHODS)
def test_method_states_its_metric_and_task(name: str) -> None:
    method = get_method(name)
    assert method.name == name and method.paper
    assert method.metric == f"val_{method.main_metric}" and method.mode in ("min", "max")
    assert method.Task.throughput_key in ("samples_per_s", "img_per_s")


@pytest.mark.parametrize("name", METHODS)
def test_batch_smaller_than_workers_fails_before_ray(name: str) -> None:
    """Each worker needs at least one row per step; the check runs in ``check`` before any
    data is read or Ray started."""
    method = get_method(name)
    cfg = cfglib.apply_overrides(method.Config(), {"optim.batch_size": 2})
    with pytest.raises(ConfigError, match=r"config key 'optim.batch_size': 2 is smaller "
                                          r"than 4 worker\(s\)"):
        method.check(cfg, RunOptions(workers=4))


def test_per_worker_batch() -> None:
    assert per_worker_batch(64, 1) == 64
    assert per_worker_batch(64, 2) == 32
    assert per_worker_batch(64, 2, 4) == 8
    assert per_worker_batch(65, 2) == 32  # the floor; the remainder is not trained on
    assert per_worker_batch(4, 4) == 1
    with pytest.raises(ConfigError, match=r"3 is smaller than 2 worker\(s\) x grad_accum 2 "
                                          r"= 4"):
        per_worker_batch(3, 2, 2)


def test_shuffle_seed_changes_with_epoch_and_rank_only() -> None:
    seeds = {shuffle_seed(0, e, r) for e in range(10) for r in range(4)}
    assert len(seeds) == 40
    assert shuffle_seed(7, 3, 1) == shuffle_seed(7, 3, 1)


def test_with_last_marks_only_the_last_item() -> None:
    assert list(with_last("abc")) == [("a", False), ("b", False), ("c", True)]
    assert list(with_last([])) == []
    assert list(with_last(iter([5]))) == [(5, True)]


def test_clear_biased_reservoir_needs_a_share() -> None:
    """A null share is the 1/t reservoir, i.e. ER's buffer: the "Finetuning (biased
    reservoir)" row would repeat ER's, so the default is the bench's 0.5 and null is
    refused with that buffer."""
    from raylab import config as cfglib
    from raylab.methods.clear.config import ClearConfig

    assert ClearConfig().buffer_alpha == 0.5
    with pytest.raises(ConfigError, match="'buffer_alpha': null with buffer=biased_reservoir"):
        cfglib.apply_overrides(ClearConfig(), {"buffer": "biased_reservoir",
                                               "buffer_alpha": None})
