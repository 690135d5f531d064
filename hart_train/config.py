"""Typed run configuration: dataclasses are the schema, YAML files under `configs/` are the runs.

A run is resolved in three layers, each checked against the schema before anything is allocated:

    dataclass defaults  <-  the YAML file  <-  `--set a.b=v` overrides (in order)

Rules (STYLE.md): an override may only name a field that exists; an unknown key or a value of the
wrong type is one `ConfigError` (a ValueError) naming the dotted key. Values are converted only where
the conversion is lossless and unsurprising (int -> float, list -> tuple, a YAML string such as
"1e-4" -> float, which PyYAML leaves as a string). Each schema dataclass may validate ranges in its
own `__post_init__` by raising ValueError; the loader re-raises that with the key of the section.

The resolved config is written back as YAML with the run, and that file alone reproduces the run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A user error in a config file or an override; the message names the key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert it; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:  # Optional[X]: X's own error says what is wrong (a section's range check, say)
            raise ConfigError(errors[0])
        raise ConfigError(f"{key}: {value!r} is not a valid {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return build(tp, value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            items = [_convert(v, a, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            elem = args[0] if args else Any
            items = [_convert(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported annotation {tp!r} at {key}")


def build(cls: type, data: dict, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a (partial) mapping; missing fields keep their defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _field_type(cls: type, path: list[str], key: str) -> Any:
    tp: Any = cls
    for i, part in enumerate(path):
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{key}: {'.'.join(path[:i])} is not a section")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            known = ", ".join(sorted(f.name for f in dataclasses.fields(tp)))
            raise ConfigError(f"{key}: unknown key (known at this level: {known})")
        tp = hints[part]
        origin = typing.get_origin(tp)
        if origin in (Union, types.UnionType):  # Optional[Section]
            non_none = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(non_none) == 1 and dataclasses.is_dataclass(non_none[0]):
                tp = non_none[0]
    return tp


def parse_override(cls: type, item: str) -> tuple[list[str], Any]:
    """`a.b=v` -> (["a", "b"], parsed v). The key must name an existing field of `cls`."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    key = key.strip()
    path = [p for p in key.split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r}: empty key")
    _field_type(cls, path, key)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r} ({e})") from None
    return path, value


def _set_path(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def resolve(cls: type, data: dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Schema defaults <- `data` <- overrides, validated as a whole."""
    merged: dict = _deep_copy(data or {})
    for item in overrides:
        path, value = parse_override(cls, item)
        _set_path(merged, path, value)
    return build(cls, merged)


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def load_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load(cls: type, path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    return resolve(cls, load_yaml(path) if path else {}, overrides)


def dump(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None)
