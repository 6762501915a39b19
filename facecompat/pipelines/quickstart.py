"""The main job end to end on generated data, stage by stage; a finished stage is skipped next time.

    results = run_quickstart("work_dirs/quickstart")          # size "auto": small on CPU, large on GPU
    report = json.load(open("work_dirs/quickstart/report.json"))

Sizes (tiny, small, large) are YAML files, ``<config_dir>/quickstart_<size>.yaml``, read strictly
into :class:`Size` (an unknown key is a one-line ConfigError naming the file and the key).

Stages (``STAGES``, in order):

1. ``data``: render the synthetic training rec, the IJB-C-style folder and lfw.bin.
2. ``old``: the old model on the OPclass old part (30% of the identities).
3. ``new``: the independent new model on the other 70%, no compatibility loss.
4. ``bct``, ``l2``, ``mixbct``: the new model's recipe with each backward-compatible loss; the first
   extracts the old model's feature bank of the new part, the others reuse it.
5. ``side``: FCT's side-information model (self-supervised, on the old part).
6. ``fct``: FCT's transformation h(old, side) -> new on cached features of the new part.
7. ``evaluate``: IJB-C-style 1:1 and 1:N, every self and cross cell of old/new/bct/l2/mixbct and the
   new model against the FCT-upgraded gallery; ECC verdicts and update gains
   (:func:`facecompat.pipelines.evaluate.evaluate_ijb`, the pipeline of ``tools/eval_ijbc.py``).
8. ``backfill``: the FCT-upgraded gallery re-embedded with the new model in three orders (and the old
   gallery in random order, for reference).
9. ``report``: ``report.json`` (DESIGN §8), ``report.md``, ``roc.png``, ``backfill.png``.

``<work_dir>/stages.json`` records every finished stage; a stage whose outputs are gone is redone
with everything after it; ``force`` redoes every stage, ``redo_from`` a stage and those after it.
On CUDA the trainings use their ``auto`` settings (DALI, bf16) and the "large" sizes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from facecompat.cli import resolve_device
from facecompat.compat.build import resolve_params
from facecompat.compat.fct import load_fct_config
from facecompat.compat.registry import get_method
from facecompat.config import ConfigError, from_dict, load_config, load_yaml
from facecompat.data.synthetic.sets import SyntheticSpec, generate_synthetic, read_manifest
from facecompat.eval import ijb, matrix
from facecompat.eval.catalog import EvalCatalog, EvalModelConfig
from facecompat.eval.extract import read_face_list
from facecompat.eval.features import model_features, resolve_models
from facecompat.eval.ijb import find_target_dir
from facecompat.eval.report import build_report, format_report
from facecompat.fileio import atomic_write
from facecompat.index import backfill
from facecompat.pipelines.evaluate import evaluate_ijb
from facecompat.train import train
from facecompat.train.fct import train_transformation

Stage = Callable[["QuickstartContext"], dict]
MODELS = ("old", "new", "bct", "l2", "mixbct")  # the models that embed images, in report order
CANDIDATES = ("new", "bct", "l2", "mixbct", "fct")  # what is judged against the old gallery
CATALOG_NAME = "eval_catalog.yaml"  # the evaluation catalog of its models, written with the report
DESCRIPTIONS = {
    "old": "old model (30% of the identities)",
    "new": "independent new model (other 70%)",
    "bct": "new + BCT (old classifier on new embeddings)",
    "l2": "new + L2 to the old features",
    "mixbct": "new + MixBCT (credible old features mixed into the batch)",
    "fct": "old gallery upgraded by FCT's h(old, side-info)",
    "side": "FCT side-information model (self-supervised)",
}


@dataclass(frozen=True)
class Size:
    """How big every part of the quickstart is (``configs/quickstart_<size>.yaml``)."""

    data: dict[str, Any]  # facecompat.data.synthetic.sets.SyntheticSpec fields
    network: str  # the new models' backbone
    embedding_size: int
    batch_size: int  # per training step
    epochs: dict[str, int]  # old, new, side, fct; bct, l2, mixbct default to new's
    lr: float = 0.1
    random_runs: int = 3  # random backfill orders averaged
    fractions: tuple[float, ...] = tuple(i / 10 for i in range(11))
    extra: tuple[str, ...] = ()  # further training overrides
    eval_batch: int = 128
    old_network: str | None = None  # the old and side-information models' backbone (default: network)
    stage_extra: dict[str, tuple[str, ...]] = field(default_factory=dict)  # overrides of one training

    def epochs_of(self, stage: str) -> int:
        return self.epochs.get(stage, self.epochs["new"])


SIZE_NAMES = ("tiny", "small", "large")  # configs/quickstart_<name>.yaml
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # this checkout's configs/


def size_file(name: str, config_dir: str | os.PathLike = DEFAULT_CONFIG_DIR) -> Path:
    return Path(config_dir) / f"quickstart_{name}.yaml"


def load_size(path: str | os.PathLike) -> Size:
    """A size file, strictly: an unknown key or a wrong type (also among the ``data`` fields, those of
    SyntheticSpec) is a one-line ConfigError naming the file and the key."""
    size = load_yaml(Size, path)
    from_dict(SyntheticSpec, size.data, os.fspath(path), prefix="data")  # checks the keys, kept as written
    if "new" not in size.epochs:
        raise ConfigError(f"{os.fspath(path)}: epochs.new: required (the stages not named train as many)")
    return size


class _SizeFiles(Mapping[str, Size]):
    """``SIZES[name]``: the size file of this checkout's configs/, read when first asked for."""

    def __init__(self, config_dir: Path) -> None:
        self._dir, self._read = config_dir, {}

    def __getitem__(self, name: str) -> Size:
        if name not in SIZE_NAMES:
            raise KeyError(name)
        if name not in self._read:
            self._read[name] = load_size(size_file(name, self._dir))
        return self._read[name]

    def __iter__(self) -> Iterator[str]:
        return iter(SIZE_NAMES)

    def __len__(self) -> int:
        return len(SIZE_NAMES)


