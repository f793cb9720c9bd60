"""Typed dataclass configs: defaults in code, then a YAML file, then ``--set a.b=c``.

Configs are plain data. Config files and values given as text (``--set``, search spaces)
are parsed with a ``yaml.SafeLoader`` that also refuses a key given twice, and then checked
against the dataclass field's type; nothing is ever evaluated as code. Unknown keys and
values of the wrong type raise :class:`ConfigError` naming the dotted key and the expected
type.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from raylab.errors import ConfigError

C = TypeVar("C")

# YAML 1.1 (PyYAML) reads `1e-3` as a string: it wants a dot in a float. Accept such text
# where a float is expected, so that `--set optim.lr=1e-3` and `lr: 1e-3` work.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key given twice.

    Plain PyYAML keeps the last value of a repeated key, so that ``window: 30`` followed
    later by ``window: 60`` would silently drop one of them.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` keys may be overridden by design
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                    seen.add(key)
                except TypeError:  # unhashable: the base class reports it
                    continue
                if repeated:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    """Parse YAML text as plain data (never code); repeated keys are errors."""
    return yaml.load(text, Loader=_UniqueKeySafeLoader)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong in a YAML file, in one line, with the line number where known."""
    why = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"({why})" if mark is None else f"at line {mark.line + 1} ({why})"


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` checked (and minimally converted) against the annotation ``tp``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if value in get_args(tp):
            return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value, prefix=key + ".")
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            args = [a for a in get_args(tp) if a is not Ellipsis]
            item_tp = args[0] if args else Any
            items = [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    elif origin is dict:
        if isinstance(value, dict):
            key_tp, value_tp = (get_args(tp) or (Any, Any))
            return {_coerce(f"{key}.{k}", k, key_tp): _coerce(f"{key}.{k}", v, value_tp)
                    for k, v in value.items()}
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # `--set task=123` style values stay strings when a string is expected.
            return str(value)
    else:
        if isinstance(value, tp):
            return value
    raise ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls, include_extras=False)


def from_dict(cls: type[C], data: dict[str, Any], prefix: str = "") -> C:
    """Build ``cls`` from a (possibly partial) nested mapping; unknown keys are errors."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "root"
        raise ConfigError(f"config {where}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}; known keys: "
            + ", ".join(prefix + n for n in sorted(names))
        )
    base = cls()
    kwargs = {}
    for name in names:
        if name in data:
            value = data[name]
            if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
                sub = dataclasses.asdict(getattr(base, name))
                sub.update(value)
                value = sub
            kwargs[name] = _coerce(prefix + name, value, hints[name])
    obj = dataclasses.replace(base, **kwargs)
    validate(obj)
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable nested dict of the config (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def field_type(cls: type, dotted: str) -> Any:
    """The annotation of the dotted key ``dotted`` in ``cls``; ConfigError if unknown."""
    tp: Any = cls
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            section = ".".join(parts[:i])
            raise ConfigError(f"unknown config key {dotted!r}: {section!r} is not a section")
        hints = _hints(tp)
        if part not in hints:
            known = ", ".join(sorted(".".join(parts[:i] + [n]) for n in hints))
            raise ConfigError(f"unknown config key {dotted!r}; known keys here: {known}")
        tp = hints[part]
    return tp


def parse_value(text: str) -> Any:
    """Parse one override value as YAML data (numbers, lists, null, strings); never code."""
    try:
        return _load_yaml(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        why = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"cannot parse value {text!r}: {why}") from None
    except RecursionError:
        raise ConfigError(f"cannot parse value starting {text[:40]!r}: nested too "
                          "deeply") from None


def apply_overrides(cfg: C, overrides: dict[str, Any] | list[str]) -> C:
    """Return a copy of ``cfg`` with dotted overrides applied and checked.

    ``overrides`` is either ``["a.b=1", ...]`` (CLI form, values parsed as YAML) or a dict
    of dotted keys to already-parsed values (Tune trial configs).
    """
    if isinstance(overrides, list):
        parsed: dict[str, Any] = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-3")
            key, text = item.split("=", 1)
            try:
                parsed[key.strip()] = parse_value(text)
            except ConfigError as exc:
                raise ConfigError(f"--set {key.strip()}: {exc}") from None
        overrides = parsed
    data = to_dict(cfg)
    for key, value in overrides.items():
        field_type(type(cfg), key)  # unknown keys fail here, naming the key
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = _merge(node.get(parts[-1]), value)
    return from_dict(type(cfg), data)


def _merge(old: Any, new: Any) -> Any:
    """``new`` laid over ``old`` where both are mappings (a section keeps unset keys)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    out = dict(old)
    for k, v in new.items():
        out[k] = _merge(out.get(k), v)
    return out


def load(cls: type[C], path: str | os.PathLike | None = None,
         overrides: list[str] | dict[str, Any] | None = None) -> C:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``."""
    cfg = cls()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = _load_yaml(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML {_yaml_problem(exc)}") from None
        except RecursionError:
            raise ConfigError(f"{p}: not valid YAML (nested too deeply); expected a "
                              "mapping of config keys") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: cannot read config file ({exc})") from None
        try:
            cfg = from_dict(cls, data)
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg


def validate(cfg: Any) -> None:
    """Run ``cfg.validate()`` and that of each nested section, where defined."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value)
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and rename, so readers never see half."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to the local ``path`` via a temporary file in the same folder (created
    if need be) and ``os.replace``: a reader sees the old content or the new, never part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_yaml(cfg: Any, path: str | os.PathLike) -> None:
    """Save the resolved config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def require(condition: bool, key: str, expected: str, value: Any) -> None:
    """Raise ConfigError ``config key KEY: expected EXPECTED, got VALUE`` unless ``condition``."""
    if not condition:
        raise ConfigError(f"config key {key!r}: expected {expected}, got {value!r}")


# ----------------------------------------------------------------------------- shared keys


Precision = Literal["fp32", "bf16", "fp16"]


@dataclasses.dataclass
class MethodConfig:
    """The keys every method's config has; a method's config subclasses it (or
    :class:`EpochConfig`) and adds its own, with the paper's recipe as defaults."""

    #: The shard folder (``--data DST``).
    data: str = ""
    seed: int = 0
    precision: Precision = "fp32"


@dataclasses.dataclass
class EpochConfig(MethodConfig):
    """Keys of the methods the engine trains epoch by epoch from Ray Data shards.

    A subclass may declare a field again to change its default (the key stays where it
    was in the saved ``config.yaml``).
    """

    #: Checkpoint every N epochs (and always after the last).
    checkpoint_every: int = 5
    #: Rows in each worker's local shuffle buffer (0: stream order).
    shuffle_buffer: int = 1024
    #: Keep each worker's evaluation rows (and training rows that do not change between
    #: epochs) in memory after the first pass when they fit in this many MiB (0: stream
    #: every epoch); see raylab.engine.batch_cache.
    cache_mb: int = 1024
    #: Read the shards once into Ray's object store when they total at most this many MiB
    #: (0: stream from Parquet every epoch); see raylab.runtime.datasets.
    materialize_mb: int = 512
    #: Share of the training data held out as validation rows for `raylab tune` (Tune's
    #: metric); the test rows never reach Tune.
    val_fraction: float = 0.1

    def validate(self) -> None:
        require(self.checkpoint_every >= 1, "checkpoint_every", "an integer >= 1",
                self.checkpoint_every)
        for key in ("shuffle_buffer", "cache_mb", "materialize_mb"):
            value = getattr(self, key)
            require(value >= 0, key, "an integer >= 0", value)
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", "in [0, 1)", self.val_fraction)


__all__ = [
    "EpochConfig", "MethodConfig", "Precision", "apply_overrides", "atomic_write_text",
    "field_type", "flatten", "from_dict", "load", "parse_value", "require", "save_yaml",
    "to_dict", "validate",
]
