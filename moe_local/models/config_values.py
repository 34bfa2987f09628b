"""Checking config.json values: one value against the type hint of the field that holds it.

Why one place: every family's `ModelArgs` and the rotary settings read config.json keys, and a
wrong type or range must always end the same way -- a ConfigError naming the key as config.json
spells it ("config.json: n_routed_experts must be an integer, got \"64\"") -- instead of a
TypeError deep inside model building, or a silent default.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any

from moe_local.errors import ConfigError


def _accepts(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether a JSON value fits a field's type hint, and the value to store (integral floats -> int)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            ok, out = _accepts(value, arm)
            if ok:
                return True, out
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is Any:
        return True, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        if isinstance(value, float) and not isinstance(value, bool) and value.is_integer():
            return True, int(value)  # 4096.0 means 4096
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), value
    if hint is str:
        return isinstance(value, str), value
    if origin is list or hint is list:
        if not isinstance(value, list):
            return False, value
        (item,) = typing.get_args(hint) or (Any,)
        checked = [_accepts(v, item) for v in value]
        return all(ok for ok, _ in checked), [v for _, v in checked]
    if origin is dict or hint is dict:
        return isinstance(value, dict), value
    return True, value


def _type_words(hint: Any) -> str:
    """A type hint in the words an error message uses ("an integer or null")."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    arms = typing.get_args(hint) if union else (hint,)
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
             type(None): "null"}
    return " or ".join(words.get(a) or words.get(typing.get_origin(a)) or "a list" for a in arms)


def check_config_value(key: str, value: Any, hint: Any, positive: bool = False) -> Any:
    """One config.json value against its field's type and range; returns the value to store."""
    ok, value = _accepts(value, hint)
    if not ok:
        raise ConfigError(f"config.json: {key} must be {_type_words(hint)}, got {json_repr(value)}")
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config.json: {key} must be a finite number, got {value}")
    if isinstance(value, float) and positive and value <= 0:
        raise ConfigError(f"config.json: {key} must be > 0, got {value}")
    if isinstance(value, int) and value < (1 if positive else 0):
        raise ConfigError(f"config.json: {key} must be {'>= 1' if positive else '>= 0'}, got {value}")
    if isinstance(value, list):
        for v in value:
            if isinstance(v, int) and not isinstance(v, bool) and v < 0:
                raise ConfigError(f"config.json: {key} must hold values >= 0, got {v}")
    return value


def json_repr(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else '"' + value + '"'
    return text if len(text) <= 40 else text[:37] + "..."