SIZES: Mapping[str, Size] = _SizeFiles(DEFAULT_CONFIG_DIR)


@dataclass(frozen=True)
class QuickstartContext:
    work_dir: Path
    size: Size
    workers: int | None
    progress: bool
    force: bool = False
    config_dir: Path = Path("configs")  # where synthetic_*.yaml are
    device: str | None = None  # None: cuda when available
    log: Callable[[str], None] = print
    results: dict = field(default_factory=dict)  # earlier stages' results

    @property
    def on_gpu(self) -> bool:
        import torch

        return torch.device(self.device).type == "cuda" if self.device else torch.cuda.is_available()

    @property
    def data_dir(self) -> Path:
        return self.work_dir / "data"

    @property
    def runs(self) -> Path:
        return self.work_dir / "runs"

    @property
    def eval_dir(self) -> Path:
        return self.work_dir / "eval"


# ------------------------------------------------------------------------------------------- stages
def stage_data(ctx: QuickstartContext) -> dict:

    spec = SyntheticSpec(**ctx.size.data)
    there = read_manifest(ctx.data_dir) if ctx.data_dir.is_dir() else None
    other = there is not None and there.get("spec") != spec.to_dict()  # another size's data: ours to replace
    manifest, _ = generate_synthetic(ctx.data_dir, spec, ctx.workers, force=ctx.force or other,
                                     progress=ctx.progress)
    return {**manifest["counts"], "outputs": [str(ctx.data_dir / "manifest.json")]}


def _training_overrides(ctx: QuickstartContext, name: str, epochs: int) -> list[str]:
    size = ctx.size
    network = (size.old_network or size.network) if name in ("old", "side") else size.network
    return [f"data.rec={ctx.data_dir / 'train'}", f"data.val_dir={ctx.data_dir}",
            f"data.batch_size={size.batch_size}", f"model.network={network}",
            f"model.embedding_size={size.embedding_size}", f"optim.lr={size.lr}",
            f"train.output={ctx.runs}", f"train.exp_name={name}", f"train.epochs={epochs}",
            # lfw once, at the end (the trainer always verifies last when val_every > 0)
            "train.val_every=1000000", f"compat.old.checkpoint={ctx.runs / 'old'}",
            # the synthetic recipes pin the CPU settings; on a GPU: DALI decode and bf16 autocast
            *(["data.loader=auto", "model.precision=auto"] if ctx.on_gpu else []),
            *size.extra, *size.stage_extra.get(name, ())]


def train_model(ctx: QuickstartContext, name: str, config: str, epochs: int) -> dict:
    """Train ``<config_dir>/<config>`` on the quickstart's data into ``<work_dir>/runs/<name>``."""

    cfg = load_config(ctx.config_dir / config, _training_overrides(ctx, name, epochs))
    summary = train(cfg, ctx.runs / name, device=ctx.device)  # resumes an interrupted run
    return {"network": cfg.model.network, "steps": summary["step"], "loss": round(summary["loss"], 4),
            **{f"{k}_accuracy": round(v, 4) for k, v in summary["verification"].items()},
            "model": str(summary["model"]), "outputs": [str(summary["model"])]}


