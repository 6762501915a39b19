"""The config schema: one frozen dataclass per section, checked on construction (``ConfigError``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from facecompat.errors import UserError

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
