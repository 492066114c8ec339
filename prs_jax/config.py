"""Typed configs: frozen dataclasses filled from YAML files and dotted command-line overrides.

    cfg = load_config(TrainConfig, "experiments/configs/dpo.yaml", ["optim.lr=1e-5", "model.dtype=bfloat16"])

Unknown keys and values of the wrong type are errors that name the key (and the file). Nested dataclasses,
Optional, Literal, list/tuple of a type, dict and Path fields are supported.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar, Union

import yaml

from prs_jax.errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
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
        raise ConfigError(f"{key}: {value!r} does not match {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {type(value).__name__} {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            items = [_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else list(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key(s) {', '.join(where + u for u in unknown)} for {cls.__name__}; "
            f"valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{prefix}.{name}" if prefix else name)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"missing required key(s) {', '.join(where + m for m in missing)} for {cls.__name__}")
    return cls(**kwargs)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass `cls` from a nested dict, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
    return _build(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (Paths as strings, tuples as lists), suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict, returning a new dict."""
    out = yaml.safe_load(yaml.safe_dump(data)) if data else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.lr=1e-5)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, section by section (nested mappings merge, other values replace)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                defaults: dict[str, Any] | None = None) -> T:
    """Load `cls` from `defaults` (e.g. a preset's `to_dict`), then a YAML file (optional), then dotted overrides;
    errors name the file and key."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            col = f" at column {mark.column + 1}" if mark is not None else ""
            what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
            raise ConfigError(f"{path}{line}: invalid YAML ({' '.join(what.split())}{col}); fix the file.") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    data = apply_overrides(_merge(defaults or {}, data), overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def import_object(path: str, key: str = "reward.callable") -> Any:
    """The object named by 'package.module:name' (errors name the config key)."""
    module, _, name = str(path).partition(":")
    if not module or not name:
        raise ConfigError(f"{key}: expected 'package.module:name', got {path!r}.")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{key}: cannot import module {module!r} ({e}); is it installed / on PYTHONPATH?") from e
    except Exception as e:  # the module itself failed while importing
        raise ConfigError(f"{key}: importing module {module!r} failed: {type(e).__name__}: {e}") from e
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: module {module!r} has no attribute {name!r}.")
        obj = getattr(obj, part)
    return obj


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    """Raise ConfigError `key: must be RULE, got VALUE` unless `ok` (for `__post_init__` checks)."""
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}.")


def check_ranges(cfg: Any, section: str, rules: dict[str, str]) -> None:
    """Check fields of `cfg` against rules '>= 1', '> 0', 'in [0, 1]', 'in (0, 1]', ... (None passes);
    errors name the key as `section.field`."""
    for name, rule in rules.items():
        v = getattr(cfg, name)
        if v is None:
            continue
        key = f"{section}.{name}" if section else name
        if rule.startswith(">="):
            ok = v >= float(rule[2:])
        elif rule.startswith(">"):
            ok = v > float(rule[1:])
        elif rule.startswith("in "):
            lo, hi = (float(x) for x in rule[4:-1].split(","))
            ok = (v >= lo if rule[3] == "[" else v > lo) and (v <= hi if rule[-1] == "]" else v < hi)
        else:
            raise ValueError(f"check_ranges: unknown rule {rule!r}")
        require(bool(ok), key, rule, v)