# training stage -> its recipe in config_dir
RECIPES = {"old": "synthetic_old.yaml", "new": "synthetic_new.yaml", "bct": "synthetic_bct.yaml",
           "l2": "synthetic_l2.yaml", "mixbct": "synthetic_mixbct.yaml",
           "side": "synthetic_fct_sideinfo.yaml"}
FCT_RECIPE = "synthetic_fct.yaml"


def variants(size: Size) -> dict[str, list[str]]:
    """``{stage: ["key=value", ...]}``: the method settings a size changes from its recipe (e.g. the
    quickstart's MixBCT runs α 0.5 with centres at the old class means, not the paper's α 0.3), so
    every table that shows the model's numbers names the variant that made them."""
    return {name: [e.removeprefix("compat.params.") for e in extra if e.startswith("compat.params.")]
            for name, extra in size.stage_extra.items()
            if any(e.startswith("compat.params.") for e in extra)}


def describe_models(size: Size) -> dict[str, str]:
    """:data:`DESCRIPTIONS`, each variant named with what it changes and the recipe it changes."""
    out = dict(DESCRIPTIONS)
    for name, params in variants(size).items():
        out[name] += f"; variant: {', '.join(params)} (recipe {RECIPES[name]} otherwise)"
    return out


def _trainer(name: str) -> Stage:
    def stage(ctx: QuickstartContext) -> dict:
        return train_model(ctx, name, RECIPES[name], ctx.size.epochs_of(name))

    stage.__name__ = f"stage_{name}"
    return stage


def _fct_config(ctx: QuickstartContext):

    overrides = [f"data.rec={ctx.data_dir / 'train'}", f"old.checkpoint={ctx.runs / 'old'}",
                 f"side.checkpoint={ctx.runs / 'side'}", f"new.checkpoint={ctx.runs / 'new'}",
                 f"output={ctx.runs / 'fct'}", f"bank_root={ctx.runs}",
                 f"train.epochs={ctx.size.epochs_of('fct')}"]
    return load_fct_config(ctx.config_dir / FCT_RECIPE, overrides)


def check_recipes(ctx: QuickstartContext) -> None:
    """Read every recipe with the quickstart's overrides before anything runs: a broken or missing
    config fails in the first second (ConfigError / OSError naming the file and key), not after
    minutes of training."""

    for name, config in RECIPES.items():
        path = ctx.config_dir / config
        cfg = load_config(path, _training_overrides(ctx, name, ctx.size.epochs_of(name)))
        if cfg.compat.method != "none":
            try:
                resolve_params(cfg.compat.method, get_method(cfg.compat.method).defaults, cfg.compat.params)
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
    _fct_config(ctx)


def stage_fct(ctx: QuickstartContext) -> dict:

    out = ctx.runs / "fct"
    cfg = _fct_config(ctx)
    summary = train_transformation(cfg, device=ctx.device, log=logging.getLogger("facecompat.fct"),
                                   progress=ctx.progress)
    fit = summary["fit"].get("held_out", summary["fit"]["train"])
    return {"rows": summary["data"]["rows"], "steps": summary["training"]["steps"],
            "cos_h_new": round(fit["cos"], 4), "cos_old_new": round(fit["cos_old"], 4),
            "outputs": [str(out / "transform.pt")]}


def _catalog(ctx: QuickstartContext):

    models = {name: EvalModelConfig(path=str(ctx.runs / name)) for name in (*MODELS, "side")}
    models["fct"] = EvalModelConfig(transform=str(ctx.runs / "fct"))
    return EvalCatalog(data_root=str(ctx.data_dir), target="IJBC", cache_dir=str(ctx.eval_dir),
                       batch_size=ctx.size.eval_batch, num_workers=2 if ctx.workers is None else ctx.workers,
                       models=models)


def _features(ctx: QuickstartContext, names: list[str], uncertainty: dict | None = None) -> dict:

    catalog = _catalog(ctx)
    ijb_dir = find_target_dir(catalog.data_root, catalog.target)
    specs = resolve_models(names, catalog)
    faces = read_face_list(ijb_dir, catalog.target)
    return model_features(specs, catalog, ijb_dir, catalog.target, faces, device=resolve_device(ctx.device),
                          log=ctx.log, uncertainty=uncertainty)


