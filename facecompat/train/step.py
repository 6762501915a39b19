"""One optimiser step of the backbone and a training objective (the trainer and the step benches)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from facecompat import dist
from facecompat.config import OptimConfig
from facecompat.train.objective import Objective
from facecompat.train.precision import LossScaler


def build_optimizer(backbone: torch.nn.Module, objective: Objective, cfg: OptimConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    """SGD or AdamW over the backbone, then the objective's groups (for ArcFace: a compatibility
    method's trainable parts, if any, then the head, whose weight is the last parameter).

    Fused kernels on CUDA (one launch per step, no foreach temporaries), foreach on CPU.
    """
    groups = [{"params": [p for p in backbone.parameters() if p.requires_grad], "name": "backbone"},
              *objective.param_groups()]
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               **fast)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fast)


class TrainStep:
    """Forward, backward and update for ``len(micro_batches)`` accumulated micro-batches of any
    objective: ``emb = model(images); loss, terms = objective.loss(emb, labels, inputs)``.

    Args:
        model: ``objective.wrap(backbone)``, DDP-wrapped when distributed.
        backbone: the plain backbone (its parameters are clipped).
        objective: the training objective (:mod:`facecompat.train.objective`); its replicated
            parameters (a compatibility method's, outside DDP) have their gradients averaged here.
        optimizer: from :func:`build_optimizer`.
        scaler: fp16 loss scaler (disabled for bf16/fp32).
        amp_dtype: autocast dtype, None for fp32.
        channels_last: feed images in channels_last layout (CUDA).
        grad_clip: max norm of the backbone's gradient, None for no clipping.
        world_size: ranks sharing the global batch.

    Attributes:
        last_terms: after a call, per micro-batch the detached named loss terms of an objective
            that has them (ArcFace with a compatibility method: ``arcface`` plus the method's),
            this rank's values.
    """

    def __init__(self, model: torch.nn.Module, backbone: torch.nn.Module, objective: Objective,
                 optimizer: torch.optim.Optimizer, scaler: LossScaler, *, amp_dtype: torch.dtype | None,
                 channels_last: bool, grad_clip: float | None, world_size: int):
        self.model, self.backbone, self.objective = model, backbone, objective
        self.optimizer, self.scaler = optimizer, scaler
        self.amp_dtype, self.channels_last, self.grad_clip = amp_dtype, channels_last, grad_clip
        self.world_size = world_size
        self.backbone_params = optimizer.param_groups[0]["params"]
        self.replicated = objective.replicated_parameters()
        self.all_params = [p for group in optimizer.param_groups for p in group["params"]]
        # What a forward pass changes besides the graph (BatchNorm running statistics and counters):
        # under fp16 a step skipped for inf/NaN gradients restores them, so that one bad batch does
        # not leave NaN statistics in the model the next evaluation or model.pt export uses.
        self.buffers = [*backbone.buffers(), *objective.buffers()]
        self.last_terms: list[dict[str, torch.Tensor]] = []

    def _autocast(self, device_type: str):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.amp_dtype)

    def forward_loss(self, images: torch.Tensor, labels: torch.Tensor,
                     inputs: dict[str, torch.Tensor] | None = None,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, named terms) of one micro-batch (see :meth:`Objective.loss`)."""
        if self.channels_last:  # a no-op on the trainer's batches (the loader delivers this layout)
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast(images.device.type):
            emb = self.model(images)
        return self.objective.loss(emb.float(), labels, inputs, self.world_size)

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
            accumulate = not last and hasattr(self.model, "no_sync")  # DDP: all-reduce on the last only
            sync = self.model.no_sync() if accumulate else contextlib.nullcontext()
            with sync:
                loss, terms = self.forward_loss(images, labels, rest[0] if rest else None)
                self.scaler.scale(loss / len(micro_batches)).backward()
            losses.append(loss.detach())
            if terms:
                self.last_terms.append({k: v.detach() for k, v in terms.items()})
        if self.replicated and self.world_size > 1:
            dist.average_gradients(self.replicated)
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
