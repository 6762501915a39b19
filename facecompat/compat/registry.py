"""The compatibility methods by name: ``compat.method: <name>`` in a config.

A method registers itself with :func:`register_method` when its module is imported; importing
:mod:`facecompat.compat` imports the built-in ones (BCT, L2, MixBCT, LCE, AdvBCT), and a method of
one's own registers the same way from any module imported before the config is resolved.
"""

from __future__ import annotations

from facecompat.compat.base import NEEDS, CompatMethod
from facecompat.config import ConfigError

_METHODS: dict[str, type[CompatMethod]] = {}


def register_method(cls: type[CompatMethod]) -> type[CompatMethod]:
    """Class decorator: make ``cls`` available as ``compat.method: <cls.name>``."""
    if not cls.name or cls.name in _METHODS or cls.name == "none":
        raise ValueError(f"compatibility method name {cls.name!r} is empty, reserved or taken")
    unknown = cls.needs - NEEDS
    if unknown:
        raise ValueError(f"method {cls.name!r} needs unknown artefacts {sorted(unknown)} "
                         f"(valid: {sorted(NEEDS)})")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Registered method names (``none`` is plain training)."""
    return sorted(_METHODS)


def get_method(name: str) -> type[CompatMethod]:
    """The class registered as ``name``; ConfigError listing the valid names otherwise."""
    if name not in _METHODS:
        valid = ", ".join(sorted(_METHODS))
        raise ConfigError(f"compat.method: unknown method {name!r} (valid: none, {valid})")
    return _METHODS[name]