def _meta(ctx: QuickstartContext):

    return ijb.load_ijb_meta(ctx.data_dir, "IJBC", cache_dir=ctx.eval_dir)


def _cells() -> list[tuple[str, str]]:

    return [*matrix.matrix_cells(list(MODELS)), ("new", "fct")]


def stage_evaluate(ctx: QuickstartContext) -> dict:
    """Every self and cross cell, 1:1 and 1:N; writes ``eval/results.json`` and ``roc.png``.

    Verdicts by the certificate's rules (:func:`facecompat.pipelines.evaluate.judge`): new/bct/l2/mixbct
    against the old gallery, and the FCT-upgraded gallery (cross test new|fct, the new model's queries
    against the old gallery after h), at every FAR the set resolves with subject-bootstrap intervals; the
    decision at the smallest resolved FAR needs 1:1 and 1:N (rank-1, G1 and G2 pooled) alike."""

    ev = evaluate_ijb(_catalog(ctx), [*MODELS, "fct"], cells=_cells(), old="old", independent="new",
                      candidates=list(CANDIDATES), cross_cells={"fct": "new|fct"},
                      device=resolve_device(ctx.device), log=ctx.log)
    shown = ["old|old", "new|new", "new|old", "bct|old", "l2|old", "mixbct|old", "new|fct"]
    roc = matrix.plot_roc({k: ev.curves[k] for k in shown}, ctx.work_dir / "roc.png",
                          f"IJB-C-style 1:1: query|gallery ({ev.impostor_pairs} impostor pairs)")
    out = {"matrix": ev.results, **ev.verdicts, "pairs": ev.pairs, "impostor_pairs": ev.impostor_pairs}
    path = ctx.eval_dir / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        json.dump(out, f, indent=1)
    return {"cells": len(ev.results), "ecc_fars": ev.verdicts["ecc_fars"], "ecc": ev.verdicts["ecc"],
            "outputs": [str(path), str(roc)]}


def stage_backfill(ctx: QuickstartContext) -> dict:
    """The FCT-upgraded gallery backfilled with the new model (random, uncertainty, distance order),
    and the old gallery in random order: 1:N metrics per backfilled fraction; ``backfill.png``."""

    meta = _meta(ctx)
    uncertainty: dict = {}
    feats = _features(ctx, ["new", "old", "fct"], uncertainty)
    fractions = backfill.check_fractions(ctx.size.fractions)
    query = ijb.pool(meta, np.asarray(feats["new"]))
    kinds = ["random", "distance"] + (["uncertainty"] if "fct" in uncertainty else [])

    def curves(stored: np.ndarray, orderings: list[str]) -> dict:
        found = backfill.ordering_curves(meta, query, stored, feats["new"], orderings, fractions,
                                         uncertainty=uncertainty.get("fct"), random_runs=ctx.size.random_runs)
        return {name: {k: c[k] for k in ("fractions", "metric", "area", "area_sd") if k in c}
                for name, c in found.items()}

    fct, old = curves(feats["fct"], kinds), curves(feats["old"], ["random"])
    out = {"stored": "fct", "query": "new", "orderings": fct, "baseline": {"stored": "old", "orderings": old},
           "num_items": int(backfill.gallery_items(meta).size)}
    path = ctx.eval_dir / "backfill.json"
    with atomic_write(path, "w") as f:
        json.dump(out, f, indent=1)
    plot = backfill.plot_backfill({**{f"fct, {k}": v for k, v in fct.items()}, "old, random": old["random"]},
                                  ctx.work_dir / "backfill.png", "rank1",
                                  title="IJB-C-style 1:N: gallery re-embedded with the new model")
    return {"orderings": sorted(fct), "area_rank1": {k: round(v["area"]["rank1"], 4) for k, v in fct.items()},
            "outputs": [str(path), str(plot)]}


def stage_report(ctx: QuickstartContext) -> dict:

    evaluation = json.loads((ctx.eval_dir / "results.json").read_text())
    filled = json.loads((ctx.eval_dir / "backfill.json").read_text())
    report = build_report(ctx.results, evaluation, filled, size=ctx.size,
                          descriptions=describe_models(ctx.size), variants=variants(ctx.size))
    paths = [ctx.work_dir / "report.json", ctx.work_dir / "report.md", ctx.work_dir / CATALOG_NAME]
    texts = (json.dumps(report, indent=1) + "\n", format_report(report), catalog_yaml(ctx))
    for path, text in zip(paths, texts):
        with atomic_write(path, "w") as f:
            f.write(text)
    return {"ecc": report["ecc"], "outputs": [str(p) for p in paths]}


