"""One optimiser step of backbone + Partial FC, shared by the trainer and the step benchmark."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from facecompat.config import OptimConfig
from facecompat.train.precision import LossScaler


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``factor``."""
    return x if factor == 1 else _ScaleGrad.apply(x, factor)


def build_optimizer(backbone: torch.nn.Module, head: torch.nn.Module, cfg: OptimConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    """SGD or AdamW over two groups, backbone then head (the head's weight is the last parameter).

    Fused kernels on CUDA (one launch per step, no foreach temporaries), foreach on CPU.
    """
    groups = [{"params": [p for p in backbone.parameters() if p.requires_grad], "name": "backbone"},
              {"params": list(head.parameters()), "name": "head"}]
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
    """

    def __init__(self, model: torch.nn.Module, backbone: torch.nn.Module, head: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scaler: LossScaler, *, amp_dtype: torch.dtype | None,
                 channels_last: bool, grad_clip: float | None, world_size: int):
        self.model, self.backbone, self.head = model, backbone, head
        self.optimizer, self.scaler = optimizer, scaler
        self.amp_dtype, self.channels_last, self.grad_clip = amp_dtype, channels_last, grad_clip
        self.world_size = world_size
        self.backbone_params = optimizer.param_groups[0]["params"]
        self.all_params = self.backbone_params + list(head.parameters())

    def _autocast(self, device_type: str):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.amp_dtype)

    def forward_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of one micro-batch (the mean over the global batch, the same on every rank)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast(images.device.type):
            emb = self.model(images)
        # Each rank's embeddings carry only its share of the global-batch loss, and DDP
        # averages backbone gradients over ranks; scaling by W makes the backbone's gradient
        # exactly that of the global mean loss (the head's shard gradient already is).
        return self.head(scale_grad(emb.float(), self.world_size), labels)

    def __call__(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 ) -> tuple[list[torch.Tensor], bool]:
        """Returns (the micro-batches' detached losses, whether the step was skipped for inf/NaN
        gradients). No host synchronisation except under fp16 (the skip decision)."""
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for i, (images, labels) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or self.model is self.backbone else self.model.no_sync()
            with sync:
                loss = self.forward_loss(images, labels)
                self.scaler.scale(loss / len(micro_batches)).backward()
            losses.append(loss.detach())
        found_inf = self.scaler.unscale_(self.all_params)
        if not found_inf:
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.backbone_params, self.grad_clip, foreach=True)
            self.optimizer.step()
        self.scaler.update(found_inf)
        return losses, found_inf
