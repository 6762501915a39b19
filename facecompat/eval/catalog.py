"""Models an evaluation knows by name: ``configs/eval_ijbc.yaml``, or paths given on the command line.

    catalog = load_catalog("configs/eval_ijbc.yaml")
    spec = resolve_model("old", catalog)          # a catalog name ...
    spec = resolve_model("work_dirs/r50", catalog) # ... or a run directory / weights file
    model = load_model(spec, device="cuda")

A model is a run directory (``model.pt`` + ``config.yaml``, network and embedding size from the
config) or a weights file with its network named. The catalog file also gives the data root,
the IJB target and where features are cached (DESIGN §8)::

    data_root: data                 # holds IJBC/ (meta/, loose_crop/) and IJBB/
    target: IJBC
    cache_dir: work_dirs/eval       # features/<model>/<target>.npy
    models:
      old: {path: work_dirs/ms1mv3_r18_old}
      zoo_r50: {path: models/r50/backbone.pth, network: r50}
      fct: {transform: work_dirs/ms1mv3_fct}   # the old gallery upgraded by FCT's transformation

A transformation (``tools/train_fct.py``'s output directory) is a model too: its features are
``h(old features, side-information features)`` of each face, with the old and side-information
models it names in its ``fct.json`` (their features cached like any model's).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from facecompat.config import ConfigError, _check, _FieldError, load_yaml
from facecompat.eval.ijb import find_target_dir
from facecompat.models.spec import ModelPathError, ModelSpec, path_name, resolve_model_spec

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class EvalModelConfig:
    """One named model: a run directory, or a weights file with ``network`` (and ``embedding_size``),
    or an FCT transformation directory (``transform``)."""

    path: str = ""
    network: str | None = None  # required for a weights file; overrides a run directory's config
    embedding_size: int | None = None  # weights file: 512 when unset
    transform: str | None = None  # an FCT transformation directory instead of a path

    def __post_init__(self) -> None:
        _check(bool(self.path) != bool(self.transform), "path",
               "give exactly one of path (a model) and transform (an FCT transformation directory)")
        _check(self.embedding_size is None or self.embedding_size > 0, "embedding_size",
               f"must be > 0, got {self.embedding_size}")


@dataclass(frozen=True)
class EvalCatalog:
    """``configs/eval_ijbc.yaml``: evaluation defaults and the models known by name."""

    data_root: str = "data"  # holds <target>/meta and <target>/loose_crop (or is the <target> folder)
    target: Literal["IJBC", "IJBB"] = "IJBC"
    cache_dir: str = "work_dirs/eval"  # features/<model>/<target>.npy + .json fingerprints
    batch_size: int = 256
    num_workers: int | None = None  # None: sized from the machine (extract.default_num_workers)
    flip: bool = True  # face feature = f(img) + f(flip(img))
    models: dict[str, EvalModelConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        _check(self.num_workers is None or self.num_workers >= 0, "num_workers",
               f"must be >= 0 (or unset: sized from the machine), got {self.num_workers}")
        for name in self.models:
            if not _NAME.match(name) or "|" in name:
                raise _FieldError(f"models.{name}", "a model name is letters, digits, _ . + - "
                                  "(it names a cache folder)")


@dataclass(frozen=True)
class TransformSpec:
    """A resolved FCT transformation: the features of ``old`` (and ``side``) mapped by ``directory``'s h."""

    name: str
    directory: Path
    old: ModelSpec
    side: ModelSpec | None
    embedding_size: int
    source: str
    network: str = "fct"

    @property
    def weights(self) -> Path:
        return self.directory / "transform.pt"


def target_dir(data_root: str | os.PathLike, target: str) -> Path:
    """The ``<target>`` folder (holding ``meta/`` and ``loose_crop/``) of a data root: the same rule
    as :func:`facecompat.eval.ijb.find_target_dir` (it is that function; IJBMetaError when absent)."""
    return find_target_dir(data_root, target)


