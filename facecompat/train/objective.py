"""Training objectives: what a run trains besides the backbone, behind one contract.

The trainer's step is the same for every objective, as in arcface_torch::

    emb = model(images)                        # the module the objective gives DDP to wrap
    loss, terms = objective.loss(emb, labels, inputs)

An :class:`Objective` says what DDP wraps, which parameters it adds to the optimiser (and which
of them are per rank or outside DDP), the loss of a batch of embeddings, what the loader must
deliver (views per image) and the state it checkpoints: rank 0's part and every rank's part,
composed into the checkpoint by the trainer next to the backbone, optimiser and schedule
(torchtitan's ``Stateful`` pattern). Two objectives exist: ``arcface`` (the Partial FC head,
optionally behind a compatibility method; :class:`ArcFaceObjective`) and ``contrastive`` (FCT's
side-information model; :class:`facecompat.train.contrastive.ContrastiveObjective`), chosen by
``train.objective``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from facecompat import checkpoint as ckpt
from facecompat.compat.base import CompatMethod
from facecompat.compat.build import build_compat
from facecompat.config import AugmentConfig, Config, ConfigError
from facecompat.data.faces import FaceRecords
from facecompat.heads import PartialFC, build_head
from facecompat.heads.grad import scale_grad
from facecompat.train.errors import TrainingError


class Objective(nn.Module):
    """The contract every training objective implements (defaults suit a simple one).

    Attributes:
        name: the ``train.objective`` value.
        generator: a sampling stream saved with every rank's RNG states, or None.
        generator_seed: its seed (a resume on another device type re-seeds from it).
        terms_per_rank: the loss terms are this rank's means (averaged over ranks for logging).
    """

    name: ClassVar[str] = ""
    generator: torch.Generator | None = None
    generator_seed: int = 0  # what ``generator`` is re-seeded from when its saved state cannot load
    terms_per_rank: bool = False

    @staticmethod
    def loader_augment(cfg: Config) -> AugmentConfig | None:
        """Two augmented views per image when the objective wants them (the loader is built first)."""
        return None

    def wrap(self, backbone: nn.Module) -> nn.Module:
        """The module the step runs and DDP wraps: ``images -> what loss() reads``."""
        return backbone

    @property
    def batch_inputs(self) -> Callable[..., dict[str, Tensor]] | None:
        """Per-sample data the loader reads with each batch for :meth:`loss` (``inputs``), or None."""
        return None

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups after the backbone's."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "name": self.name}]

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters trained outside DDP on every rank alike: the step averages their gradients."""
        return []

    def sharded_parameter(self) -> nn.Parameter | None:
        """The parameter whose optimiser state differs per rank (saved with the rank, re-sharded)."""
        return None

    def loss(self, emb: Tensor, labels: Tensor, inputs: Mapping[str, Tensor] | None,
             world_size: int) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, named terms) of one micro-batch; ``emb`` is ``wrap(backbone)``'s float32 output."""
        raise NotImplementedError

    def set_progress(self, progress: float) -> None:
        """The share of training done before the coming step."""

    def describe(self) -> str:
        return self.name

    def common_state(self) -> dict[str, Any]:
        """What rank 0 saves of this objective."""
        return {}

    def rank_state(self) -> dict[str, Any]:
        """What every rank saves of this objective."""
        return {}

    def read_rank_state(self, path: Path, common: Mapping[str, Any], *, rank: int,
                        world_size: int) -> tuple[dict[str, Any] | None, str]:
        """This rank's saved state (None when it cannot be used) and a note for the resume log."""
        if int(common["world_size"]) != world_size:
            return None, ""
        rank_file = path / f"rank_{rank:03d}.pt"
        try:
            return torch.load(rank_file, map_location="cpu", weights_only=True), ""
        except Exception as exc:  # a truncated or foreign file: name it
            raise ckpt.CheckpointError(f"{rank_file}: cannot load ({type(exc).__name__}: {exc})") from None

    def load_state(self, path: Path, common: Mapping[str, Any], rank_state: Mapping[str, Any] | None,
                   config: Config) -> None:
        """Restore this objective from a checkpoint (``path``, for messages)."""


