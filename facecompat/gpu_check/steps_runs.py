"""Steps 8-9 and 12-13 of the GPU check, run as subprocesses: training and its resume under torchrun,
the tiny quickstart, two ranks sharing one GPU, the gpu-marked tests."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from facecompat import checkpoint as ckpt
from facecompat.gpu_check.context import (
    CheckContext,
    CheckFailed,
    StepSkipped,
    _ensure_data,
    _last_lines,
    _run_logged,
    _subprocess_env,
)

# ======================================================================= 8-9: training, quickstart


def _train_args(ctx: CheckContext, config: str, overrides: Sequence[str], nproc: int | None) -> list[str]:
    """``tools/train.py configs/<config> --set ...``, under torchrun with ``nproc`` processes when given."""
    launch = [sys.executable] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    sets = [x for o in overrides for x in ("--set", o)]
    return [*launch, str(ctx.repo / "tools" / "train.py"), str(ctx.repo / "configs" / config), *sets]


def _train_overrides(ctx: CheckContext, *, network: str, exp_name: str, epochs: int) -> list[str]:
    """The recipes pointed at the generated data, small, deterministic, without DALI or verification."""
    s = ctx.sizes
    return [f"data.rec={ctx.data_root / 'train'}", "data.loader=torch", "data.val_targets=[]",
            f"data.num_workers={s.train_workers}", f"data.batch_size={s.train_batch}",
            f"model.network={network}", f"model.embedding_size={s.train_embedding}",
            f"model.precision={s.train_precision}", "head.scale=32.0",  # s = 64 needs many classes
            "train.deterministic=true", f"train.output={ctx.out / 'runs'}", f"train.exp_name={exp_name}",
            f"train.epochs={epochs}", "train.log_every=1"]


def _train(ctx: CheckContext, name: str, config: str, overrides: Sequence[str], nproc: int | None,
           env: dict[str, str] | None = None) -> float:
    """Run one training; a non-zero exit fails the step with its last lines. Returns its seconds."""
    status, text, seconds = _run_logged(ctx, name, _train_args(ctx, config, overrides, nproc), cap_s=300,
                                        env=env or _subprocess_env(ctx, CUBLAS_WORKSPACE_CONFIG=":4096:8"))
    if status != 0:
        raise CheckFailed(f"{name}: exit {status}: {_last_lines(text)}")
    return seconds


def step_train_resume(ctx: CheckContext) -> dict:
    """An old model, then MixBCT (configs/ms1mv3_mixbct.yaml) under torchrun: one epoch (its step
    count S fixes the rest); two epochs uninterrupted with a checkpoint at S + S // 2 (mid-epoch, kept:
    the last two are kept); a fresh run whose run directory holds only a copy of that checkpoint, the
    state a run killed right after writing it leaves, resumed with train.resume=auto. model.pt of the
    resumed and the uninterrupted runs must be equal on the CPU; on a GPU (deterministic mode) their
    max difference must stay under 1% of what the weights moved after the checkpoint."""
    s = ctx.sizes
    _ensure_data(ctx)
    runs = ctx.out / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    seconds = {"old": _train(ctx, "train_old", "ms1mv3_r18_old.yaml", _train_overrides(
        ctx, network=s.old_network, exp_name="old", epochs=1), None)}

    def mix(name: str, epochs: int, *extra: str) -> list[str]:
        return [*_train_overrides(ctx, network=s.new_network, exp_name=name, epochs=epochs),
                f"compat.old.checkpoint={runs / 'old'}", *extra]

    seconds["one_epoch"] = _train(ctx, "train_mixbct_one_epoch", "ms1mv3_mixbct.yaml", mix("one_epoch", 1), 1)
    per_epoch = _checkpoint_step(runs / "one_epoch")
    if per_epoch < 2:
        raise CheckFailed(f"one epoch is {per_epoch} step(s): too few for a mid-epoch checkpoint")
    mid = per_epoch + per_epoch // 2
    every = f"train.checkpoint_every={mid}"
    seconds["uninterrupted"] = _train(ctx, "train_mixbct_uninterrupted", "ms1mv3_mixbct.yaml",
                                      mix("uninterrupted", 2, every), 1)
    kept = runs / "uninterrupted" / "checkpoints" / f"step_{mid:08d}"
    if not kept.is_dir():
        raise CheckFailed(f"{kept}: the mid-epoch checkpoint is not there (kept: "
                          f"{[p.name for p in ckpt.list_checkpoints(runs / 'uninterrupted')]})")
    shutil.copytree(kept, runs / "resumed" / "checkpoints" / kept.name)
    seconds["resumed"] = _train(ctx, "train_mixbct_resumed", "ms1mv3_mixbct.yaml",
                                mix("resumed", 2, every, "train.resume=auto"), 1)
    result = {"steps_per_epoch": per_epoch, "resumed_from_step": mid, "total_steps": 2 * per_epoch,
              "seconds": seconds, "data": ctx.data_counts, "networks": [s.old_network, s.new_network],
              "precision": s.train_precision, **_compare_runs(runs / "resumed", runs / "uninterrupted", kept)}
    log = (runs / "resumed" / "train.log").read_text(errors="replace")
    result["resume_logged"] = "resumed from" in log
    return _judge_resume(ctx, result)


def _checkpoint_step(run_dir: Path) -> int:
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise CheckFailed(f"{run_dir}: no checkpoint after training")
    return int(ckpt.read_meta(latest)["step"])


def _compare_runs(resumed: Path, reference: Path, mid: Path) -> dict:
    """Max |difference| of the two runs' model.pt (float tensors; others must be equal), the same for
    the head weights of their last checkpoints, and how far model.pt moved from ``mid``'s backbone."""
    a = torch.load(resumed / "model.pt", map_location="cpu", weights_only=True)
    b = torch.load(reference / "model.pt", map_location="cpu", weights_only=True)
    at_mid = ckpt.load_common(mid)["backbone"]
    if a.keys() != b.keys():
        raise CheckFailed(f"model.pt keys differ: {sorted(set(a) ^ set(b))[:3]}")
    diff = movement = 0.0
    unequal = []
    for key, value in b.items():
        if value.is_floating_point():
            diff = max(diff, float((a[key].double() - value.double()).abs().max()))
            movement = max(movement, float((at_mid[key].double() - value.double()).abs().max()))
        elif not torch.equal(a[key], value):
            unequal.append(key)
    head_diff = float((_final_head(resumed) - _final_head(reference)).abs().max())
    return {"model_max_abs_diff": diff, "model_unequal_integer_tensors": unequal,
            "head_max_abs_diff": head_diff, "movement_after_checkpoint": movement}


