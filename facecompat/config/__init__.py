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

from facecompat.config.convert import from_dict
from facecompat.config.loader import add_config_args, config_from_args, dump_config, load_config, load_yaml
from facecompat.config.schema import (
    AugmentConfig,
    CompatConfig,
    Config,
    ConfigError,
    ContrastiveConfig,
    DataConfig,
    EvalConfig,
    HeadConfig,
    ModelConfig,
    OldModelConfig,
    OptimConfig,
    TrainConfig,
    _at_least,
    _check,
    _FieldError,
)

__all__ = [
    "AugmentConfig", "CompatConfig", "Config", "ConfigError", "ContrastiveConfig", "DataConfig", "EvalConfig",
    "HeadConfig", "ModelConfig", "OldModelConfig", "OptimConfig", "TrainConfig", "_FieldError", "_at_least",
    "_check", "add_config_args", "config_from_args", "dump_config", "from_dict", "load_config", "load_yaml",
]
