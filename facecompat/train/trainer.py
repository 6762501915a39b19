"""The training loop: backbone (DDP) → Partial FC head, checkpoints, verification, logs.

One process or many under torchrun: every rank builds the same backbone, its own shard of
the head, and a loader over its slice of each epoch. ``Trainer.train()`` runs
``train_step`` per optimiser step, and around it logging, verification (rank 0 evaluates,
the others wait) and checkpoints (every rank writes its shard).

``train.objective`` picks what is trained besides the backbone (:mod:`facecompat.train.objective`):
``arcface`` (the Partial FC head, optionally behind a compatibility method) or ``contrastive``
(:mod:`facecompat.train.contrastive`: a projection MLP under DDP, two augmented views per image,
no labels). The loop, checkpoints, logs and run directory are the same for both.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facecompat import checkpoint as ckpt
from facecompat import dist
from facecompat.config import Config, ConfigError, dump_config
from facecompat.data.loader import Batch, build_dataset, build_train_loader
from facecompat.data.loader import steps_per_epoch as loader_steps_per_epoch
from facecompat.eval.verification import VerificationCallback
from facecompat.models import get_model, load_backbone_weights
from facecompat.train.contrastive import ContrastiveObjective, build_contrastive
from facecompat.train.errors import TrainingError
from facecompat.train.log import MetricsWriter, Throughput, format_eta, setup_logging
from facecompat.train.objective import ArcFaceObjective, Builder, Objective, build_arcface
from facecompat.train.precision import LossScaler, autocast_dtype, resolve_precision
from facecompat.train.schedule import WarmupScheduler
from facecompat.train.step import TrainStep, build_optimizer

# Under fp16 a run whose loss scale keeps collapsing is diverging, not unlucky: stop after
# this many consecutive skipped steps instead of silently training on nothing.
MAX_CONSECUTIVE_SKIPS = 50


# train.objective -> (class, builder); a new objective is one more entry.
OBJECTIVES: dict[str, tuple[type[Objective], Builder]] = {
    "arcface": (ArcFaceObjective, build_arcface),
    "contrastive": (ContrastiveObjective, build_contrastive),
}


@dataclass
class Position:
    """Where training stands: optimiser steps taken, the epoch, and steps taken within it."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


def run_dir_for(cfg: Config, config_path: str | os.PathLike | None) -> Path:
    """``<train.output>/<train.exp_name or the config file's stem>``."""
    name = cfg.train.exp_name or (Path(config_path).stem if config_path else "default")
    return Path(cfg.train.output) / name