class ArcFaceObjective(Objective):
    """The Partial FC margin-softmax head (this rank's shard), optionally after a compatibility
    method that may replace embeddings and add loss terms.

    Each rank's embeddings carry only its share of the global-batch loss, and DDP averages backbone
    gradients over ranks; the embedding gradient is scaled by the world size so that the backbone's
    gradient is exactly that of the global mean loss (the head's shard gradient already is).
    """

    name = "arcface"

    def __init__(self, head: PartialFC, compat: CompatMethod | None = None):
        super().__init__()
        self.head, self.compat = head, compat
        self.generator, self.generator_seed = head.generator, head.sample_seed
        self.terms_per_rank = compat is not None

    def param_groups(self) -> list[dict[str, Any]]:
        groups = []
        if self.replicated_parameters():
            groups.append({"params": self.replicated_parameters(), "name": "compat"})
        groups.append({"params": list(self.head.parameters()), "name": "head"})  # the head's weight last
        return groups

    def replicated_parameters(self) -> list[nn.Parameter]:
        return [] if self.compat is None else [p for p in self.compat.parameters() if p.requires_grad]

    def sharded_parameter(self) -> nn.Parameter:
        return self.head.weight

    @property
    def batch_inputs(self) -> Callable[..., dict[str, Tensor]] | None:
        """The compatibility method's host-side lookups (the old-feature bank), if any."""
        return None if self.compat is None else self.compat.batch_inputs

    def loss(self, emb: Tensor, labels: Tensor, inputs: Mapping[str, Tensor] | None,
             world_size: int) -> tuple[Tensor, dict[str, Tensor]]:
        if self.compat is None:
            return self.head(scale_grad(emb, world_size), labels), {}
        out = self.compat(emb, labels, inputs or {})
        terms = {"arcface": self.head(scale_grad(out.embeddings, world_size), out.labels), **out.terms}
        return sum(terms.values()), terms

    def set_progress(self, progress: float) -> None:
        if self.compat is not None:
            self.compat.set_progress(progress)

    def describe(self) -> str:
        head = self.head
        return (f"head ρ={head.sample_rate}, shard {head.num_local} classes; "
                f"compat {'none' if self.compat is None else repr(self.compat)}")

    def common_state(self) -> dict[str, Any]:
        return {} if self.compat is None else {"compat": self.compat.state_dict()}

    def rank_state(self) -> dict[str, Any]:
        shard = self.head.shard_state()
        state = {"class_start": shard["class_start"], "num_local": shard["num_local"],
                 "num_classes": shard["num_classes"], "head_weight": shard["weight"]}
        if self.compat is not None:  # per rank: its sampling streams
            state["compat"] = self.compat.state_dict()
        return state

    def read_rank_state(self, path: Path, common: Mapping[str, Any], *, rank: int,
                        world_size: int) -> tuple[dict[str, Any] | None, str]:
        """This rank's head rows and their optimiser rows, re-sharded from any world size."""
        head = self.head
        state, same_layout = ckpt.load_rank_state(path, rank=rank, world_size=world_size,
                                                  class_start=head.class_start, num_local=head.num_local,
                                                  num_classes=head.num_classes)
        return state, "" if same_layout else f" (re-sharded from world size {common['world_size']})"

    def load_state(self, path: Path, common: Mapping[str, Any], rank_state: Mapping[str, Any] | None,
                   config: Config) -> None:
        assert rank_state is not None  # read_rank_state always reads the head
        with torch.no_grad():
            self.head.weight.copy_(rank_state["head_weight"])
        if self.compat is not None:
            saved = rank_state.get("compat") or common.get("compat")
            if saved is None:
                raise TrainingError(f"{path}: checkpoint has no state of compat.method "
                                     f"{config.compat.method!r} (it was written by another run)")
            self.compat.load_state_dict(saved)


Builder = Callable[..., Objective]  # (cfg, records, *, rank, world_size, device, log) -> objective


def build_arcface(cfg: Config, records: FaceRecords, *, rank: int, world_size: int, device: torch.device,
                  log: logging.Logger | None = None) -> ArcFaceObjective:
    """The head (labels checked once for the whole view here; on a GPU the per-step check would be
    a host sync) and, after it, the compatibility method (it may read the head's shard layout and
    extract the old-feature bank, collectively)."""
    labels = np.asarray(records.labels)
    bad = labels[(labels < 0) | (labels >= records.num_classes)]
    if bad.size:
        raise ConfigError(f"data.rec: {records.path}: label {int(bad[0])} outside "
                          f"[0, {records.num_classes}) ({bad.size} images)")
    head = build_head(cfg.head, num_classes=records.num_classes, embedding_size=cfg.model.embedding_size,
                      seed=cfg.train.seed, check_labels=device.type == "cpu").to(device)
    compat = build_compat(cfg, records, head, rank=rank, world_size=world_size, device=device, log=log)
    return ArcFaceObjective(head, compat)