def _final_head(run_dir: Path) -> torch.Tensor:
    """The head weights of a one-rank run's last checkpoint, float64."""
    shard = torch.load(ckpt.latest_checkpoint(run_dir) / "rank_000.pt", map_location="cpu", weights_only=True)
    return shard["head_weight"].double()


def _judge_resume(ctx: CheckContext, result: dict) -> dict:
    diff, movement = result["model_max_abs_diff"], result["movement_after_checkpoint"]
    if ctx.cuda:
        tolerance = 0.01 * movement
        result["criterion"] = ("max |resumed - uninterrupted| <= 1% of the max weight change after the "
                               "checkpoint (train.deterministic)")
    else:
        tolerance = 0.0
        result["criterion"] = "bit-identical (CPU, train.deterministic)"
    result["tolerance"] = tolerance
    ok = (diff <= tolerance and not result["model_unequal_integer_tensors"] and result["resume_logged"]
          and (ctx.cuda or result["head_max_abs_diff"] == 0.0))
    result["summary"] = (f"{result['total_steps']} steps, resumed at {result['resumed_from_step']}: "
                         f"model diff {diff:.2e} (moved {movement:.2e}), "
                         f"head diff {result['head_max_abs_diff']:.2e}")
    if not ok:
        why = "the resumed run did not log a resume; " if not result["resume_logged"] else ""
        raise CheckFailed(f"{why}resumed != uninterrupted: {result['summary']}", result)
    return result


def step_quickstart(ctx: CheckContext) -> dict:
    """``tools/quickstart.py --size tiny --force`` into ``<out>/quickstart``: wall time and verdict."""
    work = ctx.out / "quickstart"
    args = [sys.executable, str(ctx.repo / "tools" / "quickstart.py"), "--size", "tiny", "--device",
            ctx.device.type, "--work-dir", str(work), "--force", "--configs", str(ctx.repo / "configs")]
    status, text, seconds = _run_logged(ctx, "quickstart_tiny", args, cap_s=360,
                                        env=_subprocess_env(ctx, TQDM_DISABLE="1"))
    lines = text.splitlines()
    begin = next((i for i, line in enumerate(lines) if line.startswith("quickstart (")), len(lines))
    report = work / "report.json"
    result = {"seconds": round(seconds, 1), "exit": status, "work_dir": str(work),
              "report_json": str(report) if report.is_file() else None,
              "stages": lines[begin] if begin < len(lines) else None,
              "verdict": [line for line in lines[begin + 1:] if line.strip()][:40]}
    if status != 0:
        raise CheckFailed(f"exit {status}: {_last_lines(text)}", result)
    if report.is_file():
        result["ecc"] = json.loads(report.read_text()).get("ecc")
    result["summary"] = f"{seconds:.0f} s; {report}"
    return result


# ======================================================================== 12-13: ranks, gpu tests


def step_two_ranks(ctx: CheckContext) -> dict:
    """A small training under torchrun with two ranks and gloo (both ranks on the one GPU)."""
    s = ctx.sizes
    _ensure_data(ctx)
    name = "two_ranks"
    run_dir = ctx.out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [*_train_overrides(ctx, network=s.two_rank_network, exp_name=name, epochs=1),
                 f"data.batch_size={s.two_rank_batch}"]
    env = _subprocess_env(ctx, FACECOMPAT_DIST_BACKEND="gloo")
    seconds = _train(ctx, "train_two_ranks", "synthetic_old.yaml", overrides, 2, env=env)
    log = (run_dir / "train.log").read_text(errors="replace") if (run_dir / "train.log").is_file() else ""
    result = {"seconds": round(seconds, 1), "backend": "gloo", "network": s.two_rank_network,
              "world_size_2_logged": "world size 2" in log, "steps": _checkpoint_step(run_dir)}
    result["summary"] = f"{result['steps']} step(s) of 2 ranks, gloo, in {seconds:.0f} s"
    if not result["world_size_2_logged"]:
        raise CheckFailed(f"{run_dir / 'train.log'} does not say 'world size 2'", result)
    return result


def step_gpu_tests(ctx: CheckContext) -> dict:
    """``FACECOMPAT_TEST_GPU=1 python -m pytest -q -m gpu -p no:cacheprovider tests`` in the repo."""
    if not ctx.cuda:
        raise StepSkipped("CUDA only (the gpu-marked tests need a GPU)")
    args = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    status, text, seconds = _run_logged(ctx, "gpu_tests", args, cap_s=300,
                                        env=_subprocess_env(ctx, FACECOMPAT_TEST_GPU="1"))
    result = {"exit": status, "seconds": round(seconds, 1), "summary": _last_lines(text)}
    if status == 5:
        raise StepSkipped("no gpu-marked test was collected", result)
    if status != 0:
        raise CheckFailed(f"pytest exit {status}: {_last_lines(text)}", result)
    return result
