"""Dataclass configs from YAML and dotted overrides, refusing unknown keys and wrong types by full name.

Each config dataclass checks its own values (``validate`` or ``__post_init__``) and raises a
``ValueError`` that starts with the field's name; ``from_dict`` prefixes nested sections, so a bad
value deep in a training config reads ``rollout.controller.max_draft_tokens: ...``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """YAML with only true/false as booleans (YAML 1.1 also reads on/off/yes/no as booleans, which would
    turn ``speculative: off`` into False)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: safe


def require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{name}: {message}")


def from_dict(data: dict[str, Any], cls: type, prefix: str = "") -> Any:
    """Build ``cls`` from nested dicts, rejecting unknown keys and values of the wrong type."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})")
    values = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except ValueError as err:  # a dataclass checking itself names its own field: add the section
        raise ValueError(f"{prefix}{err}" if prefix and not str(err).startswith(prefix) else str(err)) from None


def _coerce(value: Any, hint: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(value or {}, hint, f"{name}.")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, hint, name)
    if origin in (list, tuple):
        item = typing.get_args(hint)[0]
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        return origin(_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {str(k): _coerce(v, item, f"{name}.{k}") for k, v in value.items()}
    if hint is float:
        return _finite_float(value, name)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ValueError(f"{name}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _coerce_union(value: Any, hint: Any, name: str) -> Any:
    options = typing.get_args(hint)
    if value is None and type(None) in options:
        return None
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _coerce(value, option, name)
        except ValueError as err:
            errors.append(str(err))
    raise ValueError(errors[0])


def _finite_float(value: Any, name: str) -> float:
    """A number, or a string YAML 1.1 leaves unparsed ("1e-3" has no dot); never inf or NaN, which no
    setting means and which would only surface later as NaN weights."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    return number


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``key.sub=value`` pairs onto nested dicts (values parsed as YAML scalars: 0.6, true, null, a,b)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override: expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{key}: {part} is not a section")
        node[parts[-1]] = parse_yaml(raw) if raw else ""
    return data


def read_yaml_file(path: str | Path) -> dict:
    """A YAML mapping from ``path`` (empty file: ``{}``), with the file named in every error."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config: {path} does not exist")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config: {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold a mapping of sections, got {type(data).__name__}")
    return data
