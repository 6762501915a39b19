"""The training loop: backbone (DDP) → Partial FC head, checkpoints, verification, logs.

One process or many under torchrun: every rank builds the same backbone, its own shard of
the head, and a loader over its slice of each epoch. ``Trainer.train()`` runs
``train_step`` per optimiser step, and around it logging, verification (rank 0 evaluates,
the others wait) and checkpoints (every rank writes its shard).

``train.objective: contrastive`` swaps the head for the self-supervised objective of
:mod:`facecompat.train.contrastive` (a projection MLP trained with the backbone under DDP,
two augmented views per image, no labels); the loop, logs and run directory stay the same.
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
from facecompat.compat.build import build_compat
from facecompat.config import Config, ConfigError, dump_config
from facecompat.data.loader import Batch, build_train_loader
from facecompat.errors import UserError
from facecompat.heads import build_head
from facecompat.models import get_model, load_backbone_weights
from facecompat.train.contrastive import ContrastiveStep, ProjectedBackbone, build_projection_head
from facecompat.train.log import MetricsWriter, Throughput, format_eta, setup_logging
from facecompat.train.precision import LossScaler, autocast_dtype, resolve_precision
from facecompat.train.schedule import PolyWarmupScheduler
from facecompat.train.step import TrainStep, build_optimizer

# Under fp16 a run whose loss scale keeps collapsing is diverging, not unlucky: stop after
# this many consecutive skipped steps instead of silently training on nothing.
MAX_CONSECUTIVE_SKIPS = 50


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (diverged, bad resume point); the message says where and what to do."""


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

        self.contrastive = cfg.train.objective == "contrastive"
        # channels_last batches come from the loader in that layout (uint8, before normalising).
        channels_last = cfg.model.channels_last and self.device.type == "cuda"
        self.records, self.loader = build_train_loader(
            cfg.data, rank=self.rank, world_size=self.world_size, device=self.device,
            augment=cfg.contrastive.augment if self.contrastive else None, channels_last=channels_last)
        self.num_classes = self.records.num_classes
        self.accum = cfg.optim.grad_accum
        self.steps_per_epoch = self.loader.steps_per_epoch // self.accum
        if self.steps_per_epoch == 0:
            raise ConfigError(f"optim.grad_accum: {self.accum} micro-batches per step, but an epoch has only "
                              f"{self.loader.steps_per_epoch} per rank")
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.precision = resolve_precision(cfg.model.precision, self.device)
        self.amp_dtype = autocast_dtype(self.precision)

        self.backbone = self._build_backbone()
        self.head, self.compat, self.projector = None, None, None
        if self.contrastive:
            # Seeded apart from the per-rank stream: the same head whatever the world size.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.train.seed)
                self.projector = build_projection_head(cfg.contrastive, cfg.model.embedding_size)
            self.projector = self.projector.to(self.device)
            trained: torch.nn.Module = ProjectedBackbone(self.backbone, self.projector)
        else:
            self._check_labels()
            # Labels were checked once for the whole view; on GPU the per-step check would be a host sync.
            self.head = build_head(cfg.head, num_classes=self.num_classes,
                                   embedding_size=cfg.model.embedding_size, seed=cfg.train.seed,
                                   check_labels=self.device.type == "cpu").to(self.device)
            # Built after the head (a method may read its shard layout); may extract the old-feature bank.
            self.compat = build_compat(cfg, self.records, self.head, rank=self.rank,
                                       world_size=self.world_size, device=self.device, log=self.log)
            if self.compat is not None:
                self.loader.batch_inputs = self.compat.batch_inputs
            trained = self.backbone
        if self.world_size > 1:
            # Buffers (BN statistics) stay per rank, as in insightface; rank 0's are saved.
            self.model = dist.data_parallel(trained, self.device)
        else:
            self.model = trained
        last = self.projector if self.contrastive else self.head
        self.optimizer = build_optimizer(self.backbone, last, cfg.optim, self.device, compat=self.compat)
        self.scheduler = PolyWarmupScheduler(
            self.optimizer, total_steps=self.total_steps,
            warmup_steps=round(cfg.optim.warmup_epochs * self.steps_per_epoch), power=cfg.optim.poly_power)
        self.scaler = LossScaler(enabled=self.precision == "fp16")
        if self.contrastive:
            self.step: TrainStep = ContrastiveStep(
                self.model, self.backbone, self.projector, self.optimizer, self.scaler,
                amp_dtype=self.amp_dtype, grad_clip=cfg.optim.grad_clip, world_size=self.world_size,
                channels_last=channels_last, temperature=cfg.contrastive.temperature)
        else:
            self.step = TrainStep(self.model, self.backbone, self.head, self.optimizer, self.scaler,
                                  amp_dtype=self.amp_dtype, grad_clip=cfg.optim.grad_clip,
                                  world_size=self.world_size, compat=self.compat, channels_last=channels_last)
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
        from facecompat.eval.verification import VerificationCallback

        val_dir = Path(self.cfg.data.val_dir) if self.cfg.data.val_dir else _beside_rec(self.cfg.data.rec)
        paths = [val_dir / f"{name}.bin" for name in targets]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(f"data.val_targets: {missing[0]} not found "
                              "(set data.val_dir, or data.val_targets=[])")
        return VerificationCallback(paths, batch_size=self.cfg.eval.batch_size, flip=self.cfg.eval.flip)

    def _check_labels(self) -> None:
        """Every label of the view in [0, num_classes): a class no rank owns is a data error."""
        labels = np.asarray(self.records.labels)
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.size:
            raise ConfigError(f"data.rec: {self.records.path}: label {int(bad[0])} outside "
                              f"[0, {self.num_classes}) ({bad.size} images)")

    @property
    def head_param_index(self) -> int:
        """The head weight's index in the optimiser's flat parameter numbering (its last)."""
        return sum(len(g["params"]) for g in self.optimizer.param_groups) - 1

    # ------------------------------------------------------------------ the step

    def train_step(self, batches: Sequence[Batch]) -> None:
        """One optimiser step over ``grad_accum`` micro-batches; no host synchronisation outside fp16."""
        if self.compat is not None:
            self.compat.set_progress(self.position.step / (self.steps_per_epoch * self.cfg.train.epochs))
        losses, _ = self.step([(b.images, b.labels, b.inputs) for b in batches])
        if self.compat is not None:
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
        if self.contrastive:
            return (f"training {c.model.network} ({self.precision}) self-supervised (contrastive: "
                    f"T={c.contrastive.temperature}, projection {list(c.contrastive.projection)}, "
                    f"{self.loader.views} views per image) on {self.records.num_images} images; "
                    f"world size {self.world_size}, batch {c.data.batch_size}x{self.world_size}x{self.accum} "
                    f"images; {self.steps_per_epoch} steps/epoch, {self.total_steps} steps; "
                    f"from step {self.position.step}")
        return (f"training {c.model.network} ({self.precision}) on {self.records.num_images} images / "
                f"{self.num_classes} classes; world size {self.world_size}, batch {c.data.batch_size}x"
                f"{self.world_size}x{self.accum}; {self.steps_per_epoch} steps/epoch, {self.total_steps} "
                f"steps; head ρ={c.head.sample_rate}, shard {self.head.num_local} classes; "
                f"compat {c.compat.method if self.compat is None else self.compat!r}; "
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
        if self.contrastive:
            common, rank_state = self._contrastive_state()
        else:
            common, rank_state = self._arcface_state()
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

    def _contrastive_state(self) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """(rank 0's state, this rank's): the projection head and optimiser are replicated, so
        rank 0 saves them whole; every rank saves its RNG states."""
        common = None
        if self.rank == 0:
            common = {**self._common_state(), "projector": self.projector.state_dict(),
                      "optimizer": self.optimizer.state_dict()}
        return common, {"rng": ckpt.rng_state()}

    def _arcface_state(self) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """(rank 0's state, this rank's): this rank's head shard with its optimiser rows and RNGs."""
        opt_common, head_optim = ckpt.split_optimizer_state(self.optimizer.state_dict(),
                                                            self.head_param_index)
        common = None
        if self.rank == 0:
            common = {**self._common_state(), "optimizer": opt_common}
            if self.compat is not None:
                common["compat"] = self.compat.state_dict()
        shard = self.head.shard_state()
        rank_state = {"class_start": shard["class_start"], "num_local": shard["num_local"],
                      "num_classes": shard["num_classes"], "head_weight": shard["weight"],
                      "head_optim": {k: v.detach().cpu() if torch.is_tensor(v) else v
                                     for k, v in head_optim.items()},
                      "rng": ckpt.rng_state(self.head.generator)}
        if self.compat is not None:  # per rank: its sampling streams
            rank_state["compat"] = self.compat.state_dict()
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
        if self.contrastive:
            self._resume_contrastive(path, common)
            return
        state, same_layout = ckpt.load_rank_state(
            path, rank=self.rank, world_size=self.world_size, class_start=self.head.class_start,
            num_local=self.head.num_local, num_classes=self.num_classes)
        with torch.no_grad():
            self.head.weight.copy_(state["head_weight"])
        opt_state = common["optimizer"]
        opt_state["state"][self.head_param_index] = state["head_optim"]
        self.optimizer.load_state_dict(opt_state)
        self.scheduler.load_state_dict(common["scheduler"])
        self.scaler.load_state_dict(common["scaler"])
        self.position = Position(**common["position"])
        if state.get("rng") is not None:
            ckpt.set_rng_state(state["rng"], self.head.generator, generator_seed=self.head.sample_seed,
                               seed=self.cfg.train.seed + self.rank, step=self.position.step)
        if self.compat is not None:
            saved = state.get("compat") or common.get("compat")
            if saved is None:
                raise TrainingError(f"{path}: checkpoint has no state of compat.method "
                                    f"{self.cfg.compat.method!r} (it was written by another run)")
            self.compat.load_state_dict(saved)
        self.last_checkpoint = path
        how = "" if same_layout else f" (re-sharded from world size {common['world_size']})"
        self.log.info("resumed from %s at step %d%s", path, self.position.step, how)

    def _resume_contrastive(self, path: Path, common: dict[str, Any]) -> None:
        """Projection head, optimiser, schedule and position from ``common``; this rank's RNG states
        when the checkpoint was written by as many ranks (augmentation does not depend on them)."""
        _load_fitting(self.projector, common["projector"], f"{path}: projection head does not fit "
                      f"contrastive.projection={list(self.cfg.contrastive.projection)}")
        self.optimizer.load_state_dict(common["optimizer"])
        self.scheduler.load_state_dict(common["scheduler"])
        self.scaler.load_state_dict(common["scaler"])
        self.position = Position(**common["position"])
        if int(common["world_size"]) == self.world_size:
            rank_file = path / f"rank_{self.rank:03d}.pt"
            try:
                state = torch.load(rank_file, map_location="cpu", weights_only=True)
            except Exception as exc:  # a truncated or foreign file: name it
                raise ckpt.CheckpointError(f"{rank_file}: cannot load "
                                           f"({type(exc).__name__}: {exc})") from None
            ckpt.set_rng_state(state["rng"], seed=self.cfg.train.seed + self.rank, step=self.position.step)
        self.last_checkpoint = path
        self.log.info("resumed from %s at step %d", path, self.position.step)


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

