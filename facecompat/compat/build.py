"""Prepare what a compatibility method needs and build it (called by the trainer before step 0).

The old model named by ``compat.old`` is resolved once; when the method reads the old-feature
bank, the bank is extracted by every rank together on first use and reused by later runs
(``compat.bank_dir``, default ``<train.output>/banks/<old model>-<hash>``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from facecompat.compat.base import CompatContext, CompatMethod, resolve_params
from facecompat.compat.registry import get_method
from facecompat.config import Config, ConfigError, load_config
from facecompat.features import default_bank_dir, ensure_bank
from facecompat.models.spec import ModelSpec, resolve_model_spec

_BANK_NEEDS = frozenset({"bank", "class_stats", "credible"})


def resolve_old_model(cfg: Config) -> tuple[ModelSpec, Path | None, Config | None]:
    """(spec, run directory or None, that run's config or None) of ``compat.old``."""
    old = cfg.compat.old
    if not old.checkpoint:
        raise ConfigError("compat.old.checkpoint: not set (the old model's run directory or its model.pt)")
    path = Path(old.checkpoint)
    try:
        network, dim, weights = resolve_model_spec(path, old.network, old.embedding_size)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"compat.old.checkpoint: {exc}") from None
    if dim != cfg.model.embedding_size:
        raise ConfigError(f"compat.old.embedding_size: the old model's embeddings are {dim}-d but "
                          f"model.embedding_size is {cfg.model.embedding_size} "
                          "(compatible models share one space)")
    run_dir = path if path.is_dir() else None
    name = path.name if run_dir is not None else f"{path.parent.name}-{path.stem}"
    run_cfg = load_config(run_dir / "config.yaml") if run_dir is not None else None
    return ModelSpec(name, network, dim, weights, str(path)), run_dir, run_cfg


def build_compat(cfg: Config, view, head, *, rank: int, world_size: int, device: torch.device,
                 log: logging.Logger | None = None) -> CompatMethod | None:
    """The method ``compat.method`` names, with its artefacts prepared; None for ``none``.

    Every rank calls this (bank extraction is collective).
    """
    name = cfg.compat.method
    if name == "none":
        return None
    cls = get_method(name)
    params = resolve_params(name, cls.defaults, cfg.compat.params)
    spec, run_dir, run_cfg = resolve_old_model(cfg)
    bank = None
    if cls.needs & _BANK_NEEDS:
        directory = Path(cfg.compat.bank_dir) if cfg.compat.bank_dir else \
            default_bank_dir(cfg.train.output, spec, view)
        if log is not None:
            log.info("old-feature bank of %s: %s", spec.source, directory)
        bank = ensure_bank(view, spec, directory, credible_ratios=cls.credible_ratios(params),
                           batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers, device=device,
                           autocast_dtype=torch.float16 if device.type == "cuda" else None)
    ctx = CompatContext(params=params, weight=cfg.compat.weight, view=view, head=head,
                        embedding_size=cfg.model.embedding_size, rank=rank, world_size=world_size,
                        device=device, seed=cfg.train.seed, bank=bank, old_run_dir=run_dir,
                        old_config=run_cfg)
    return cls(ctx).to(device)