class Trainer:
    """Builds everything a run needs from a resolved config and trains it.

    Args:
        cfg: the resolved config.
        run_dir: where the run writes (``config.yaml``, ``checkpoints/``, ``model.pt``, logs).
        device: default: this process's GPU (``LOCAL_RANK`` modulo the visible GPUs) when CUDA is
            available, else CPU (:func:`facecompat.dist.resolve_device`).
    """

    def __init__(self, cfg: Config, run_dir: str | os.PathLike, device: torch.device | str | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = dist.use_device(device)
        self.log = setup_logging(self.run_dir, self.rank)
        self._seed_everything()

        if cfg.train.objective not in OBJECTIVES:
            raise ConfigError(f"train.objective: unknown objective {cfg.train.objective!r} "
                              f"(valid: {', '.join(sorted(OBJECTIVES))})")
        objective_cls, build_objective = OBJECTIVES[cfg.train.objective]
        self.records = build_dataset(cfg.data)
        self.num_classes = self.records.num_classes
        # Checked before anything is built (the old-feature bank may take hours): the loader's plan.
        micro_steps = loader_steps_per_epoch(self.records.num_images, self.world_size, cfg.data.batch_size)
        if micro_steps == 0:
            raise ConfigError(f"data.batch_size: {self.records.path}: {self.records.num_images} images "
                              f"cannot fill one batch of {cfg.data.batch_size} on each of "
                              f"{self.world_size} rank(s)")
        self.accum = cfg.optim.grad_accum
        self.steps_per_epoch = micro_steps // self.accum
        if self.steps_per_epoch == 0:
            raise ConfigError(f"optim.grad_accum: {self.accum} micro-batches per step, but an epoch has only "
                              f"{micro_steps} per rank")
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.precision = resolve_precision(cfg.model.precision, self.device)
        self.amp_dtype = autocast_dtype(self.precision)

        self.backbone = self._build_backbone()
        # May extract the old-feature bank (collectively) for a compatibility method.
        self.objective = build_objective(cfg, self.records, rank=self.rank, world_size=self.world_size,
                                         device=self.device, log=self.log)
        # channels_last batches come from the loader in that layout (uint8, before normalising).
        channels_last = cfg.model.channels_last and self.device.type == "cuda"
        _, self.loader = build_train_loader(
            cfg.data, rank=self.rank, world_size=self.world_size, device=self.device, records=self.records,
            augment=objective_cls.loader_augment(cfg), channels_last=channels_last,
            batch_inputs=self.objective.batch_inputs)
        # Buffers (BN statistics) stay per rank, as in insightface; rank 0's are saved.
        trained = self.objective.wrap(self.backbone)
        self.model = dist.data_parallel(trained, self.device) if self.world_size > 1 else trained
        self.optimizer = build_optimizer(self.backbone, self.objective, cfg.optim, self.device)
        self.scheduler = WarmupScheduler(
            self.optimizer, total_steps=self.total_steps,
            warmup_steps=round(cfg.optim.warmup_epochs * self.steps_per_epoch), power=cfg.optim.poly_power)
        self.scaler = LossScaler(enabled=self.precision == "fp16")
        self.step = TrainStep(self.model, self.backbone, self.objective, self.optimizer, self.scaler,
                              amp_dtype=self.amp_dtype, grad_clip=cfg.optim.grad_clip,
                              world_size=self.world_size, channels_last=channels_last)
        self.position = Position()
        self.last_checkpoint: Path | None = None
        self.metrics = MetricsWriter(self.run_dir, enabled=self.rank == 0)
        self.throughput = Throughput()
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_count = 0
        self._term_sums: dict[str, torch.Tensor] = {}
        self._first_bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        # The same decision on every rank: rank 0 evaluates, the others wait for it.
        self.val_enabled = bool(cfg.data.val_targets) and cfg.train.val_every > 0
        self.verifier = self._build_verifier()

    # ------------------------------------------------------------------ construction

    def _seed_everything(self) -> None:
        seed = self.cfg.train.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # the same initial backbone on every rank
        if self.cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _build_backbone(self) -> torch.nn.Module:
        m = self.cfg.model
        try:
            backbone = get_model(m.network, m.embedding_size, grad_checkpoint=m.grad_checkpoint)
        except ValueError as exc:
            raise ConfigError(f"model.network: {exc}") from None
        if m.init_from:
            load_backbone_weights(backbone, m.init_from)
            self.log.info("backbone initialised from %s", m.init_from)
        backbone = backbone.to(self.device)
        if m.channels_last and self.device.type == "cpu":
            # A GPU setting; torch 2.13's CPU backward also crashes on narrow channels_last models.
            self.log.warning("model.channels_last has no effect on CPU; training in the default layout")
        elif m.channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        # Per-rank randomness (dropout) after the shared initialisation.
        torch.manual_seed(self.cfg.train.seed + 1000003 * (self.rank + 1))
        return backbone

    def _build_verifier(self):
        targets = self.cfg.data.val_targets
        if not targets or self.cfg.train.val_every == 0 or self.rank != 0:
            return None

        val_dir = Path(self.cfg.data.val_dir) if self.cfg.data.val_dir else _beside_rec(self.cfg.data.rec)
        paths = [val_dir / f"{name}.bin" for name in targets]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(f"data.val_targets: {missing[0]} not found "
                              "(set data.val_dir, or data.val_targets=[])")
        return VerificationCallback(paths, batch_size=self.cfg.eval.batch_size, flip=self.cfg.eval.flip)

    @property
    def sharded_param_index(self) -> int | None:
        """The objective's per-rank parameter (the head's weight) in the optimiser's flat numbering."""
        sharded = self.objective.sharded_parameter()
        if sharded is None:
            return None
        flat = [p for group in self.optimizer.param_groups for p in group["params"]]
        return next(i for i, p in enumerate(flat) if p is sharded)

    # ------------------------------------------------------------------ the step

    def train_step(self, batches: Sequence[Batch]) -> None:
        """One optimiser step over ``grad_accum`` micro-batches; no host synchronisation outside fp16."""
        self.objective.set_progress(self.position.step / (self.steps_per_epoch * self.cfg.train.epochs))
        losses, _ = self.step([(b.images, b.labels, b.inputs) for b in batches])
        if self.objective.terms_per_rank:
            losses = self._average_over_ranks(losses)
        for loss in losses:
            self._track_loss(loss)
        self.scheduler.step()
        self.position.step += 1
        self.position.step_in_epoch += 1
        if self.scaler.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise TrainingError(f"step {self.position.step}: {MAX_CONSECUTIVE_SKIPS} consecutive fp16 steps "
                                f"had inf/NaN gradients (loss scale {self.scaler.scale_value:g}); "
                                f"{self._resume_hint()}")

    def _average_over_ranks(self, losses: list[torch.Tensor]) -> list[torch.Tensor]:
        """A method's terms may be per-rank means: average losses and terms over ranks (one small
        all-reduce, no host sync) so that every rank logs, checks and stops on the same values."""
        names = list(self.step.last_terms[0])
        stacked = torch.stack([torch.stack([loss, *(t[n] for n in names)])
                               for loss, t in zip(losses, self.step.last_terms)])
        stacked = dist.all_reduce_(stacked, "sum").div_(self.world_size)
        for j, name in enumerate(names):
            total = stacked[:, j + 1].sum()
            self._term_sums[name] = self._term_sums[name] + total if name in self._term_sums else total
        return list(stacked[:, 0])

    def _track_loss(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss)
        if self.scaler.enabled:
            return self._add_loss(loss, bad)  # fp16: a skipped step is not a divergence
        self._first_bad_step = torch.where(bad & (self._first_bad_step < 0), self.position.step + 1,
                                           self._first_bad_step)
        self._add_loss(loss, bad)

    def _add_loss(self, loss: torch.Tensor, bad: torch.Tensor) -> None:
        self._loss_sum += torch.where(bad, torch.zeros_like(loss), loss)
        self._loss_count += 1

    def _check_finite(self) -> None:
        """Raise if the loss went non-finite (one host sync; called at log and checkpoint points)."""
        bad_step = int(self._first_bad_step.item())
        if bad_step >= 0:
            raise TrainingError(f"step {bad_step}: loss is NaN/inf; {self._resume_hint()}")

    def _resume_hint(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written yet (lower optim.lr or add optim.warmup_epochs)"
        return (f"last good checkpoint {self.last_checkpoint} (lower optim.lr and resume with "
                f"--set train.resume={self.last_checkpoint})")

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, Any]:
        """Train to ``train.epochs``; returns a summary (steps, final loss, verification results)."""
        cfg = self.cfg
        self._resume()
        if self.rank == 0:
            dump_config(cfg, self.run_dir / "config.yaml")
        self.log.info("%s", self._describe())
        summary: dict[str, Any] = {"verification": {}}
        pos = self.position
        start_time = time.perf_counter()
        start_step = pos.step
        while pos.epoch < cfg.train.epochs:
            self.loader.set_epoch(pos.epoch, start_step=pos.step_in_epoch * self.accum)
            batches = iter(self.loader)
            while pos.step_in_epoch < self.steps_per_epoch:
                micro = [next(batches) for _ in range(self.accum)]
                self.train_step(micro)
                self.throughput.add(sum(len(b.labels) for b in micro) * self.world_size)
                if self.device.type == "cpu":  # free here; on GPU only at log/checkpoint points
                    self._check_finite()
                last = pos.epoch == cfg.train.epochs - 1 and pos.step_in_epoch == self.steps_per_epoch
                if pos.step % cfg.train.log_every == 0 or last:
                    self._log_progress(start_time, start_step)
                if self.val_enabled and pos.step % cfg.train.val_every == 0 and not last:
                    summary["verification"] = self.evaluate()
                if cfg.train.checkpoint_every and pos.step % cfg.train.checkpoint_every == 0 \
                        and pos.step_in_epoch < self.steps_per_epoch:
                    self.save()
            del batches
            pos.epoch += 1
            pos.step_in_epoch = 0
            self.save()  # epoch end: checkpoint and model.pt
        if self.val_enabled:
            summary["verification"] = self.evaluate() or summary["verification"]
        self.metrics.close()
        summary.update(step=pos.step, epochs=pos.epoch, run_dir=str(self.run_dir),
                       loss=self._last_loss, model=str(self.run_dir / "model.pt"))
        return summary

    _last_loss: float = float("nan")

    def _describe(self) -> str:
        c = self.cfg
        views = f"x{self.loader.views} views" if self.loader.views > 1 else ""
        return (f"training {c.model.network} ({self.precision}) {self.objective.describe()} on "
                f"{self.records.num_images} images / {self.num_classes} classes; world size "
                f"{self.world_size}, batch {c.data.batch_size}x{self.world_size}x{self.accum}{views}; "
                f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps; "
                f"from step {self.position.step}")

    def _log_progress(self, start_time: float, start_step: int) -> None:
        self._check_finite()
        pos = self.position
        count = max(self._loss_count, 1)
        loss = float((self._loss_sum / count).item())
        terms = {name: float(total.item()) / count for name, total in self._term_sums.items()}
        self._term_sums = {}
        self._loss_sum.zero_()
        self._loss_count = 0
        self._last_loss = loss
        rate = self.throughput.rate()
        elapsed = time.perf_counter() - start_time
        per_step = elapsed / max(pos.step - start_step, 1)
        eta = format_eta(per_step * (self.total_steps - pos.step))
        lr = self.optimizer.param_groups[0]["lr"]
        parts = "".join(f" {name} {value:.4f}" for name, value in terms.items())
        self.log.info("epoch %d step %d/%d loss %.4f%s lr %.5f %.1f samples/s eta %s%s", pos.epoch, pos.step,
                      self.total_steps, loss, f" ({parts.strip()})" if parts else "", lr, rate, eta,
                      f" scale {self.scaler.scale_value:g}" if self.scaler.enabled else "")
        self.metrics.write("train", pos.step, {"epoch": pos.epoch, "loss": loss,
                                               **{f"loss_{k}": v for k, v in terms.items()}, "lr": lr,
                                               "samples_per_s": round(rate, 2)})

    def evaluate(self) -> dict[str, float]:
        """Verification on rank 0; every other rank waits at the barrier."""
        self.throughput.pause()
        results: dict[str, float] = {}
        if self.verifier is not None:
            results = self.verifier(self.backbone, self.position.step, self.device,
                                    autocast_dtype=self.amp_dtype)
            text = ", ".join(f"{name} {acc * 100:.2f}% (best {self.verifier.best[name] * 100:.2f}%)"
                             for name, acc in results.items())
            self.log.info("step %d verification: %s", self.position.step, text)
            self.metrics.write("val", self.position.step, {f"{k}_accuracy": v for k, v in results.items()})
        dist.barrier()
        self.throughput.resume()
        return results

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        """Checkpoint (every rank writes its shard) and, at epoch ends, ``model.pt``."""
        self._check_finite()  # never save a diverged state
        self.throughput.pause()
        pos = self.position
        common, rank_state = self._state()
        self.last_checkpoint = ckpt.save_checkpoint(self.run_dir, pos.step, common, rank_state)
        if pos.step_in_epoch == 0 and self.rank == 0:
            ckpt.export_backbone(self.backbone, self.run_dir / "model.pt")
        self.log.info("step %d: checkpoint %s", pos.step, self.last_checkpoint)
        self.throughput.resume()
        return self.last_checkpoint

    def _common_state(self) -> dict[str, Any]:
        """What rank 0 saves for every objective (the optimiser is the objective's to add)."""
        return {"backbone": self.backbone.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "position": vars(self.position).copy(),
                "config": self.cfg.to_dict(), "num_classes": self.num_classes}

    def _state(self) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """(rank 0's state, this rank's), composed from the components: the backbone, schedule,
        scaler and position (rank 0), the optimiser (rank 0, less the objective's per-rank rows,
        which every rank saves), the objective's two parts, and every rank's RNG states."""
        opt_state, sharded_optim = self.optimizer.state_dict(), None
        if self.sharded_param_index is not None:
            opt_state, sharded_optim = ckpt.split_optimizer_state(opt_state, self.sharded_param_index)
        common = None
        if self.rank == 0:
            common = {**self._common_state(), "optimizer": opt_state, **self.objective.common_state()}
        rank_state = self.objective.rank_state()
        if sharded_optim is not None:
            rank_state["head_optim"] = {k: v.detach().cpu() if torch.is_tensor(v) else v
                                        for k, v in sharded_optim.items()}
        rank_state["rng"] = ckpt.rng_state(self.objective.generator)
        return common, rank_state

    def _resume(self) -> None:
        setting = self.cfg.train.resume
        if setting == "none":
            return
        if setting == "auto":
            # Rank 0 decides, so that every rank resumes from the same one (or none).
            found = ckpt.latest_checkpoint(self.run_dir) if self.rank == 0 else None
            found = dist.broadcast_object(None if found is None else str(found))
            if found is None:
                return
            path = Path(found)
        else:
            path = Path(setting)
        common = ckpt.load_common(path)
        saved = common.get("config", {}).get("train", {}).get("objective", "arcface")
        if saved != self.cfg.train.objective:
            raise TrainingError(f"{path}: written by a train.objective {saved} run; this run's "
                                f"train.objective is {self.cfg.train.objective}")
        _load_fitting(self.backbone, common["backbone"], f"{path}: backbone does not fit "
                      f"model.network={self.cfg.model.network}")
        state, note = self.objective.read_rank_state(path, common, rank=self.rank, world_size=self.world_size)
        self.objective.load_state(path, common, state, self.cfg)
        opt_state = common["optimizer"]
        if self.sharded_param_index is not None:
            opt_state["state"][self.sharded_param_index] = state["head_optim"]
        self.optimizer.load_state_dict(opt_state)
        self.scheduler.load_state_dict(common["scheduler"])
        self.scaler.load_state_dict(common["scaler"])
        self.position = Position(**common["position"])
        if state is not None and state.get("rng") is not None:
            ckpt.set_rng_state(state["rng"], self.objective.generator, seed=self.cfg.train.seed + self.rank,
                               generator_seed=self.objective.generator_seed, step=self.position.step)
        self.last_checkpoint = path
        self.log.info("resumed from %s at step %d%s", path, self.position.step, note)


def _load_fitting(module: torch.nn.Module, state: dict, problem: str) -> None:
    """``module.load_state_dict(state)``; a mismatch is a TrainingError: ``problem`` and the first
    specific line of PyTorch's message (a size mismatch, missing or unexpected keys)."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise TrainingError(f"{problem} ({detail.rstrip('.')})") from None


def _beside_rec(rec: str | None) -> Path:
    path = Path(rec or ".")
    return path if path.is_dir() else path.parent


def train(cfg: Config, run_dir: str | os.PathLike,
          device: torch.device | str | None = None) -> dict[str, Any]:
    """Build a :class:`Trainer` and run it (the library entry point of ``tools/train.py``)."""
    trainer = Trainer(cfg, run_dir, device=device)
    return trainer.train()

