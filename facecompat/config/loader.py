"""YAML files (``_base_`` inheritance, ``--set`` overrides) to a resolved :class:`Config`, and back."""

from __future__ import annotations

import argparse
import copy
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from facecompat.config.convert import _describe, _join, from_dict
from facecompat.config.schema import Config, ConfigError, T
from facecompat.fileio import atomic_write

# ----------------------------------------------------------------------------- YAML files


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float (as YAML 1.2 does) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if (key_node.tag, key_node.value) in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add((key_node.tag, key_node.value))
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class _Dumper(yaml.SafeDumper):
    """SafeDumper writing sections as blocks and lists of scalars inline (``margins: [1.0, 0.5, 0.0]``)."""

    def represent_list(self, data: list[Any]) -> yaml.SequenceNode:
        flow = all(not isinstance(item, (list, dict)) for item in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _Dumper.represent_list)


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{line} invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {_describe(data)}")
    return data


def _merge(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
    """Deep-merge ``src`` into ``dst``: mappings merge key by key, anything else is replaced."""
    for key, value in src.items():
        if isinstance(value, Mapping) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        else:
            dst[key] = copy.deepcopy(value)


def _record(origins: dict[str, str], tree: Mapping[str, Any], source: str, prefix: str = "") -> None:
    for key, value in tree.items():
        dotted = _join(prefix, str(key))
        origins[dotted] = source
        if isinstance(value, Mapping):
            _record(origins, value, source, dotted)


def _load_tree(path: str, chain: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """Read ``path`` with its ``_base_`` files merged in; also return dotted key -> file it came from."""
    if os.path.realpath(path) in map(os.path.realpath, chain):
        raise ConfigError(f"{chain[-1]}: _base_ cycle: {' -> '.join((*chain, path))}")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_: expected a file name or a list of them, got {_describe(bases)}")
    tree: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for base in bases:
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
        if not os.path.isfile(base_path):
            raise ConfigError(f"{path}: _base_ file not found: {base_path}")
        base_tree, base_origins = _load_tree(base_path, (*chain, path))
        _merge(tree, base_tree)
        origins.update(base_origins)
    _merge(tree, data)
    _record(origins, data, path)
    return tree, origins


def _apply_override(tree: dict[str, Any], origins: dict[str, str], item: str) -> None:
    """Apply one ``a.b=c`` item to the merged tree; the value is parsed as YAML."""
    source = f"--set {item}"
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{source}: expected KEY=VALUE, e.g. --set optim.lr=0.01")
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{source}: malformed key {key!r}")
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        raise ConfigError(f"{source}: cannot parse value {text!r} as YAML") from None
    node = tree
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            node[part] = {}
            origins[".".join(parts[: i + 1])] = source
        node = node[part]
    _merge(node, {parts[-1]: value})
    _record(origins, {parts[-1]: value}, source, ".".join(parts[:-1]))


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Config:
    """Load a config: the YAML file, its ``_base_`` files, then ``--set`` overrides, checked and frozen.

    Args:
        path: the YAML file; None starts from the defaults.
        overrides: ``"a.b=c"`` items applied in order; values are parsed as YAML.

    Raises:
        ConfigError: naming the file (or ``--set`` item) and key at fault.
    """
    return load_yaml(Config, path, overrides)


def load_yaml(cls: type[T], path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> T:
    """Load any top-level config dataclass ``cls`` as :func:`load_config` loads :class:`Config`
    (``_base_`` files, ``--set`` items, strict keys and types, one-line errors)."""
    if isinstance(overrides, str):
        overrides = [overrides]
    if path is None:
        source, tree, origins = "<defaults>", {}, {}
    else:
        source = os.fspath(path)
        tree, origins = _load_tree(source)
    for item in overrides:
        _apply_override(tree, origins, item)
    return from_dict(cls, tree, source, origins=origins)


def dump_config(cfg: Config, path: str | os.PathLike[str]) -> Path:
    """Write ``cfg`` as YAML atomically (temp file + rename); :func:`load_config` reads back an equal Config.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False)
    text = "# Resolved config: defaults, _base_ files and --set overrides applied.\n" + body
    with atomic_write(path, "w") as f:
        f.write(text)
    return path


# ----------------------------------------------------------------------------- command line


def add_config_args(parser: argparse.ArgumentParser, *, required: bool = True) -> argparse.ArgumentParser:
    """Add the positional ``config`` and the repeatable ``--set KEY=VALUE`` to ``parser``; return it."""
    parser.add_argument(
        "config",
        nargs=None if required else "?",
        default=None,
        help="experiment YAML (configs/*.yaml); files named by its `_base_:` are merged in first",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, value parsed as YAML (e.g. --set optim.lr=1e-3 "
        "--set data.val_targets=[lfw]); repeatable, applied in order",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The Config named by arguments from :func:`add_config_args` (``config`` and ``--set``)."""
    return load_config(getattr(args, "config", None), getattr(args, "overrides", None) or ())