def load_catalog(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> EvalCatalog:
    """Read an evaluation catalog (``None``: defaults, no named models); ConfigError names file and key."""
    return load_yaml(EvalCatalog, path, overrides)


def resolve_model(name_or_path: str, catalog: EvalCatalog, catalog_source: str = "the catalog",
                  network: str | None = None, embedding_size: int | None = None) -> ModelSpec | TransformSpec:
    """A catalog name, else a run directory or weights file (with ``network`` for a weights file),
    or an FCT transformation (a catalog ``transform`` entry or a directory holding ``fct.json``).

    Raises:
        ValueError: neither a catalog name nor an existing path (names both places looked at);
            a weights file without a network; a bad run directory config.
        FileNotFoundError: a catalog entry whose path does not exist (names the entry).
    """
    entry = catalog.models.get(name_or_path)
    if entry is not None and entry.transform:
        try:
            return resolve_transform(name_or_path, Path(entry.transform), catalog)
        except (FileNotFoundError, ValueError) as exc:
            raise type(exc)(f"{catalog_source}: models.{name_or_path}: {exc}") from None
    if entry is not None:
        try:
            net, dim, weights = resolve_model_spec(entry.path, entry.network, entry.embedding_size)
        except (FileNotFoundError, ValueError) as exc:
            raise type(exc)(f"{catalog_source}: models.{name_or_path}: {exc}") from None
        return ModelSpec(name_or_path, net, dim, weights, f"{name_or_path} ({entry.path})")
    path = Path(name_or_path)
    if not path.exists():
        known = ", ".join(sorted(catalog.models)) or "none"
        raise ConfigError(f"model {name_or_path!r}: not a name in {catalog_source} (known: {known}) "
                         "and not an existing run directory or weights file")
    if (path / "fct.json").is_file():
        return resolve_transform(path_name(path), path, catalog)
    # --network names the backbone of a weights file; a run directory's own config says its own.
    net, dim, weights = resolve_model_spec(path, network if path.is_file() else None, embedding_size)
    return ModelSpec(path_name(path), net, dim, weights, str(path))


def resolve_transform(name: str, directory: Path, catalog: EvalCatalog) -> TransformSpec:
    """The transformation in ``directory`` and the old / side-information models its ``fct.json``
    names. A model that is also in the catalog (same weights file) takes its catalog name, so its
    cached features are shared with plain evaluations of it.

    Raises:
        FileNotFoundError: no ``fct.json`` or a model it names is gone; ValueError: unreadable.
    """
    import json

    meta_path = directory / "fct.json"
    if not meta_path.is_file():
        raise ModelPathError(f"{directory}: not an FCT transformation directory (no fct.json)")
    try:
        meta = json.loads(meta_path.read_text())
        models, new_dim = meta["models"], int(meta["architecture"]["new_dim"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{meta_path}: unreadable ({exc})") from None
    by_weights = {}
    for known, entry in catalog.models.items():
        if entry.path:
            try:
                weights = resolve_model_spec(entry.path, entry.network, entry.embedding_size)[2]
                by_weights[weights.resolve()] = known
            except (FileNotFoundError, ValueError):
                continue

    def spec(role: str) -> ModelSpec | None:
        record = models.get(role)
        if record is None:
            return None
        weights = Path(record["weights"])
        if not weights.is_file():
            raise ModelPathError(f"{meta_path}: its {role} model's weights {weights} are gone")
        known = by_weights.get(weights.resolve())
        return ModelSpec(known or f"{path_name(Path(record['source']))}", record["network"],
                         int(record["embedding_size"]), weights, record["source"])

    return TransformSpec(name, directory, spec("old"), spec("side"), new_dim, f"{name} ({directory})")


__all__ = ["ConfigError", "EvalCatalog", "EvalModelConfig", "TransformSpec", "load_catalog", "resolve_model",
           "resolve_transform", "target_dir"]
