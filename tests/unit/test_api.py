"""The Python API without Ray: configs from dicts and files, bad input as RaylabErrors
raised before Ray starts (the same ones the CLI prints), search spaces as Python data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import raylab
from raylab import api
from raylab.cli import main
from raylab.errors import ConfigError, DataError, RaylabError, RegistryError
from raylab.runtime.search_space import parse_space


def test_import_raylab_loads_neither_torch_nor_ray() -> None:
    code = ("import sys, raylab; raylab.__version__; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    assert raylab.train is api.train and raylab.RunResult is api.RunResult
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        raylab.nope  # noqa: B018


def test_config_layers_defaults_file_dict_overrides_data(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text("window: 90\noptim:\n  lr: 0.01\n")
    _, from_file = api.method_config("skill", data="shards", config=tmp_path / "cfg.yaml",
                                     overrides={"optim.lr": 0.002})
    assert (from_file.window, from_file.optim.lr) == (90, 0.002)
    assert from_file.data == str(tmp_path / "shards")  # absolute: workers run elsewhere
    assert from_file.optim.epochs == type(from_file)().optim.epochs  # the rest: defaults

    # A dict config takes nested sections (keeping their other keys) and dotted keys.
    _, from_dict = api.method_config("skill", config={"optim": {"epochs": 3}, "step": 20},
                                     overrides=["window=30"])
    assert (from_dict.optim.epochs, from_dict.step, from_dict.window) == (3, 20, 30)
    assert from_dict.optim.lr == type(from_dict)().optim.lr


@pytest.mark.parametrize("kwargs, error, text", [
    ({"method": "nosuch"}, RegistryError, "unknown method 'nosuch'; known methods: "),
    ({"method": "skill", "config": {"windw": 30}}, ConfigError, "windw"),
    ({"method": "skill", "overrides": {"window": "wide"}}, ConfigError, "window"),
    ({"method": "skill", "config": 3}, ConfigError, "expected a YAML file or a dict"),
    ({"method": "skill", "overrides": "window=30"}, ConfigError, "expected a dict"),
])
def test_bad_config_raises_naming_what(kwargs, error, text) -> None:
    with pytest.raises(error, match=text):
        api.method_config(**kwargs)


def test_train_fails_before_ray_starts_with_the_clis_message(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no_shards"
    with pytest.raises(DataError) as caught:
        raylab.train("skill", data=missing, storage=tmp_path / "runs")
    assert str(missing) in str(caught.value)
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert not (tmp_path / "runs").exists()  # nothing written for a run that never started

    assert main(["train", "skill", "--data", str(missing), "--storage",
                 str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.strip() == f"raylab: error: {caught.value}"


@pytest.mark.parametrize("kwargs, text", [
    ({"trials": 0}, "--trials: expected an integer >= 1, got 0"),
    ({"grace_period": 1.5}, "--grace-period: expected an integer >= 1, got 1.5"),
    ({"space": {"window": (30, 60, 90)}}, r"space window: a range is a \(low, high\) tuple"),
    ({"space": {"window": object()}}, "space window: expected a list"),
    ({"workers": "two"}, "--workers: expected N or MIN-MAX"),
])
def test_bad_tune_arguments_raise(tiny_jigsaws_shards: Path, tmp_path: Path, kwargs,
                                  text) -> None:
    with pytest.raises(RaylabError, match=text):
        raylab.tune("skill", data=tiny_jigsaws_shards, storage=tmp_path, **kwargs)


def test_space_as_python_data_means_the_same_as_space_text() -> None:
    from raylab.methods.skill import SkillConfig

    given = {"window": [30, 60], "optim.lr": (1e-4, 1e-2), "step": 10,
             "model.dropout_fc": "log(0.1, 0.5)", "optim.epochs": (2, 6)}
    as_text = {key: api._space_text(key, spec) for key, spec in given.items()}
    assert parse_space(SkillConfig, as_text) == parse_space(SkillConfig, [
        "window=[30, 60]", "optim.lr=(0.0001, 0.01)", "step=10",
        "model.dropout_fc=log(0.1, 0.5)", "optim.epochs=(2, 6)"])
    kinds = {d.key: d.kind for d in parse_space(SkillConfig, as_text)}
    assert kinds == {"window": "choice", "optim.lr": "uniform", "step": "fixed",
                     "model.dropout_fc": "loguniform", "optim.epochs": "int"}


def test_run_options_are_checked_and_named() -> None:
    options, name = api.run_options("skill", workers="1-3", cpus_per_worker=2, storage="x")
    assert (options.workers, options.max_workers, options.cpus_per_worker) == (1, 3, 2.0)
    assert name.startswith("skill-")
    assert api.run_options("skill", name="mine")[1] == "mine"
    with pytest.raises(ConfigError, match="--name: expected a plain folder name"):
        api.run_options("skill", name="a/b")
