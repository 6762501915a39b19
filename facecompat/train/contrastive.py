"""The self-supervised contrastive objective (SimCLR): projection MLP, NT-Xent loss, training step.

FCT's side-information model ψ (DESIGN §6) is a backbone trained this way on the old model's
data, without labels. Each image arrives as two augmented views (the loader's ``views = 2``
batches: rows ``[0, B)`` view 0, rows ``[B, 2B)`` view 1); the backbone embeds both, a small
MLP projects the embeddings, and NT-Xent pulls each projection towards its other view and away
from every other projection of the global batch. The projection head is trained and
checkpointed with the run but is not part of ``model.pt``: ψ is the backbone embedding.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from facecompat import dist
from facecompat.config import AugmentConfig, Config, ContrastiveConfig
from facecompat.data.faces import FaceRecords
from facecompat.heads.grad import scale_grad
from facecompat.train.errors import TrainingError
from facecompat.train.objective import Objective


class ProjectionHead(nn.Module):
    """MLP on the backbone embedding: ``Linear → ReLU`` per hidden width, then a last ``Linear``.

    No BatchNorm: every row is projected on its own, so that the loss of a global batch is the
    same under any world size (the backbone's BN statistics stay per rank, as in ArcFace runs).

    Args:
        embedding_size: the backbone's output width.
        widths: layer widths; the last is the projection's.
    """

    def __init__(self, embedding_size: int, widths: Sequence[int]):
        super().__init__()
        if not widths:
            raise ValueError("a projection head needs at least one layer width")
        layers: list[nn.Module] = []
        width_in = int(embedding_size)
        for i, width in enumerate(widths):
            layers.append(nn.Linear(width_in, int(width)))
            if i < len(widths) - 1:
                layers.append(nn.ReLU(inplace=True))
            width_in = int(width)
        self.mlp = nn.Sequential(*layers)
        self.out_features = width_in

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """``[N, embedding_size]`` → ``[N, widths[-1]]`` (unnormalised)."""
        return self.mlp(emb)


def build_projection_head(cfg: ContrastiveConfig, embedding_size: int) -> ProjectionHead:
    """The projection head a ``contrastive:`` config section describes."""
    return ProjectionHead(embedding_size, cfg.projection)


class ProjectedBackbone(nn.Module):
    """Backbone then projection head, as one module (what DDP wraps for the contrastive objective).

    ``backbone`` and ``head`` stay reachable as attributes; ``model.pt`` exports the backbone alone.
    """

    def __init__(self, backbone: nn.Module, head: ProjectionHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` → projections ``[N, head.out_features]``."""
        return self.head(self.backbone(images))


def nt_xent_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float,
                 group: object | None = None) -> torch.Tensor:
    """SimCLR's NT-Xent loss over the global batch of every rank's pairs.

    Each of the ``2N`` projections (``N`` images summed over ranks, two views each) is an anchor
    whose positive is the other view of its image: ``l_i = -log(exp(s_ip / T) / sum_{k != i}
    exp(s_ik / T))`` with ``s`` the cosine similarity; the loss is the mean of ``l_i`` over all
    ``2N`` anchors. Each rank computes the terms of its own anchors against every rank's
    projections, gathered with :func:`facecompat.dist.all_gather_with_grad`.

    Args:
        z_a, z_b: ``[n, D]`` this rank's projections of views 0 and 1 (row ``j`` of each is
            image ``j``); every rank passes the same ``n`` and dtype (float32 or float64: the
            caller upcasts half precision).
        temperature: ``T`` > 0.
        group: process group (default: the world; ignored in one process).

    Returns:
        A scalar: on every rank, the loss of the global batch. Its gradient with respect to
        this rank's ``z_a``/``z_b`` (after every rank's backward) equals the gradient of the
        one-process loss over the concatenated batch with respect to the same rows.
    """
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise ValueError(f"z_a and z_b must be [n, D] of one shape, got {tuple(z_a.shape)} and "
                         f"{tuple(z_b.shape)}")
    n, world, rank = z_a.shape[0], dist.get_world_size(group), dist.get_rank(group)
    local = F.normalize(torch.cat([z_a, z_b]), dim=1)  # [2n, D]
    # Rank r's rows are [r * 2n, (r + 1) * 2n) of the gathered [2n * world, D].
    everyone = dist.all_gather_with_grad(local, group)
    logits = local @ everyone.t() / temperature  # [2n, 2n * world]
    rows = torch.arange(2 * n, device=local.device)
    own = rank * 2 * n + rows
    positive = rank * 2 * n + (rows + n) % (2 * n)
    logits = logits.masked_fill(F.one_hot(own, logits.shape[1]).bool(), float("-inf"))
    # This rank's share of the global mean; the shares sum to the global-batch loss.
    share = F.cross_entropy(logits, positive, reduction="sum") / (2 * n * world)
    # Report the global value on every rank without touching the gradient: the other ranks'
    # shares enter as a constant (one scalar all-reduce, no host synchronisation).
    total = dist.all_reduce_(share.detach().clone(), "sum", group)
    return share + (total - share.detach())


