"""FCT's configuration: the three models, the new model's training view, the network h and its training."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from facecompat.config import DataConfig, OldModelConfig, _at_least, _check, load_yaml
from facecompat.errors import UserError


class FCTError(UserError, ValueError):
    """A transformation that cannot be trained, loaded or applied as asked (one line)."""


@dataclass(frozen=True)
class TransformConfig:
    """The network h: hidden widths, side-information input, uncertainty output."""

    hidden: tuple[int, ...] = (512, 512)  # widths of the hidden layers ([] : one linear map)
    uncertainty: bool = True  # FastFill: also predict log σ² per item

    def __post_init__(self) -> None:
        _check(all(w > 0 for w in self.hidden), "hidden", f"widths must be > 0, got {list(self.hidden)}")


@dataclass(frozen=True)
class FCTTrainConfig:
    """Optimisation of h: AdamW, linear warm-up then cosine decay to 0, per-rank batch size."""

    epochs: int = 20
    batch_size: int = 512  # rows per rank and step
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    cosine_weight: float = 0.0  # weight of 1 - cos(p, t) beside the squared error
    nll_weight: float = 1.0  # weight of the uncertainty's Gaussian NLL (with transform.uncertainty)
    val_ratio: float = 0.05  # records held out to report generalisation (0: none)
    seed: int = 0
    log_every: int = 1  # epochs

    def __post_init__(self) -> None:
        _at_least(self, 0, "epochs", "batch_size", "lr", "log_every", strict=True)
        _at_least(self, 0, "weight_decay", "warmup_epochs", "cosine_weight", "nll_weight")
        _check(0.0 <= self.val_ratio < 0.5, "val_ratio", f"must be in [0, 0.5), got {self.val_ratio}")


@dataclass(frozen=True)
class FCTConfig:
    """``tools/train_fct.py`` config: the three models, the new model's training view, h and its training.

    ``data`` names the NEW model's training set (the view its features are cached on); ``side``
    None trains the no-side-information variant.
    """

    data: DataConfig = field(default_factory=DataConfig)
    old: OldModelConfig = field(default_factory=OldModelConfig)
    side: OldModelConfig | None = None
    new: OldModelConfig = field(default_factory=OldModelConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    train: FCTTrainConfig = field(default_factory=FCTTrainConfig)
    output: str = "work_dirs/fct"  # the transformation's directory
    bank_root: str = "work_dirs"  # feature banks go to <bank_root>/banks/<model>-<hash> (shared with BCT)
    extract_batch_size: int = 256

    def __post_init__(self) -> None:
        _check(bool(self.output), "output", "must not be empty")
        _at_least(self, 0, "extract_batch_size", strict=True)


def load_fct_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> FCTConfig:
    """Read an FCT config (``_base_`` files and ``--set`` items as for training configs)."""
    return load_yaml(FCTConfig, path, overrides)
