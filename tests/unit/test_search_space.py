"""Tests of raylab.runtime.search_space: text specs -> typed dimensions -> Tune domains."""

from __future__ import annotations

import pytest

from raylab.errors import ConfigError
from raylab.methods.skill import SkillConfig, SkillMethod
from raylab.runtime.search_space import Dimension, parse_dimension, parse_space


def _one(spec: str) -> Dimension:
    (dim,) = parse_space(SkillConfig, [spec])
    return dim


def test_list_of_ints_is_a_choice_of_ints() -> None:
    dim = _one("window=[30,60,90]")
    assert dim == Dimension("window", "choice", (30, 60, 90))
    assert all(type(v) is int for v in dim.values)
    domain = dim.to_tune()
    assert type(domain).__name__ == "Categorical"
    assert domain.categories == [30, 60, 90]


@pytest.mark.parametrize("spec", ["optim.lr=log(1e-4,1e-2)", "optim.lr=log(0.0001, 0.01)",
                                  "optim.lr= log( 1e-4 , 1e-2 ) "])
def test_log_range_on_float_key_is_loguniform(spec: str) -> None:
    dim = _one(spec)
    assert dim.kind == "loguniform"
    assert dim.values == pytest.approx((1e-4, 1e-2))
    domain = dim.to_tune()
    assert type(domain).__name__ == "Float"
    assert type(domain.sampler).__name__ == "_LogUniform"
    assert (domain.lower, domain.upper) == pytest.approx((1e-4, 1e-2))


def test_range_on_float_key_is_uniform() -> None:
    dim = _one("model.dropout_fc=(0.2,0.6)")
    assert dim == Dimension("model.dropout_fc", "uniform", (0.2, 0.6))
    domain = dim.to_tune()
    assert type(domain).__name__ == "Float"
    assert type(domain.sampler).__name__ == "_Uniform"
    assert (domain.lower, domain.upper) == (0.2, 0.6)


def test_int_range_on_float_key_gives_floats() -> None:
    dim = _one("optim.weight_decay=(0, 1)")
    assert dim == Dimension("optim.weight_decay", "uniform", (0.0, 1.0))
    assert all(type(v) is float for v in dim.values)


def test_range_on_int_key_is_inclusive_int() -> None:
    dim = _one("window=(1,4)")
    assert dim == Dimension("window", "int", (1, 4))
    domain = dim.to_tune()
    assert type(domain).__name__ == "Integer"
    # tune.randint's upper bound is exclusive: 1..4 inclusive is randint(1, 5).
    assert (domain.lower, domain.upper) == (1, 5)


def test_log_range_on_int_key_is_logint() -> None:
    dim = _one("optim.batch_size=log(16,256)")
    assert dim == Dimension("optim.batch_size", "logint", (16, 256))
    domain = dim.to_tune()
    assert type(domain.sampler).__name__ == "_LogUniform"
    assert (domain.lower, domain.upper) == (16, 257)


def test_choice_of_literal_strings() -> None:
    dim = _one("optim.schedule=[cosine, constant]")
    assert dim == Dimension("optim.schedule", "choice", ("cosine", "constant"))


def test_list_key_choice_of_lists_and_fixed_list() -> None:
    choice = _one("model.channels=[[8,16,32],[16,32,64]]")
    assert choice == Dimension("model.channels", "choice", ([8, 16, 32], [16, 32, 64]))
    fixed = _one("model.channels=[8,16,32]")
    assert fixed == Dimension("model.channels", "fixed", ([8, 16, 32],))
    assert fixed.to_tune() == [8, 16, 32]


def test_scalar_is_fixed_value() -> None:
    dim = _one("window=45")
    assert dim == Dimension("window", "fixed", (45,))
    assert dim.to_tune() == 45


def test_dict_form_and_default_space_parse() -> None:
    dims = parse_space(SkillConfig, dict(SkillMethod.default_space))
    by_key = {d.key: d for d in dims}
    assert by_key["window"] == Dimension("window", "choice", (30, 60, 90))
    assert by_key["optim.lr"].kind == "loguniform"
    assert by_key["optim.lr"].values == pytest.approx((3e-4, 3e-3))
    assert by_key["model.dropout_fc"] == Dimension("model.dropout_fc", "uniform", (0.3, 0.6))


@pytest.mark.parametrize(("spec", "message"), [
    ("nope=[1,2]", "unknown config key 'nope'"),
    ("optim.nope=(1,2)", "unknown config key 'optim.nope'"),
    ("window=(60,30)", "--space window=(60,30): expected low < high"),
    ("window=(30,30)", "--space window=(30,30): expected low < high"),
    ("optim.lr=log(0,1e-2)", "--space optim.lr=log(0,1e-2): log ranges need low > 0"),
    ("optim.weight_decay=log(-1,1)", "log ranges need low > 0"),
    ("task=(1,2)", "--space task: ranges need a numeric key, 'task' is not"),
    ("model.channels=(1,2)", "--space model.channels: ranges need a numeric key"),
    ("window=[]", "--space window: an empty list has nothing to choose from"),
    ("window=[30.5]", "config key 'window': expected int, got 30.5"),
    ("window=[30, true]", "config key 'window': expected int, got True"),
    ("window=(30.5,40)", "config key 'window': expected int, got 30.5"),
    ("window=abc", "config key 'window': expected int, got 'abc'"),
    ("optim.schedule=[cosine, linear]", "config key 'optim.schedule': expected one of "
                                        "'cosine', 'constant', got 'linear'"),
    ("model.channels=[[8,16],[8,x]]", "config key 'model.channels[1]': expected int, got 'x'"),
])
def test_errors_name_the_key(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_space(SkillConfig, [spec])
    assert message in str(info.value)


def test_missing_equals_sign() -> None:
    with pytest.raises(ConfigError) as info:
        parse_space(SkillConfig, ["window"])
    assert str(info.value) == "--space 'window': expected KEY=SPEC, e.g. window=[30,60,90]"


def test_parse_dimension_direct() -> None:
    assert parse_dimension(SkillConfig, "seed", "[0, 1, 2]") == Dimension(
        "seed", "choice", (0, 1, 2))


def test_detection_searches_freeze_adapters_and_capacity() -> None:
    """Frozen-backbone reuse's knobs are searchable keys of ``raylab tune detection``."""
    from raylab.tasks.detection.config import DetectionConfig

    dims = {d.key: d for d in parse_space(DetectionConfig, [
        "freeze=[none, backbone, backbone+norms]", "adapters.dim=[16, 64]",
        "adapters.every=(0, 2)", "fpn_layers=[0, 2]", "head_convs=(2, 6)"])}
    assert dims["freeze"].values == ("none", "backbone", "backbone+norms")
    assert dims["adapters.dim"].values == (16, 64)
    assert (dims["adapters.every"].kind, dims["head_convs"].kind) == ("int", "int")
    assert dims["fpn_layers"].values == (0, 2)
