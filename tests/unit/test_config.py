"""Tests of raylab.config: defaults, YAML, ``--set`` overrides, type checks, validation."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from raylab import config as cfglib
from raylab.errors import ConfigError
from raylab.methods.skill import SkillConfig


@dataclass
class Inner:
    lr: float = 0.1
    steps: int = 3

    def validate(self) -> None:
        cfglib.require(self.lr > 0, "inner.lr", "a positive number", self.lr)


@dataclass
class Toy:
    name: str = "toy"
    count: int = 1
    ratio: float = 0.5
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    maybe: int | None = None
    inner: Inner = field(default_factory=Inner)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- defaults


def test_defaults_are_the_dataclass_defaults() -> None:
    cfg = cfglib.load(SkillConfig)
    assert cfg == SkillConfig()
    assert (cfg.window, cfg.step, cfg.cv, cfg.labels) == (60, 30, "loso", "self")
    assert cfg.optim.lr == 1e-3
    assert cfg.model.channels == [64, 128, 256]


def test_yaml_file_then_set_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "window: 90\noptim:\n  lr: 0.01\n  epochs: 5\n")
    cfg = cfglib.load(SkillConfig, path, ["optim.lr=1e-3", "model.channels=[8,16,32]",
                                          "labels=grs", "step=15"])
    assert cfg.window == 90  # from the file
    assert cfg.optim.epochs == 5  # from the file, untouched by the override of optim.lr
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert isinstance(cfg.optim.lr, float)
    assert cfg.model.channels == [8, 16, 32]
    assert cfg.labels == "grs"
    assert cfg.step == 15
    assert cfg.optim.batch_size == 64  # default kept


def test_yaml_file_accepts_exponent_without_dot(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads `3e-4` as a string; a float field must still accept it.
    path = _write(tmp_path / "c.yaml", "optim:\n  lr: 3e-4\n  weight_decay: 1E-5\n")
    cfg = cfglib.load(SkillConfig, path)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.optim.weight_decay == pytest.approx(1e-5)


def test_dict_overrides_as_tune_passes_them() -> None:
    base = SkillConfig()
    cfg = cfglib.apply_overrides(base, {"optim.lr": 0.02, "window": 30,
                                        "model.channels": [4, 8, 16]})
    assert (cfg.optim.lr, cfg.window, cfg.model.channels) == (0.02, 30, [4, 8, 16])
    assert base.window == 60 and base.optim.lr == 1e-3  # the input is not mutated


def test_section_override_keeps_the_sections_other_values(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "optim:\n  epochs: 5\n")
    cfg = cfglib.load(SkillConfig, path, ["optim={lr: 0.1}"])
    assert cfg.optim.lr == 0.1
    assert cfg.optim.epochs == 5


# ----------------------------------------------------------------------------- coercion


@pytest.mark.parametrize(("override", "attr", "expected"), [
    ("count=3", "count", 3),
    ("ratio=2", "ratio", 2.0),  # an int is a valid float
    ("ratio=1e-3", "ratio", 1e-3),
    ("ratio=-2.5E+1", "ratio", -25.0),
    ("ratio=.25", "ratio", 0.25),
    ("name=123", "name", "123"),  # numbers stay text where text is expected
    ("name=hello world", "name", "hello world"),
    ("name=__import__('os').getcwd()", "name", "__import__('os').getcwd()"),
    ("flag=true", "flag", True),
    ("mode=b", "mode", "b"),
    ("maybe=null", "maybe", None),
    ("maybe=4", "maybe", 4),
    ("sizes=[3, 4, 5]", "sizes", [3, 4, 5]),
    ("sizes=[]", "sizes", []),
])
def test_set_values_are_coerced(override: str, attr: str, expected: Any) -> None:
    cfg = cfglib.apply_overrides(Toy(), [override])
    value = getattr(cfg, attr)
    assert value == expected
    assert type(value) is type(expected)


def test_nested_toy_override_and_float_type() -> None:
    cfg = cfglib.apply_overrides(Toy(), ["inner.lr=1", "inner.steps=7"])
    assert cfg.inner == Inner(lr=1.0, steps=7)
    assert isinstance(cfg.inner.lr, float)


@pytest.mark.parametrize(("override", "message"), [
    ("count=2.5", "config key 'count': expected int, got 2.5"),
    ("count=true", "config key 'count': expected int, got True"),
    ("count=1e3", "config key 'count': expected int, got '1e3'"),
    ("count=abc", "config key 'count': expected int, got 'abc'"),
    ("ratio=true", "config key 'ratio': expected float, got True"),
    ("ratio=fast", "config key 'ratio': expected float, got 'fast'"),
    ("flag=1", "config key 'flag': expected bool, got 1"),
    ("mode=c", "config key 'mode': expected one of 'a', 'b', got 'c'"),
    ("sizes=[3, x]", "config key 'sizes[1]': expected int, got 'x'"),
    ("sizes=3", "config key 'sizes': expected a list of int, got 3"),
    ("maybe=1.5", "config key 'maybe': expected int or null, got 1.5"),
    ("name=[1, 2]", "config key 'name': expected str, got [1, 2]"),
    ("inner=3", "config key 'inner': expected a mapping of Inner fields, got 3"),
    ("inner.steps=2.0", "config key 'inner.steps': expected int, got 2.0"),
])
def test_wrong_type_names_key_and_expected_type(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfglib.apply_overrides(Toy(), [override])
    assert str(info.value) == message


@pytest.mark.parametrize(("override", "key"), [
    ("nope=1", "'nope'"),
    ("optim.nope=1", "'optim.nope'"),
    ("optim.lr.x=1", "'optim.lr.x'"),
    ("model.channels.0=4", "'model.channels.0'"),
])
def test_unknown_key_names_the_dotted_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=r"^unknown config key ") as info:
        cfglib.apply_overrides(SkillConfig(), [override])
    assert key in str(info.value)


def test_unknown_key_lists_known_keys() -> None:
    with pytest.raises(ConfigError) as info:
        cfglib.apply_overrides(SkillConfig(), ["optim.nope=1"])
    assert "optim.lr" in str(info.value) and "optim.epochs" in str(info.value)


def test_set_without_equals_sign() -> None:
    with pytest.raises(ConfigError) as info:
        cfglib.apply_overrides(SkillConfig(), ["window"])
    assert str(info.value) == "--set 'window': expected KEY=VALUE, e.g. optim.lr=1e-3"


def test_unparseable_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^--set model\.channels: cannot parse value '\[8,16'"):
        cfglib.apply_overrides(SkillConfig(), ["model.channels=[8,16"])


def test_control_character_is_a_config_error_not_a_crash() -> None:
    with pytest.raises(ConfigError, match=r"^--set task: cannot parse value") as info:
        cfglib.apply_overrides(SkillConfig(), ["task=a\x01b"])
    assert "\n" not in str(info.value)  # the CLI prints one line


# ---------------------------------------------------------------------- never run as code


def test_python_yaml_tag_in_set_is_refused_not_executed(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
    with pytest.raises(ConfigError, match=r"^--set task: cannot parse value"):
        cfglib.apply_overrides(SkillConfig(), ['task=!!python/object/apply:os.system ["echo hi"]'])
    assert calls == []


def test_python_yaml_tag_in_file_is_refused_not_executed(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
    path = _write(tmp_path / "evil.yaml", 'task: !!python/object/apply:os.system ["echo hi"]\n')
    with pytest.raises(ConfigError) as info:
        cfglib.load(SkillConfig, path)
    assert str(info.value).startswith(f"{path}: not valid YAML")
    assert calls == []


# ------------------------------------------------------------------------------ files


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        cfglib.load(SkillConfig, path)
    assert str(info.value) == f"{path}: config file not found"


@pytest.mark.parametrize(("text", "fragment"), [
    ("- 1\n- 2\n", "config root: expected a mapping, got [1, 2]"),
    ("just text\n", "config root: expected a mapping, got 'just text'"),
    ("window: [1, 2\n", "not valid YAML"),
    ("optim:\n  nope: 1\n", "unknown config key 'optim.nope'"),
    ("window: 2.5\n", "config key 'window': expected int, got 2.5"),
    ("1: 2\n", "unknown config key '1'"),
    ("window: 0\n", "config key 'window': expected an integer >= 1, got 0"),
])
def test_bad_yaml_file_names_the_file(tmp_path: Path, text: str, fragment: str) -> None:
    path = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        cfglib.load(SkillConfig, path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert fragment in message


def test_binary_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"cannot read config file") as info:
        cfglib.load(SkillConfig, path)
    assert str(path) in str(info.value)


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    assert cfglib.load(SkillConfig, _write(tmp_path / "e.yaml", "")) == SkillConfig()


def test_save_yaml_round_trip(tmp_path: Path) -> None:
    cfg = cfglib.load(SkillConfig, overrides=["window=45", "optim.lr=2e-3",
                                              "model.channels=[8,16,32]", "cv=louo",
                                              "folds=[userB, userC]", "precision=bf16"])
    path = tmp_path / "out" / "config.yaml"
    cfglib.save_yaml(cfg, path)
    assert cfglib.load(SkillConfig, path) == cfg
    data = yaml.safe_load(path.read_text())
    assert data["optim"]["lr"] == 2e-3 and data["model"]["channels"] == [8, 16, 32]
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]  # no temp files


def test_save_yaml_round_trip_toy(tmp_path: Path) -> None:
    cfg = Toy(name="x", count=4, ratio=0.25, flag=True, mode="b", sizes=[7], maybe=3,
              inner=Inner(lr=0.5, steps=9))
    cfglib.save_yaml(cfg, tmp_path / "toy.yaml")
    assert cfglib.load(Toy, tmp_path / "toy.yaml") == cfg


def test_flatten_and_field_type() -> None:
    flat = cfglib.flatten(cfglib.to_dict(SkillConfig()))
    assert flat["optim.lr"] == 1e-3 and flat["model.channels"] == [64, 128, 256]
    assert cfglib.field_type(SkillConfig, "optim.lr") is float
    assert cfglib.field_type(Toy, "maybe") == (int | None)


# --------------------------------------------------------------------------- validate()


@pytest.mark.parametrize(("override", "message"), [
    ("window=0", "config key 'window': expected an integer >= 1, got 0"),
    ("optim.lr=-1", "config key 'optim.lr': expected a positive number, got -1.0"),
    ("model.dropout_fc=1.5", "config key 'model.dropout_fc': expected a probability in [0, 1),"
                             " got 1.5"),
    ("task=Unknown", "config key 'task': expected one of Suturing, Needle_Passing, Knot_Tying,"
                     " got 'Unknown'"),
    ("model.channels=[8,16]", "config key 'model.channels': expected three positive widths, "
                              "got [8, 16]"),
    ("grs_thresholds=[24, 16]", "config key 'grs_thresholds': expected two increasing numbers,"
                                " got [24.0, 16.0]"),
])
def test_validate_hooks_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfglib.apply_overrides(SkillConfig(), [override])
    assert str(info.value) == message


def test_validate_hook_of_test_dataclass() -> None:
    with pytest.raises(ConfigError) as info:
        cfglib.from_dict(Toy, {"inner": {"lr": 0}})
    assert str(info.value) == "config key 'inner.lr': expected a positive number, got 0.0"
    assert cfglib.from_dict(Toy, {"inner": {"steps": 5}}).inner == Inner(lr=0.1, steps=5)