def catalog_yaml(ctx: QuickstartContext) -> str:
    """The evaluation catalog of the quickstart's models (absolute paths), so the mission's own commands
    run on its outputs: :func:`next_commands`."""
    catalog = _catalog(ctx)
    models = {name: ({"transform": str(Path(m.transform).resolve())} if m.transform else
                     {"path": str(Path(m.path).resolve())}) for name, m in catalog.models.items()}
    tree = {"data_root": str(Path(catalog.data_root).resolve()), "target": catalog.target,
            "cache_dir": str(Path(catalog.cache_dir).resolve()), "batch_size": catalog.batch_size,
            "num_workers": catalog.num_workers, "models": models}
    return ("# Written by the quickstart: its models by name, for tools/eval_ijbc.py and tools/certify.py\n"
            + yaml.safe_dump(tree, sort_keys=False))


def next_commands(work_dir: str | os.PathLike) -> list[str]:
    """What to run next on a finished quickstart: the cross test and the certificate of its models."""
    catalog = Path(work_dir) / CATALOG_NAME
    return [f"python tools/eval_ijbc.py --config {catalog} --query new --gallery old",
            f"python tools/certify.py --config {catalog} --old old --new {','.join(CANDIDATES)} "
            f"--independent new --out {Path(work_dir) / 'certificate'}"]


STAGES: dict[str, Stage] = {
    "data": stage_data,
    **{name: _trainer(name) for name in ("old", "new", "bct", "l2", "mixbct", "side")},
    "fct": stage_fct,
    "evaluate": stage_evaluate,
    "backfill": stage_backfill,
    "report": stage_report,
}


# -------------------------------------------------------------------------------------------- driver
def pick_size(size: str) -> str:
    """``auto`` -> ``large`` when CUDA is available, else ``small``."""
    if size == "auto":
        import torch

        return "large" if torch.cuda.is_available() else "small"
    if size not in SIZE_NAMES:
        raise ConfigError(f"--size {size!r}: choose among auto, {', '.join(SIZE_NAMES)}")
    return size


def _done(result: dict | None) -> bool:
    return result is not None and all(Path(p).exists() for p in result.get("outputs", []))


def run_quickstart(work_dir: str | os.PathLike, *, size: str = "auto", force: bool = False,
                   redo_from: str | None = None, workers: int | None = None, progress: bool = True,
                   device: str | None = None, config_dir: str | os.PathLike = "configs",
                   log: Callable[[str], None] = print) -> dict:
    """Run every stage not yet done; returns ``{"size": name, "stages": {stage: result}}``.

    A stage is redone when it never finished, its outputs are gone, an earlier stage was redone,
    the size changed, ``force`` is set or it is ``redo_from`` or later.
    """
    size = pick_size(size)
    if redo_from is not None and redo_from not in STAGES:
        raise ConfigError(f"--from {redo_from!r}: choose among {', '.join(STAGES)}")
    spec = load_size(size_file(size, config_dir))
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    state_path = work_dir / "stages.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if force or state.get("size") != size:
        state = {}
    state["size"] = size
    done = state.setdefault("stages", {})
    ctx = QuickstartContext(work_dir, spec, workers, progress, force, Path(config_dir), device, log, done)
    check_recipes(ctx)
    redo = fresh = False
    for name, stage in STAGES.items():
        redo = redo or name == redo_from or not _done(done.get(name))
        if not redo:
            took = done[name].get("seconds", 0)
            log(f"[quickstart] {name}: done before ({took:.0f} s; --from {name} redoes it)")
            continue
        # An interrupted stage resumes (trainings continue from their last checkpoint); one redone
        # because it or an earlier stage was redone starts afresh.
        fresh = fresh or force or name in done or name == redo_from
        if fresh and (ctx.runs / name).is_dir():
            shutil.rmtree(ctx.runs / name)
        log(f"[quickstart] {name} ...")
        done.pop(name, None)
        start = time.perf_counter()
        done[name] = {**stage(ctx), "seconds": round(time.perf_counter() - start, 1)}
        with atomic_write(state_path, "w") as f:
            json.dump(state, f, indent=1)
        fresh = True
    return state
