"""Typed experiment configs: YAML files -> frozen, nested dataclasses.

A config file is a YAML mapping with one section per concern (``data``, ``model``, ``head``,
``contrastive``, ``compat``, ``optim``, ``train``, ``eval``). ``_base_: base.yaml`` (or a list of
files; paths are relative to the including file) inherits: the bases are deep-merged in order,
then the including file wins, key by key. Command-line ``--set a.b=c`` items go on top, each value
parsed as YAML (``1e-3``, ``true``, ``[lfw, agedb_30]``, ``null``).

Loading is strict. An unknown key, a value of the wrong type or a value that fails a
section's ``__post_init__`` check raises :class:`ConfigError`, one line naming the file (or
``--set`` item) the key came from, the dotted key and, for a typo, the nearest valid key::

    configs/x.yaml: unknown key 'optim.lrr' (did you mean 'optim.lr'?)
    configs/x.yaml: optim.lr: expected float, got str 'abc'

Configs are frozen: values derived from them (total steps, number of classes) live in
runtime objects. Paths inside a config are relative to the working directory.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import functools
import os
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from facecompat.errors import UserError
from facecompat.fileio import atomic_write

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config file, ``--set`` item or value is invalid; the message is one line naming key and source."""


class _FieldError(ConfigError):
    """Raised by ``__post_init__`` checks; the loader re-raises it with the file and dotted key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


def _check(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise _FieldError(key, reason)


def _at_least(section: object, low: float, *names: str, strict: bool = False) -> None:
    """Check that each named field of ``section`` is >= ``low`` (> ``low`` when ``strict``)."""
    for name in names:
        value, op = getattr(section, name), ">" if strict else ">="
        _check(value > low if strict else value >= low, name, f"must be {op} {low}, got {value}")


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DataConfig:
    """Training data. ``num_classes`` / ``num_images`` are read from the data, never configured."""

    rec: str | None = None  # a .rec file, or a directory holding train.rec + train.idx
    # auto: DALI when installed and on GPU (torch for the contrastive objective: DALI makes no views)
    loader: Literal["auto", "dali", "torch"] = "auto"
    # Where DALI decodes: gpu (nvJPEG on the training GPU), cpu (DALI's CPU decoder), auto (gpu when
    # training on a GPU). Only that: batches always land on the training device.
    dali_device: Literal["auto", "gpu", "cpu"] = "auto"
    dali_reader: Literal["external", "mxnet"] = "external"  # who reads for DALI: Python, or fn.readers.mxnet
    num_workers: int = 2  # per rank (DataLoader workers / DALI threads)
    batch_size: int = 128  # per rank
    seed: int = 0  # shuffling and protocol splits; train.seed seeds the weights
    flip: bool = True  # random horizontal flip
    subset: str | None = None  # file of record ids to train on (one per line)
    protocol: Literal["none", "opclass", "opdata", "exclass", "exdata"] = "none"
    part: Literal["old", "new", "full"] = "full"  # which side of the protocol split to train on
    split_ratio: float = 0.3  # share of identities (OPclass) / images (OPdata) that the old model gets
    val_targets: tuple[str, ...] = ()  # verification .bin names, e.g. lfw, cfp_fp, agedb_30
    val_dir: str | None = None  # where the .bin files are; None: beside the .rec

    def __post_init__(self) -> None:
        _at_least(self, 0, "num_workers")
        _at_least(self, 0, "batch_size", strict=True)
        _check(0.0 < self.split_ratio < 1.0, "split_ratio", f"must be in (0, 1), got {self.split_ratio}")
        _check(
            self.protocol != "none" or self.part == "full",
            "part",
            f"must be 'full' when protocol is 'none', got {self.part!r}",
        )


@dataclass(frozen=True)
class ModelConfig:
    """Backbone: a registry name (``r18 r34 r50 r100 r200 mbf`` and width variants) and its knobs."""

    network: str = "r50"
    embedding_size: int = 512
    # auto: bf16 AMP on CUDA (fp16 where bf16 is unsupported), fp32 on CPU
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = False
    grad_checkpoint: bool = False
    init_from: str | None = None  # backbone weights to start from (a model.pt)

    def __post_init__(self) -> None:
        _check(bool(self.network), "network", "must not be empty")
        _at_least(self, 0, "embedding_size", strict=True)


@dataclass(frozen=True)
class HeadConfig:
    """Partial-FC margin head: target logit s * (cos(m1 * theta + m2) - m3)."""

    margins: tuple[float, float, float] = (1.0, 0.5, 0.0)  # ArcFace; CosFace is (1.0, 0.0, 0.4)
    scale: float = 64.0
    sample_rate: float = 1.0  # share of class centres sampled per step (positives always kept)

    def __post_init__(self) -> None:
        _check(len(self.margins) == 3, "margins", f"expected 3 values (m1, m2, m3), got {len(self.margins)}")
        _at_least(self, 0, "scale", strict=True)
        _check(0.0 < self.sample_rate <= 1.0, "sample_rate", f"must be in (0, 1], got {self.sample_rate}")


def _unit_interval(section: object, *names: str) -> None:
    """Check that each named field of ``section`` is a probability in [0, 1]."""
    for name in names:
        value = getattr(section, name)
        _check(0.0 <= value <= 1.0, name, f"must be in [0, 1], got {value}")


@dataclass(frozen=True)
class AugmentConfig:
    """Per-view augmentation of the contrastive objective (each of the two views drawn independently).

    Order per view: random resized crop (+ horizontal flip), colour jitter, grayscale.
    """

    crop_scale: tuple[float, float] = (0.5, 1.0)  # share of the image area a crop keeps (faces: >= 0.2)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)  # crop aspect ratio (width / height) range
    flip_prob: float = 0.5  # horizontal flip per view (only when data.flip is true)
    jitter_prob: float = 0.8  # chance a view gets colour jitter
    brightness: float = 0.4  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.4  # factor drawn from [1 - c, 1 + c]
    saturation: float = 0.4  # factor drawn from [1 - s, 1 + s]
    hue: float = 0.1  # hue shift drawn from [-h, h] of a full turn
    grayscale_prob: float = 0.2

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        _check(0.0 < low <= high <= 1.0, "crop_scale", f"must be [low, high] with 0 < low <= high <= 1, "
               f"got {list(self.crop_scale)}")
        low, high = self.crop_ratio
        _check(0.0 < low <= high, "crop_ratio", f"must be [low, high] with 0 < low <= high, "
               f"got {list(self.crop_ratio)}")
        _unit_interval(self, "flip_prob", "jitter_prob", "grayscale_prob")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, name, f"must be in [0, 1), got {value}")
        _check(0.0 <= self.hue <= 0.5, "hue", f"must be in [0, 0.5], got {self.hue}")


@dataclass(frozen=True)
class ContrastiveConfig:
    """The self-supervised objective (``train.objective: contrastive``): SimCLR's NT-Xent over two
    augmented views of every image, through a projection MLP kept in checkpoints, not in ``model.pt``."""

    temperature: float = 0.1
    projection: tuple[int, ...] = (512, 128)  # MLP widths after the embedding; the last is the output
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        _at_least(self, 0, "temperature", strict=True)
        _check(len(self.projection) > 0 and all(w > 0 for w in self.projection), "projection",
               f"must be a non-empty list of widths > 0, got {list(self.projection)}")


@dataclass(frozen=True)
class OldModelConfig:
    """The frozen old model a compatibility method is trained against."""

    checkpoint: str | None = None  # its run directory, or its exported backbone (model.pt)
    network: str | None = None  # None: the run directory's model.network (required for a .pt file)
    embedding_size: int | None = None  # None: the run directory's (512 for a .pt file)

    def __post_init__(self) -> None:
        if self.embedding_size is not None:
            _at_least(self, 0, "embedding_size", strict=True)


@dataclass(frozen=True)
class CompatConfig:
    """Compatibility method: a registry name (``none``, ``bct``, ``l2``, ``mixbct``, ...) and its knobs."""

    method: str = "none"
    old: OldModelConfig = field(default_factory=OldModelConfig)
    weight: float = 1.0  # lambda on the method's loss terms
    params: dict[str, Any] = field(default_factory=dict)  # method hyper-parameters, checked by the method
    bank_dir: str | None = None  # cache of old features; None: under train.output

    def __post_init__(self) -> None:
        _check(bool(self.method), "method", "must not be empty (use 'none')")
        _at_least(self, 0, "weight")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and learning-rate schedule (linear warmup, then linear decay to 0)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1  # for the global batch of the recipe; not rescaled with world size
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    poly_power: float = 1.0  # decay (1 - progress) ** power after warmup: 1 linear (recipe), 2 insightface
    grad_clip: float | None = 5.0  # max global grad norm; None disables clipping
    grad_accum: int = 1  # micro-batches per optimiser step

    def __post_init__(self) -> None:
        _at_least(self, 0, "lr", strict=True)
        _at_least(self, 0, "weight_decay", "warmup_epochs")
        _at_least(self, 0, "poly_power", strict=True)
        _at_least(self, 1, "grad_accum")
        _check(0.0 <= self.momentum < 1.0, "momentum", f"must be in [0, 1), got {self.momentum}")
        _check(
            self.grad_clip is None or self.grad_clip > 0,
            "grad_clip",
            f"must be > 0 or null, got {self.grad_clip}",
        )


@dataclass(frozen=True)
class TrainConfig:
    """The run: length, outputs, checkpoints, logging, seeds."""

    epochs: int = 20
    output: str = "work_dirs"  # runs go to <output>/<exp_name>
    exp_name: str | None = None  # None: the config file's stem
    resume: str = "auto"  # auto (latest checkpoint in the run dir, if any), none, or a checkpoint path
    checkpoint_every: int = 2000  # steps; 0: only at the end
    log_every: int = 50  # steps
    val_every: int = 2000  # steps between verification runs; 0: never
    seed: int = 0  # weight init and everything not seeded by data.seed
    deterministic: bool = False  # cuDNN deterministic algorithms (slower)
    # arcface: Partial FC margin softmax over the labels; contrastive: self-supervised NT-Xent (no labels)
    objective: Literal["arcface", "contrastive"] = "arcface"

    def __post_init__(self) -> None:
        _at_least(self, 0, "epochs", "log_every", strict=True)
        _at_least(self, 0, "checkpoint_every", "val_every")
        _check(bool(self.output), "output", "must not be empty")
        _check(bool(self.resume), "resume", "must be 'auto', 'none' or a checkpoint path")


@dataclass(frozen=True)
class EvalConfig:
    """IJB-B/C evaluation defaults."""

    target: Literal["IJBC", "IJBB"] = "IJBC"
    data_root: str | None = None  # the folder holding meta/ and loose_crop/
    batch_size: int = 256
    flip: bool = True  # fuse f(img) + f(flip(img))

    def __post_init__(self) -> None:
        _at_least(self, 0, "batch_size", strict=True)


@dataclass(frozen=True)
class Config:
    """A whole experiment: one frozen section per concern."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    compat: CompatConfig = field(default_factory=CompatConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check(
            self.optim.warmup_epochs < self.train.epochs,
            "optim.warmup_epochs",
            f"must be < train.epochs ({self.train.epochs}), got {self.optim.warmup_epochs}",
        )
        if self.train.objective == "contrastive":
            _check(
                self.compat.method == "none",
                "compat.method",
                f"must be 'none' with train.objective contrastive, got {self.compat.method!r}",
            )
            _check(
                self.data.loader != "dali",
                "data.loader",
                "train.objective contrastive needs data.loader torch (or auto), got 'dali'",
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, not tuples) that :func:`from_dict` turns back into an equal Config."""
        return _to_plain(self)


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


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


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
