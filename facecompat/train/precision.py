"""Mixed precision: which autocast dtype a run uses, and a loss scaler that all ranks agree on."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from facecompat import dist


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` → bf16 on a CUDA device that supports it, fp16 on older CUDA devices, fp32 on CPU."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class LossScaler:
    """Dynamic loss scaling for fp16, with one decision for all ranks.

    torch's ``GradScaler`` decides per process whether a step had inf/NaN gradients. The
    backbone's gradients are all-reduced by DDP, so every rank sees the same ones, but each
    rank's Partial-FC shard is not: one rank could skip a step another takes, and the class
    centres would drift apart from the backbone. Here the found-inf flag is all-reduced
    (MAX) before the decision, so every rank skips the same steps.

    One host synchronisation per step, to decide the skip: the flag is reduced over ranks on
    the device and read once. The scale grows after ``growth_interval`` good steps, 100 as
    insightface's arcface_torch sets it (torch's default is 2,000).

    Disabled (bf16/fp32), ``scale`` returns the loss unchanged and nothing is ever skipped.
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 100):
        self.enabled = enabled
        self.scale_value = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.growth_tracker = 0
        self.consecutive_skips = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value if self.enabled else loss

    def unscale_(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """Divide gradients by the scale; True (on every rank) when any rank has a non-finite one."""
        if not self.enabled:
            return False
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return dist.all_reduce_flag(False)
        found = torch.zeros(1, device=grads[0].device)
        inv = torch.full((1,), 1.0 / self.scale_value, device=grads[0].device)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv)
        return bool(dist.all_reduce_(found, "max").item())  # the step's one host sync

    def update(self, found_inf: bool) -> None:
        if not self.enabled:
            return
        if found_inf:
            self.scale_value *= self.backoff_factor
            self.growth_tracker = 0
            self.consecutive_skips += 1
        else:
            self.consecutive_skips = 0
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.scale_value *= self.growth_factor
                self.growth_tracker = 0

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "scale": self.scale_value, "growth_tracker": self.growth_tracker,
                "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict) -> None:
        self.scale_value = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.consecutive_skips = int(state["consecutive_skips"])
