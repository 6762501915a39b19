"""One optimiser step of backbone + Partial FC, shared by the trainer and the step benchmark."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from facecompat import dist
from facecompat.config import OptimConfig
from facecompat.heads.grad import scale_grad
from facecompat.train.precision import LossScaler


def build_optimizer(backbone: torch.nn.Module, head: torch.nn.Module, cfg: OptimConfig,
                    device: torch.device, compat: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    """SGD or AdamW over the backbone, a compatibility method's trainable parts (if any), then the
    head (the head's weight is always the last parameter).

    Fused kernels on CUDA (one launch per step, no foreach temporaries), foreach on CPU.
    """
    groups = [{"params": [p for p in backbone.parameters() if p.requires_grad], "name": "backbone"}]
    compat_params = [] if compat is None else [p for p in compat.parameters() if p.requires_grad]
    if compat_params:
        groups.append({"params": compat_params, "name": "compat"})
    groups.append({"params": list(head.parameters()), "name": "head"})
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               **fast)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fast)


class TrainStep:
    """Forward, backward and update for ``len(micro_batches)`` accumulated micro-batches.

    Args:
        model: the backbone as trained (DDP-wrapped when distributed).
        backbone: the plain backbone (its parameters are clipped).
        head: the Partial FC head (this rank's shard).
        optimizer: from :func:`build_optimizer`.
        scaler: fp16 loss scaler (disabled for bf16/fp32).
        amp_dtype: autocast dtype, None for fp32.
        channels_last: feed images in channels_last layout (CUDA).
        grad_clip: max norm of the backbone's gradient, None for no clipping.
        world_size: ranks sharing the global batch.
        compat: a compatibility method (:class:`facecompat.compat.base.CompatMethod`) between the
            backbone and the head, or None. Its trainable parameters are replicated on every rank:
            their gradients are averaged over ranks here (they are not inside DDP).

    Attributes:
        last_terms: after a call with ``compat``, per micro-batch the detached named loss terms
            (``arcface`` plus the method's), this rank's values.
    """

    def __init__(self, model: torch.nn.Module, backbone: torch.nn.Module, head: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scaler: LossScaler, *, amp_dtype: torch.dtype | None,
                 channels_last: bool, grad_clip: float | None, world_size: int,
                 compat: torch.nn.Module | None = None):
        self.model, self.backbone, self.head = model, backbone, head
        self.optimizer, self.scaler = optimizer, scaler
        self.amp_dtype, self.channels_last, self.grad_clip = amp_dtype, channels_last, grad_clip
        self.world_size = world_size
        self.compat = compat
        self.backbone_params = optimizer.param_groups[0]["params"]
        self.compat_params = [p for p in compat.parameters() if p.requires_grad] if compat is not None else []
        self.all_params = self.backbone_params + self.compat_params + list(head.parameters())
        # What a forward pass changes besides the graph (BatchNorm running statistics and counters):
        # under fp16 a step skipped for inf/NaN gradients restores them, so that one bad batch does
        # not leave NaN statistics in the model the next evaluation or model.pt export uses.
        self.buffers = [*backbone.buffers(), *head.buffers(),
                        *(compat.buffers() if compat is not None else ())]
        self.last_terms: list[dict[str, torch.Tensor]] = []

    def _autocast(self, device_type: str):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.amp_dtype)

    def forward_loss(self, images: torch.Tensor, labels: torch.Tensor,
                     inputs: dict[str, torch.Tensor] | None = None,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, named terms) of one micro-batch; the head's term is the mean over the global
        batch (the same on every rank), a method's terms may be this rank's means."""
        if self.channels_last:  # a no-op on the trainer's batches (the loader delivers this layout)
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast(images.device.type):
            emb = self.model(images)
        emb = emb.float()
        if self.compat is None:
            # Each rank's embeddings carry only its share of the global-batch loss, and DDP
            # averages backbone gradients over ranks; scaling by W makes the backbone's gradient
            # exactly that of the global mean loss (the head's shard gradient already is).
            return self.head(scale_grad(emb, self.world_size), labels), {}
        out = self.compat(emb, labels, inputs or {})
        terms = {"arcface": self.head(scale_grad(out.embeddings, self.world_size), out.labels), **out.terms}
        return sum(terms.values()), terms

    def __call__(self, micro_batches: Sequence[tuple[torch.Tensor, ...]],
                 ) -> tuple[list[torch.Tensor], bool]:
        """Run one step over ``(images, labels[, inputs])`` micro-batches.

        Returns (the micro-batches' detached losses, whether the step was skipped for inf/NaN
        gradients). No host synchronisation except under fp16 (the skip decision)."""
        self.optimizer.zero_grad(set_to_none=True)
        saved = [b.clone() for b in self.buffers] if self.scaler.enabled else []
        losses = []
        self.last_terms = []
        for i, (images, labels, *rest) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or self.model is self.backbone else self.model.no_sync()
            with sync:
                loss, terms = self.forward_loss(images, labels, rest[0] if rest else None)
                self.scaler.scale(loss / len(micro_batches)).backward()
            losses.append(loss.detach())
            if terms:
                self.last_terms.append({k: v.detach() for k, v in terms.items()})
        if self.compat_params and self.world_size > 1:
            dist.average_gradients(self.compat_params)
        found_inf = self.scaler.unscale_(self.all_params)
        if not found_inf:
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.backbone_params, self.grad_clip, foreach=True)
            self.optimizer.step()
        else:
            with torch.no_grad():
                for buffer, before in zip(self.buffers, saved):
                    buffer.copy_(before)
        self.scaler.update(found_inf)
        return losses, found_inf
