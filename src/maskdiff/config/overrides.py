"""``section.key=value`` overrides and rebuilding a config from JSON.

Values are parsed to the field's type; unknown keys are rejected with the list of valid ones.
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields
from typing import Any

from maskdiff.config.schema import RunConfig, _section_classes, check_types


def valid_keys() -> list[str]:
    """Every overridable key, e.g. ``train.steps``."""
    keys = ["name"]
    for sec, cls in _section_classes().items():
        keys += [f"{sec}.{f.name}" for f in fields(cls)]
    return keys


def _parse_value(raw: str, annotation: Any, key: str) -> Any:
    hints = annotation
    origin = typing.get_origin(hints)
    args = typing.get_args(hints)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        if raw.lower() in ("none", "null", ""):
            return None
        hints = next(a for a in args if a is not type(None))
    try:
        if hints is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hints is int:
            try:
                return int(raw)
            except ValueError:
                number = float(raw)  # accepts 1e5 and 100_000
                if not number.is_integer():
                    raise
                return int(number)
        if hints is float:
            return float(raw)
        return raw
    except ValueError:
        raise ValueError(f"{key}={raw!r}: expected a value of type {getattr(hints, '__name__', hints)}") from None


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``section.key=value`` strings to a copy of ``config``."""
    config = config_from_dict(config.to_dict())
    classes = _section_classes()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key == "name":
            config.name = raw
            continue
        sec, _, fname = key.partition(".")
        cls = classes.get(sec)
        field_map = {f.name: f for f in fields(cls)} if cls else {}
        if fname not in field_map:
            raise ValueError(f"unknown config key {key!r}; valid keys are: {', '.join(valid_keys())}")
        hints = typing.get_type_hints(cls)
        setattr(getattr(config, sec), fname, _parse_value(raw.strip(), hints[fname], key))
    return config.validate()


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from :meth:`RunConfig.to_dict` output, rejecting unknown keys."""
    classes = _section_classes()
    if not isinstance(data, dict) or not all(isinstance(data.get(sec, {}), dict) for sec in classes):
        raise ValueError(f"a run config is a JSON object with the sections {', '.join(classes)}; "
                         f"got {type(data).__name__}")
    unknown = set(data) - set(classes) - {"name"}
    if unknown:
        raise ValueError(f"unknown config sections {sorted(unknown)}; valid: name, {', '.join(classes)}")
    kwargs: dict[str, Any] = {"name": data.get("name", "run")}
    for sec, cls in classes.items():
        values = dict(data.get(sec, {}))
        names = {f.name for f in fields(cls)}
        bad = set(values) - names
        if bad:
            raise ValueError(f"unknown keys in config section {sec!r}: {sorted(bad)}; valid: {sorted(names)}")
        kwargs[sec] = cls(**values)
    config = RunConfig(**kwargs)
    check_types(config)
    return config