class ContrastiveObjective(Objective):
    """NT-Xent over the projections of both views (``train.objective: contrastive``).

    DDP wraps :class:`ProjectedBackbone` (backbone then this objective's projection head, so the
    head's gradients are averaged with the backbone's); the batch holds both views (``[2B, 3, H,
    W]``) and its labels are not used. The projection head is checkpointed (rank 0) but is not
    part of ``model.pt``.

    Args:
        projector: the projection head.
        temperature: NT-Xent's ``T``.
    """

    name = "contrastive"

    def __init__(self, projector: ProjectionHead, temperature: float):
        super().__init__()
        self.projector = projector
        self.temperature = float(temperature)

    @staticmethod
    def loader_augment(cfg: Config) -> AugmentConfig:
        return cfg.contrastive.augment

    def wrap(self, backbone: nn.Module) -> nn.Module:
        return ProjectedBackbone(backbone, self.projector)

    def loss(self, emb: torch.Tensor, labels: torch.Tensor, inputs: Mapping[str, torch.Tensor] | None,
             world_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(global-batch NT-Xent loss, no named terms) of one micro-batch's projections of both views."""
        if emb.shape[0] % 2:
            raise ValueError(f"expected both views of each image ([2B, 3, H, W]), got {emb.shape[0]} rows")
        # nt_xent_loss gives each rank the exact gradient of the global loss for its own rows;
        # DDP averages parameter gradients over ranks, so scaling by W makes the average the sum.
        z = scale_grad(emb, world_size)
        n = z.shape[0] // 2
        return nt_xent_loss(z[:n], z[n:], self.temperature), {}

    def describe(self) -> str:
        widths = [m.out_features for m in self.projector.mlp if isinstance(m, nn.Linear)]
        return f"self-supervised (contrastive: T={self.temperature}, projection {widths}, 2 views per image)"

    def common_state(self) -> dict[str, Any]:
        return {"projector": self.projector.state_dict()}

    def load_state(self, path: Path, common: Mapping[str, Any], rank_state: Mapping[str, Any] | None,
                   config: Config) -> None:
        """The projection head (the RNG states of ``rank_state`` are the trainer's to restore; when
        the checkpoint had another world size there are none, and augmentation does not need them)."""
        try:
            self.projector.load_state_dict(common["projector"])
        except RuntimeError as exc:
            lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
            detail = lines[1] if len(lines) > 1 else lines[0]
            raise TrainingError(f"{path}: projection head does not fit contrastive.projection="
                                f"{list(config.contrastive.projection)} ({detail.rstrip('.')})") from None


def build_contrastive(cfg: Config, records: FaceRecords, *, rank: int, world_size: int, device: torch.device,
                      log: logging.Logger | None = None) -> ContrastiveObjective:
    """The projection head, seeded apart from the per-rank stream: the same head whatever the world size."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        projector = build_projection_head(cfg.contrastive, cfg.model.embedding_size)
    return ContrastiveObjective(projector.to(device), cfg.contrastive.temperature)
