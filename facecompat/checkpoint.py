"""Training checkpoints: atomic, complete, and re-shardable across world sizes.

A checkpoint is a directory ``<run>/checkpoints/step_XXXXXXXX/``:

- ``common.pt`` (rank 0): backbone, optimiser state without the head's rows, scheduler, loss
  scaler, the data position (epoch, micro-batch), the resolved config, the world size;
- ``rank_XXX.pt`` (every rank): its head shard (class range + rows), the head's optimiser
  state rows, and its RNG states (torch, CUDA, numpy, python, Partial-FC sampler);
- ``meta.json`` (rank 0, last): step, world size and the size of every file.

Ranks write into ``step_XXXXXXXX.partial/``; rank 0 writes ``meta.json`` and renames the
directory only after every rank's files are on disk, so a directory named ``step_*`` with a
``meta.json`` whose file sizes match is complete, and a run killed at any moment leaves at
worst a ``.partial`` directory that is ignored (and cleared by the next save). Multi-node
runs need the run directory on a filesystem every node sees.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facecompat import dist, rng
from facecompat.errors import UserError
from facecompat.fileio import atomic_write

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used, with the path and the reason."""


def save_file(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temp file, fsynced and renamed: the file is whole or absent."""
    with atomic_write(path, "wb", fsync=True) as f:
        torch.save(obj, f)


def export_backbone(backbone: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write an insightface-compatible ``model.pt``: the backbone's plain state_dict, CPU tensors,
    no ``module.`` prefix."""
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    save_file(state, path)


# ----------------------------------------------------------------------------- RNG states


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG the training step draws from, as tensors and plain values (loads with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "sampler": generator.get_state() if generator is not None else None,
    }
    return state


def set_rng_state(state: Mapping[str, Any], generator: torch.Generator | None = None, *,
                  generator_seed: int = 0, seed: int = 0, step: int = 0) -> None:
    """Restore what :func:`rng_state` saved. A stream saved on another device type (a GPU checkpoint
    resumed on a CPU or the reverse) is re-seeded deterministically with a logged warning
    (:mod:`facecompat.rng`): ``generator`` from ``generator_seed``, the CUDA stream from ``seed``,
    each salted with ``step``."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if torch.cuda.is_available():
        if state.get("cuda") is not None:
            torch.cuda.set_rng_state(state["cuda"])
        else:
            cuda_seed = rng.resume_seed(seed, step)
            torch.cuda.manual_seed(cuda_seed)
            rng.log.warning("CUDA random stream: the checkpoint was written without CUDA; re-seeded "
                            "deterministically (seed %d)", cuda_seed)
    if generator is not None and state.get("sampler") is not None:
        rng.restore_generator(generator, state["sampler"], seed=generator_seed, step=step,
                              what="Partial FC negative-class sampler")


# ----------------------------------------------------------------------------- re-sharding


def slice_rows(shards: Sequence[tuple[int, torch.Tensor]], start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of a matrix stored as shards ``(class_start, rows [n, D])``.

    Shards may come from any world size and in any order; where they overlap the first one wins.
    Raises ValueError naming the first uncovered row range.
    """
    if not shards:
        raise ValueError(f"no shards given for rows [{start}, {stop})")
    pieces, pos = [], start
    for shard_start, rows in sorted(shards, key=lambda s: s[0]):
        shard_stop = shard_start + rows.shape[0]
        if shard_start > pos or pos >= stop:
            continue
        take = min(stop, shard_stop)
        if take > pos:
            pieces.append(rows[pos - shard_start : take - shard_start])
            pos = take
    if pos < stop:
        nxt = min((s for s, _ in shards if s > pos), default=stop)
        raise ValueError(f"rows [{pos}, {min(nxt, stop)}) are not covered by the given shards")
    if not pieces:
        return shards[0][1][:0]
    return torch.cat(pieces, dim=0)



# ----------------------------------------------------------------------------- optimiser split


def split_optimizer_state(opt_state: dict, head_index: int) -> tuple[dict, dict]:
    """(optimizer state without the head parameter's entry, the head parameter's entry)."""
    state = dict(opt_state["state"])
    head_state = state.pop(head_index, {})
    return {"state": state, "param_groups": opt_state["param_groups"]}, head_state


def _rows_of(value: Any, num_local: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == num_local


# ----------------------------------------------------------------------------- discovery


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def read_meta(path: Path) -> dict:
    """The checkpoint's ``meta.json``, after checking every file it lists is there with its size."""
    meta_path = path / "meta.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: incomplete checkpoint (no meta.json)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable ({exc})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    for name, size in meta["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: missing {name}")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, meta.json says {size}")
    return meta


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (incomplete ones are skipped)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if not match or not path.is_dir():
            continue
        try:
            read_meta(path)
        except CheckpointError:
            continue
        found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_of_weights(run_dir: str | os.PathLike, weights: str | os.PathLike) -> Path:
    """The newest complete checkpoint of ``run_dir`` whose backbone is the one in ``weights``.

    ``model.pt`` is written at epoch ends only, checkpoints also mid-epoch: a run stopped after a
    mid-epoch checkpoint has a latest checkpoint newer than its ``model.pt``. Whatever is read from a
    checkpoint to go with ``model.pt`` (BCT's old classifier) must come from this one, the same step.

    Raises:
        CheckpointError: one line naming ``weights`` and the latest checkpoint with their steps when no
            kept checkpoint holds those weights (the epoch end's checkpoint was rotated away), or
            naming the run when it has no complete checkpoint.
    """
    weights = Path(weights)
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{checkpoint_dir(run_dir)}: no complete checkpoint")
    model = _load(weights, mmap=True)
    for path in reversed(found):
        if _same_tensors(model, _load(path / "common.pt", mmap=True).get("backbone") or {}):
            return path
    position = _load(found[-1] / "common.pt", mmap=True).get("position") or {}
    step, in_epoch = int(position.get("step", -1)), int(position.get("step_in_epoch", 0))
    # the trainer writes model.pt at epoch ends: the latest one is where the current epoch began
    model_step = f"step {step - in_epoch}, the last epoch end" if 0 < in_epoch < step else "step unknown"
    kept = ", ".join(str(int(m.group(1))) for m in (_STEP_DIR.match(p.name) for p in found) if m)
    raise CheckpointError(f"{weights} ({model_step}) and the latest checkpoint {found[-1]} (step {step}) are "
                          f"from different training steps, and no kept checkpoint (steps {kept}) holds "
                          f"{weights.name}'s weights; resume the run to its next epoch end")


def _same_tensors(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Two state dicts with the same keys and bit-identical tensors."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- save / load


def save_checkpoint(run_dir: str | os.PathLike, step: int, common: dict, rank_state: dict,
                    keep: int = 2) -> Path | None:
    """Collective: every rank calls it with its own ``rank_state``; rank 0 also with ``common``.

    Returns the checkpoint directory (on every rank).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:08d}"
    partial = root / f"step_{step:08d}.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    save_file({**rank_state, "rank": rank, "world_size": world}, partial / f"rank_{rank:03d}.pt")
    if rank == 0:
        save_file({**common, "format": FORMAT_VERSION, "step": step, "world_size": world},
                  partial / "common.pt")
    dist.barrier()
    if rank == 0:
        files = {p.name: p.stat().st_size for p in sorted(partial.iterdir()) if p.suffix == ".pt"}
        expected = {"common.pt", *(f"rank_{r:03d}.pt" for r in range(world))}
        if set(files) != expected:  # a rank wrote elsewhere: the run dir is not shared
            raise CheckpointError(f"{partial}: expected {sorted(expected)}, found {sorted(files)} "
                                  "(is the run directory on a filesystem all nodes share?)")
        meta = {"format": FORMAT_VERSION, "step": step, "world_size": world, "files": files}
        with atomic_write(partial / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("step_*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _load(path: Path, mmap: bool = False) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # a truncated or foreign file: name it
        raise CheckpointError(f"{path}: cannot load ({type(exc).__name__}: {exc})") from None


def load_common(path: Path) -> dict:
    read_meta(path)
    return _load(path / "common.pt")


def load_rank_state(path: Path, *, rank: int, world_size: int, class_start: int, num_local: int,
                    num_classes: int) -> tuple[dict, bool]:
    """This rank's head rows and head optimiser rows from a checkpoint of any world size.

    Returns (state, same_layout): ``state`` holds ``head_weight``, ``head_optim`` and, when the
    checkpoint had the same world size, this rank's ``rng``; ``same_layout`` says so.
    """

    meta = read_meta(path)
    saved_world = int(meta["world_size"])
    if saved_world == world_size:
        state = _load(path / f"rank_{rank:03d}.pt")
        _check_classes(path, state, num_classes)
        if state["class_start"] == class_start and state["num_local"] == num_local:
            return state, True
    shards = [_load(path / f"rank_{r:03d}.pt", mmap=True) for r in range(saved_world)]
    for shard in shards:
        _check_classes(path, shard, num_classes)
    stop = class_start + num_local
    weight = slice_rows([(s["class_start"], s["head_weight"]) for s in shards], class_start, stop).clone()
    optim: dict[str, Any] = {}
    for name, value in shards[0]["head_optim"].items():
        if _rows_of(value, shards[0]["num_local"]):
            optim[name] = slice_rows([(s["class_start"], s["head_optim"][name]) for s in shards],
                                     class_start, stop).clone()
        else:
            optim[name] = value
    return {"head_weight": weight, "head_optim": optim, "rng": None}, False


def _check_classes(path: Path, state: dict, num_classes: int) -> None:
    if state["num_classes"] != num_classes:
        raise CheckpointError(f"{path}: head has {state['num_classes']} classes, "
                              f"this run's data has {num_classes}")


def load_head_rows(path: Path, classes: np.ndarray) -> tuple[torch.Tensor, int]:
    """Class-centre rows ``classes`` (int64 ``[n]``, each in ``[0, num_classes)``) of a checkpoint's
    head, whatever world size wrote it; shards are memory-mapped, only the rows asked for are read.

    Returns (float32 ``[n, D]`` rows, the checkpoint head's ``num_classes``).
    """
    meta = read_meta(path)
    classes = np.asarray(classes, dtype=np.int64)
    rows: torch.Tensor | None = None
    filled = np.zeros(classes.shape, dtype=bool)
    num_classes = None
    for r in range(int(meta["world_size"])):
        shard = _load(path / f"rank_{r:03d}.pt", mmap=True)
        num_classes = int(shard["num_classes"])
        weight = shard["head_weight"]
        if rows is None:
            rows = torch.zeros(classes.size, weight.shape[1], dtype=torch.float32)
        start, n = int(shard["class_start"]), int(shard["num_local"])
        mine = (classes >= start) & (classes < start + n)
        if mine.any():
            wanted = torch.from_numpy(classes[mine] - start)
            rows[torch.from_numpy(np.flatnonzero(mine))] = weight[wanted].float()
            filled |= mine
    if rows is None or num_classes is None:
        raise CheckpointError(f"{path}: no head shards")
    if not filled.all():
        bad = int(classes[~filled][0])
        raise CheckpointError(f"{path}: head has no row for class {bad} (num_classes {num_classes})")
    return rows, num_classes
