"""Learning-rate schedules: linear warmup, then a decay to zero (polynomial or cosine), stepped per
optimiser step. The backbone trainer decays polynomially (the MS1Mv3 recipe), FCT's transformation
by a cosine (:mod:`facecompat.train.fct`); both run through :class:`WarmupScheduler`."""

from __future__ import annotations

import math

import torch

DECAYS = ("poly", "cosine")


def poly_lr(step: int, *, base_lr: float, total_steps: int, warmup_steps: int = 0,
            power: float = 1.0) -> float:
    """The learning rate after ``step`` optimiser steps (step 0 is the first update).

    Warmup rises linearly from ``base_lr / warmup_steps`` to ``base_lr`` over ``warmup_steps``
    steps; the rest decays as ``base_lr * (1 - progress) ** power`` and reaches 0 at
    ``total_steps``. ``power=1`` is the linear decay of the MS1Mv3 recipe; insightface's
    ``PolyScheduler`` uses ``power=2``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return base_lr * (1.0 - progress) ** power


def cosine_lr(step: int, *, base_lr: float, total_steps: int, warmup_steps: int = 0) -> float:
    """As :func:`poly_lr` (the same warmup), then ``base_lr * (1 + cos(pi * progress)) / 2``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class WarmupScheduler:
    """Sets every param group's ``lr`` from :func:`poly_lr` or :func:`cosine_lr` (``decay``);
    ``step()`` after each optimiser step.

    The state is only the step count, so resuming restores the exact learning rate.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0,
                 decay: str = "poly", power: float = 1.0):
        if decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.decay = decay
        self.power = float(power)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int, base_lr: float) -> float:
        if self.decay == "cosine":
            return cosine_lr(step, base_lr=base_lr, total_steps=self.total_steps,
                             warmup_steps=self.warmup_steps)
        return poly_lr(step, base_lr=base_lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                       power=self.power)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.last_step, group["initial_lr"])

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "decay": self.decay, "power": self.power}

    def load_state_dict(self, state: dict) -> None:
        # The schedule's shape comes from the current config (a resumed run may extend epochs);
        # only the position is restored.
        self.last_step = int(state["last_step"])
        self._apply()
