"""Presets and dotted overrides -> a typed `Config`, and a `Config` -> YAML.

Presets are YAML files shipped in `gpa_ray/configs/` (or any path); `load_config` merges
one with dotted `a.b=c` overrides and converts each value to the field's annotated type,
so a typo fails loudly (naming the closest valid key) instead of silently running with a
default. Ray workers that take a plain dict receive `config_to_dict(cfg)` (storage
credentials removed, see `gpa_ray.credentials`) and rebuild it with `config_from_dict`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from gpa_ray.config import Config
from gpa_ray.credentials import redacted


class ConfigError(ValueError):
    """A preset or override does not fit the configuration schema."""


def preset_names() -> list[str]:
    """Names of the presets shipped with the package (without `.yaml`)."""
    folder = resources.files("gpa_ray") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_preset(path: str) -> dict[str, Any]:
    """Read a preset by file path, or by bare name from the shipped presets."""
    candidate = Path(path)
    if candidate.exists():
        text = candidate.read_text()
    else:
        shipped = resources.files("gpa_ray") / "configs" / f"{candidate.stem}.yaml"
        if not shipped.is_file():
            raise ConfigError(
                f"config file {path!r} not found; shipped presets are {preset_names()}"
            )
        text = shipped.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping, got {type(data).__name__}")
    return data


def _all_keys(cls: type) -> list[str]:
    """Every dotted leaf key of a config dataclass, for error suggestions."""
    keys = []
    for f in dataclasses.fields(cls):
        sub = _dataclass_type(_hints(cls)[f.name])
        if sub is not None:
            keys.extend(f"{f.name}.{k}" for k in _all_keys(sub))
        else:
            keys.append(f.name)
    return keys


def config_keys() -> list[str]:
    """Every dotted key a preset or override may set (`section.field`)."""
    return _all_keys(Config)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_type(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _unknown_key_error(key: str) -> ConfigError:
    valid = config_keys()
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value or override string to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        is_null = value is None or (
            isinstance(value, str) and value.strip().lower() in ("none", "null", "")
        )
        if is_null and type(None) in args:
            return None
        return _convert(value, non_none[0], key)
    if origin is list:
        (item_type,) = args
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip() else []
            items = (
                parsed
                if isinstance(parsed, list)
                else [v.strip() for v in value.split(",") if v.strip()]
            )
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        return [_convert(v, item_type, key) for v in items]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, bool) or not float(number).is_integer():
                raise ValueError(value)
            return int(number)
        if tp is float:
            return float(value)
        if tp is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"config key {key!r} expects {getattr(tp, '__name__', tp)}, got {value!r}"
        ) from exc
    raise ConfigError(f"config key {key!r} has an unsupported type {tp!r}")


def _build(cls: type, data: dict[str, Any], prefix: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from a nested mapping, converting and checking every key.

    Keys the mapping leaves out keep their values in `base` (default: `cls()`), so a
    partly given section keeps its own field's defaults (e.g. `ingest.encode_pool`'s two
    actors when a preset sets only `cpus_per_actor`)."""
    base = cls() if base is None else base
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise _unknown_key_error(dotted)
        sub = _dataclass_type(hints[key])
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"config section {dotted!r} must be a mapping, got {value!r}")
            kwargs[key] = _build(sub, value, f"{dotted}.", getattr(base, key))
        else:
            kwargs[key] = _convert(value, hints[key], dotted)
    return dataclasses.replace(base, **kwargs)


def _set_dotted(data: dict[str, Any], key: str, value: str) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise _unknown_key_error(key)
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, str]:
    """Split `a.b=c` (a leading `--set` is the caller's business) into key and raw value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key, value


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a `Config` from `config_to_dict(cfg)` (how Ray workers receive it)."""
    return _build(Config, data)


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset (path or shipped name; defaults if None) and apply dotted overrides."""
    data: dict[str, Any] = _read_preset(path) if path else {}
    leaf_keys = set(config_keys())
    sections = {key.rsplit(".", 1)[0] for key in leaf_keys if "." in key}
    for text in overrides:
        key, value = parse_override(text)
        if key not in leaf_keys and key not in sections:
            raise _unknown_key_error(key)
        _set_dotted(data, key, value)
    return _build(Config, data)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The configuration as plain data without storage credentials: what is written,
    logged or handed to a Ray task or actor."""
    return dataclasses.asdict(redacted(cfg))


def config_to_yaml(cfg: Config) -> str:
    """The resolved configuration as YAML text, without storage credentials."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
