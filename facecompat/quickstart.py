"""The main job on generated data, stage by stage, each stage skipped when already done.

Stages so far (later stages — BCT, FCT, evaluation, report — append here):

1. ``data``: render the synthetic training rec, IJB-C-style folder and lfw.bin.
2. ``read_back``: read the training set back through the training loader for one epoch (and
   the IJB-C meta files and lfw.bin through their readers) and report what came out.
3. ``train_old``: train the old model (``configs/synthetic_old.yaml``: OPclass old part, 30% of
   the identities) in this process and verify it on lfw.bin.

A stage's result is recorded in ``<work_dir>/stages.json``; ``force`` redoes every stage.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facecompat.config import Config, load_config

Stage = Callable[["QuickstartContext"], dict]


@dataclass(frozen=True)
class QuickstartContext:
    work_dir: Path
    config: Config  # the data config the stages read (configs/synthetic_data.yaml)
    spec: dict  # synthetic sizes
    workers: int | None
    progress: bool
    force: bool = False  # regenerate data even when an identical generation exists
    config_dir: Path = Path("configs")  # where the experiment configs (synthetic_*.yaml) are

    @property
    def data_dir(self) -> Path:
        return self.work_dir / "data"


SIZES = {
    # identities, images per identity, IJB-C subjects, lfw pairs
    "tiny": {"num_ids": 24, "imgs_per_id": (4, 8), "ijbc_subjects": 12, "lfw_pairs": 20},
    "small": {"num_ids": 1000, "imgs_per_id": (10, 30), "ijbc_subjects": 200, "lfw_pairs": 300},
}
# Training overrides per size (the synthetic_* configs hold the rest).
TRAIN_SIZES = {
    "tiny": ["train.epochs=1", "data.batch_size=16", "train.log_every=1", "train.checkpoint_every=0"],
    "small": ["train.epochs=3"],
}


def stage_data(ctx: QuickstartContext) -> dict:
    from facecompat.data.synthetic_sets import SyntheticSpec, generate_synthetic

    manifest, _ = generate_synthetic(ctx.data_dir, SyntheticSpec(**ctx.spec), ctx.workers,
                                     force=ctx.force, progress=ctx.progress)
    return manifest["counts"]


def stage_read_back(ctx: QuickstartContext) -> dict:
    from facecompat.data.faces import FaceRecords
    from facecompat.data.loader import build_loader
    from facecompat.data.pairs_bin import load_pairs_bin

    cfg = ctx.config.data
    records = FaceRecords(ctx.data_dir / "train", flip=cfg.flip, seed=cfg.seed)
    loader = build_loader(records, min(cfg.batch_size, records.num_images), backend=cfg.loader,
                          num_workers=cfg.num_workers, device="cpu")
    loader.set_epoch(0)
    start, seen, labels = time.perf_counter(), [], set()
    for batch in loader:
        assert batch.images.shape[1:] == (3, 112, 112) and float(batch.images.abs().max()) <= 1.0
        seen.append(batch.record_ids.numpy())
        labels.update(batch.labels.tolist())
    elapsed = time.perf_counter() - start
    ids = np.concatenate(seen) if seen else np.zeros(0, np.int64)
    if len(np.unique(ids)) != len(ids):
        raise RuntimeError("the loader returned an image twice in one epoch")
    images, issame = load_pairs_bin(ctx.data_dir / "lfw.bin")
    meta = ctx.data_dir / "IJBC" / "meta"
    faces = sum(1 for _ in (meta / "ijbc_face_tid_mid.txt").open())
    pairs = sum(1 for _ in (meta / "ijbc_template_pair_label.txt").open())
    return {"loader": type(loader).__name__, "steps": len(loader), "images_read": int(ids.size),
            "classes_seen": len(labels), "num_classes": records.num_classes,
            "images_per_s": round(ids.size / max(elapsed, 1e-9), 1),
            "lfw_pairs": int(len(issame)), "ijbc_faces": faces, "ijbc_pairs": pairs}


def train_model(ctx: QuickstartContext, name: str, config: str) -> dict:
    """Train ``configs/<config>`` on the quickstart's data into ``<work_dir>/runs/<name>``."""
    from facecompat.train import train

    size = "tiny" if ctx.spec == SIZES["tiny"] else "small"
    overrides = [f"data.rec={ctx.data_dir / 'train'}", f"data.val_dir={ctx.data_dir}",
                 f"train.output={ctx.work_dir / 'runs'}", f"train.exp_name={name}", *TRAIN_SIZES[size]]
    cfg = load_config(ctx.config_dir / config, overrides)
    run_dir = ctx.work_dir / "runs" / name
    if ctx.force:
        shutil.rmtree(run_dir, ignore_errors=True)  # otherwise an unfinished run resumes
    summary = train(cfg, run_dir)
    return {"network": cfg.model.network, "steps": summary["step"], "loss": round(summary["loss"], 4),
            **{f"{k}_accuracy": round(v, 4) for k, v in summary["verification"].items()},
            "model": summary["model"]}


def stage_train_old(ctx: QuickstartContext) -> dict:
    return train_model(ctx, "old", "synthetic_old.yaml")


STAGES: dict[str, Stage] = {"data": stage_data, "read_back": stage_read_back, "train_old": stage_train_old}


def run_quickstart(work_dir: str | os.PathLike, *, size: str = "small", config: str | os.PathLike =
                   "configs/synthetic_data.yaml", force: bool = False, workers: int | None = None,
                   progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run every stage not yet done; returns {stage: result} for all stages."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ctx = QuickstartContext(work_dir, load_config(config, [f"data.rec={work_dir / 'data' / 'train'}"]),
                            SIZES[size], workers, progress, force, Path(config).parent)
    state_path = work_dir / "stages.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() and not force else {}
    if state.get("size") not in (None, size):
        state = {}  # other sizes: everything is redone
    state["size"] = size
    results = state.setdefault("stages", {})
    for name, stage in STAGES.items():
        if name in results:
            log(f"[quickstart] {name}: done before (--force redoes it)")
            continue
        log(f"[quickstart] {name} ...")
        start = time.perf_counter()
        results[name] = {**stage(ctx), "seconds": round(time.perf_counter() - start, 1)}
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        os.replace(tmp, state_path)
    return results
