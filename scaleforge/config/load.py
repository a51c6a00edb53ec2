"""A RunSpec to and from plain dicts and YAML, and `--set key.path=value` overrides: unknown keys
and wrong types are refused by name."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from scaleforge.arch.registry import config_class, known_archs
from scaleforge.config.spec import RunSpec
from scaleforge.errors import ConfigError

RENAMED_KEYS = {"parallel.distributed_optimizer": "parallel.shard (none | optimizer | grads | full)"}
"""Keys that were replaced, with what replaced them (named in the refusal of the old key)."""


def to_dict(spec: Any) -> dict:
    """Plain nested dict of a dataclass (tuples become lists), in field order."""
    out = {}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown fields and wrong types by name."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the spec'} must be a mapping, got {type(data).__name__}")
    if cls is RunSpec and "model" in data:
        data = dict(data)
        data["model"] = model_from_dict(data["model"])
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    for name in unknown:
        key = f"{where}.{name}" if where else name
        if key in RENAMED_KEYS:
            raise ConfigError(f"{key} was replaced by {RENAMED_KEYS[key]}; use that key instead")
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config field '{key}'; known fields: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, key)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where or 'spec'}: {exc}") from None


def model_from_dict(data: Any) -> Any:
    """Build the family config named by `data['arch']` (default `dense`)."""
    if dataclasses.is_dataclass(data):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"model must be a mapping, got {type(data).__name__}")
    arch = data.get("arch", "dense")
    return from_dict(config_class(arch), data, "model")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        (inner, *_rest) = typing.get_args(tp)
        return tuple(_coerce(inner, v, f"{key}[]") for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string, not a float.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def spec_to_yaml(spec: RunSpec) -> str:
    """Canonical YAML of a RunSpec (field order, no aliases)."""
    return yaml.safe_dump(to_dict(spec), sort_keys=False, default_flow_style=False)


def load_yaml_file(path: str | Path) -> Any:
    """Read a YAML file safely; a missing file or invalid YAML is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        # libyaml's safe loader where built in: the same documents, 10x faster (a 200-run plan.yaml
        # takes 5 s to parse in pure Python)
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        return yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a YAML text file (byte {exc.start} is not UTF-8); pass the YAML file"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None


def load_runspec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunSpec:
    """Load a RunSpec YAML file and apply `key.path=value` overrides.

    An empty file (or one holding only comments or `{}`) is refused rather than read as all defaults:
    it is almost always the wrong file, and a run of defaults would silently train something else.
    """
    data = load_yaml_file(path)
    if data is None or data == {}:
        raise ConfigError(
            f"{path}: the RunSpec is empty; write at least name, model and train "
            "(see examples/dense-tiny.yaml)"
        )
    try:
        spec = from_dict(RunSpec, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return apply_overrides(spec, overrides)


def apply_overrides(spec: RunSpec, overrides: list[str] | tuple[str, ...]) -> RunSpec:
    """Return a new RunSpec with each `key.path=value` applied (YAML scalars; the last one wins)."""
    if not overrides:
        return spec
    data = to_dict(spec)
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    # The family decides which model keys exist, so apply `model.arch` first.
    for key, value in parsed:
        if key == "model.arch":
            if value not in known_archs():
                raise ConfigError(
                    f"--set model.arch={value}: unknown architecture; known: {', '.join(known_archs())}"
                )
            data["model"] = {**to_dict(config_class(value)()), "arch": value}
    for key, value in parsed:
        _set_path(data, key, value)
    return from_dict(RunSpec, data)


def _set_path(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    if key in RENAMED_KEYS:
        raise ConfigError(f"--set {key}: replaced by {RENAMED_KEYS[key]}; use that key instead")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"--set {key}: no such field '{'.'.join(parts[: i + 1])}'")
        if i == len(parts) - 1:
            if isinstance(node[part], dict):
                raise ConfigError(f"--set {key}: is a section, set one of its fields")
            node[part] = value
        else:
            node = node[part]
