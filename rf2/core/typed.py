"""Convert plain dicts (from Hydra/OmegaConf or YAML) into typed, validated dataclasses.

Why not OmegaConf structured configs: their errors are multi-line and name internal
paths; rf2 promises one line naming the field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import TYPE_CHECKING, Any, TypeVar, Union, get_args, get_origin

from rf2.core.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, error: type[ConfigError]) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path, error)
            except ConfigError:
                continue
        raise error(path, value, _type_name(tp))
    if origin is typing.Literal:
        if value in get_args(tp) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and str(value) in get_args(tp):
            return str(value)  # YAML reads an unquoted `nan` / `inf` as a float
        raise error(path, value, _type_name(tp))
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or isinstance(
            value, dict
        ):
            raise error(path, value, _type_name(tp))
        (item_tp, *_rest) = get_args(tp) or (Any,)
        items = [_convert(v, item_tp, f"{path}[{i}]", error) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise error(path, value, "a mapping")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {
            _convert(k, k_tp, path, error): _convert(v, v_tp, f"{path}.{k}", error)
            for k, v in value.items()
        }
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a hint is a class, never an instance
        return from_dict(tp, value, path, error)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise error(path, value, "true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(path, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(path, value, "a number")
        try:
            number = float(value)
        except OverflowError:
            raise error(path, value, "a finite number") from None
        if not math.isfinite(number):
            # No field means anything by inf or nan; they only poison training silently.
            raise error(path, value, "a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise error(path, value, "a string")
        return value
    raise TypeError(f"unsupported field type {tp!r} at {path}")


def from_dict(cls: type[T], data: Any, path: str = "", error: type[ConfigError] = ConfigError) -> T:
    """Build dataclass ``cls`` from mapping ``data``, rejecting unknown keys by name.

    Fields missing from ``data`` take the dataclass default. After construction the
    instance's ``validate()`` (if any) checks ranges and cross-field rules.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(path or cls.__name__, data, f"a mapping with keys {_field_names(cls)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            raise error(where, data[key], f"known keys of {path or 'the config'}: {_field_names(cls)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            where = f"{path}.{name}" if path else name
            kwargs[name] = _convert(data[name], hints[name], where, error)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            where = f"{path}.{name}" if path else name
            raise error(where, None, f"a value of type {_type_name(hints[name])} (required)")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(path)
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict (lists for tuples), for writing configs and checkpoints."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _field_names(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls) if f.init)


def check(cond: bool, field: str, value: Any, allowed: str) -> None:
    """Raise ConfigError(field, value, allowed) unless ``cond``."""
    if not cond:
        raise ConfigError(field, value, allowed)
