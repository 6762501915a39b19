"""Plain YAML trees to the typed sections and back, strictly: unknown keys and wrong types are errors
naming the key, the file it came from and, for a typo, the nearest valid key."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from facecompat.config.schema import ConfigError, T, _FieldError

# ----------------------------------------------------------------------------- conversion


@dataclass(frozen=True)
class _Where:
    """Where values came from: dotted key -> file or ``--set`` item; ``default`` for the rest."""

    default: str
    origins: Mapping[str, str]

    def of(self, key: str) -> str:
        while key:
            if key in self.origins:
                return self.origins[key]
            key = key[: max(key.rfind("."), key.rfind("["), 0)]
        return self.default

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.of(key)}: {key or '<top level>'}: {message}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _did_you_mean(name: str, choices: Sequence[str], prefix: str = "", list_all: bool = True) -> str:
    """`` (did you mean 'x'?)`` for the nearest choice (case-insensitive), else the valid choices."""
    lowered = {c.lower(): c for c in choices}
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    if match:
        return f" (did you mean '{_join(prefix, lowered[match[0]])}'?)"
    return f" (valid: {', '.join(sorted(choices))})" if list_all else ""


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"list of {len(args)} ({', '.join(map(_type_name, args))})"
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _convert(tp: Any, value: Any, key: str, where: _Where) -> Any:
    """Check ``value`` against type ``tp`` and convert it (recursively); raise ConfigError naming ``key``."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, key, where)
    if origin in (Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        if value is None and len(arms) < len(args):
            return None
        if len(arms) == 1:  # Optional[X]: X's own message is the most precise
            return _convert(arms[0], value, key, where)
        for arm in arms:
            with contextlib.suppress(ConfigError):
                return _convert(arm, value, key, where)
    elif origin is Literal:
        # type() too: True == 1 must not pass as Literal[1]
        if any(value == a and type(value) is type(a) for a in args):
            return value
        strings = [a for a in args if isinstance(a, str)]
        hint = _did_you_mean(value, strings, list_all=False) if isinstance(value, str) and strings else ""
        raise where.error(key, f"expected {_type_name(tp)}, got {_describe(value)}{hint}")
    elif tp in (list, tuple) or origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise where.error(key, f"expected {_type_name(tp)}, got {len(value)} items")
                return tuple(
                    _convert(a, v, f"{key}[{i}]", where) for i, (a, v) in enumerate(zip(args, value))
                )
            item = args[0] if args else Any
            items = [_convert(item, v, f"{key}[{i}]", where) for i, v in enumerate(value)]
            return tuple(items) if tuple in (tp, origin) else items
    elif tp is dict or origin is dict:
        if isinstance(value, Mapping):
            key_tp, value_tp = args or (Any, Any)
            return {
                _convert(key_tp, k, key, where): _convert(value_tp, v, _join(key, str(k)), where)
                for k, v in value.items()
            }
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
    else:
        raise TypeError(f"config field {key!r} has an unsupported type {tp!r}")
    raise where.error(key, f"expected {_type_name(tp)}, got {_describe(value)}")


def _convert_dataclass(cls: type[T], data: Any, prefix: str, where: _Where) -> T:
    if not isinstance(data, Mapping):
        raise where.error(prefix, f"expected a mapping (section), got {_describe(data)}")
    types_ = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = _join(prefix, str(name))
        if name not in types_:
            raise ConfigError(
                f"{where.of(key)}: unknown key '{key}'{_did_you_mean(str(name), list(types_), prefix)}"
            )
        kwargs[name] = _convert(types_[name], value, key, where)
    for f in dataclasses.fields(cls):
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.init and no_default and f.name not in kwargs:
            raise where.error(_join(prefix, f.name), "required key is missing")
    try:
        return cls(**kwargs)
    except _FieldError as exc:
        raise where.error(_join(prefix, exc.key), exc.reason) from None


def from_dict(
    cls: type[T],
    data: Mapping[str, Any],
    source: str = "<dict>",
    prefix: str = "",
    origins: Mapping[str, str] | None = None,
) -> T:
    """Build dataclass ``cls`` from a nested mapping, checking every key and type on the way.

    Field types may be dataclasses, ``X | None``, ``list[X]``, ``tuple[...]``, ``dict[str, X]``,
    ``Literal[...]``, bool, int, float (ints accepted), str or Path. ``source`` is named in error
    messages, ``prefix`` is the dotted path of ``data`` in the whole config, ``origins`` maps dotted
    keys that came from elsewhere (bases, ``--set``) to their source. Raises ConfigError on an
    unknown key, a wrong type, or a value its section rejects.
    """
    return _convert_dataclass(cls, data, prefix, _Where(source, origins or {}))
