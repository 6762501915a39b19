"""The self-supervised contrastive objective (SimCLR): projection MLP, NT-Xent loss, training step.

FCT's side-information model ψ (DESIGN §6) is a backbone trained this way on the old model's
data, without labels. Each image arrives as two augmented views (the loader's ``views = 2``
batches: rows ``[0, B)`` view 0, rows ``[B, 2B)`` view 1); the backbone embeds both, a small
MLP projects the embeddings, and NT-Xent pulls each projection towards its other view and away
from every other projection of the global batch. The projection head is trained and
checkpointed with the run but is not part of ``model.pt``: ψ is the backbone embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from facecompat import dist
from facecompat.config import ContrastiveConfig
from facecompat.heads.grad import scale_grad
from facecompat.train.precision import LossScaler
from facecompat.train.step import TrainStep


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


class ContrastiveStep(TrainStep):
    """:class:`~facecompat.train.step.TrainStep` with the contrastive loss instead of Partial FC.

    ``model`` is the :class:`ProjectedBackbone` (DDP-wrapped when distributed), ``head`` its
    projection head (the optimiser's last group), ``images`` hold both views (``[2B, 3, H, W]``)
    and labels are not used.

    Args: as :class:`~facecompat.train.step.TrainStep` (no ``compat``), plus
        temperature: NT-Xent's ``T``.
    """

    def __init__(self, model: nn.Module, backbone: nn.Module, head: ProjectionHead,
                 optimizer: torch.optim.Optimizer, scaler: LossScaler, *, amp_dtype: torch.dtype | None,
                 channels_last: bool, grad_clip: float | None, world_size: int, temperature: float):
        super().__init__(model, backbone, head, optimizer, scaler, amp_dtype=amp_dtype,
                         channels_last=channels_last, grad_clip=grad_clip, world_size=world_size)
        self.temperature = float(temperature)

    def forward_loss(self, images: torch.Tensor, labels: torch.Tensor,
                     inputs: dict[str, torch.Tensor] | None = None,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(global-batch NT-Xent loss, no named terms) of one micro-batch of both views."""
        if images.shape[0] % 2:
            raise ValueError(f"expected both views of each image ([2B, 3, H, W]), got {images.shape[0]} rows")
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast(images.device.type):
            z = self.model(images)
        # nt_xent_loss gives each rank the exact gradient of the global loss for its own rows;
        # DDP averages parameter gradients over ranks, so scaling by W makes the average the sum.
        z = scale_grad(z.float(), self.world_size)
        n = z.shape[0] // 2
        return nt_xent_loss(z[:n], z[n:], self.temperature), {}
