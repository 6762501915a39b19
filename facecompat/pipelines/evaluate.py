"""The IJB-C / IJB-B evaluation pipeline shared by ``tools/eval_ijbc.py`` and the quickstart.

    ev = evaluate_ijb(catalog, ["old", "new", "bct"], old="old", independent="new")
    ev.results["bct|old"]["1:1"]["tar_at_far"], ev.verdicts["ecc"], print(ev.tables(["old", "new", "bct"]))

One function, :func:`evaluate_ijb`: the meta files (parsed on rank 0 before the long extraction),
features of every model (cached, split over the torchrun ranks) or precomputed feature files,
pooling, every query x gallery cell (1:1 and 1:N), then the verdict policy: ECC verdicts and update
gains of the candidates against the old gallery (DESIGN §5), by the certificate's rules
(:mod:`facecompat.eval.certificate`): every resolved FAR judged with a subject-bootstrap interval,
"too close to call" when the margin's interval holds 0, unresolved FARs listed and never judged, the
decision at the operating FAR (the smallest resolved) needing 1:1 and 1:N alike. ``tools/eval_ijbc.py``,
the quickstart's report and ``tools/certify.py`` read the same figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facecompat import dist
from facecompat.errors import UserError
from facecompat.eval import ijb, matrix, metrics
from facecompat.eval.bootstrap import MIN_FALSE_ACCEPTS
from facecompat.eval.catalog import EvalCatalog
from facecompat.eval.certificate import CERTIFICATE_FARS, certify_cells
from facecompat.eval.extract import read_face_list
from facecompat.eval.features import model_features, resolve_models

Log = Callable[[str], None]


class EvalError(UserError, ValueError):
    """Bad evaluation input (features, models, meta files), reported in one line."""


@dataclass
class Evaluation:
    """What :func:`evaluate_ijb` found (rank 0).

    Attributes:
        target: IJBC or IJBB. data_root: the folder holding it.
        names: the models (or feature files' stems), in the order given.
        cells: the (query, gallery) cells evaluated, the requested one first.
        results: ``{"A|B": {"1:1": ..., "1:N": ...}}`` (:func:`facecompat.eval.matrix.evaluate_cells`).
        curves: the 1:1 ROC curves of each cell.
        verdicts: ``ecc``, ``ecc_detail``, ``update_gain``, ... (empty when nothing was judged);
            ``ecc_search`` where the set has 1:N; ``certificate``: the figures behind them.
        models: per name its source, network, embedding size and weights, or its feature file.
        skipped: what ``allow_missing`` skipped, counted.
        pairs, impostor_pairs: 1:1 pairs evaluated, impostors among them.
        meta, pooled: the meta (missing faces dropped) and every model's pooled templates, kept when
            asked (``keep_pooled``: the certificate reads them).
    """

    target: str
    data_root: str
    names: list[str]
    cells: list[tuple[str, str]]
    results: dict
    curves: dict
    verdicts: dict
    models: dict
    skipped: dict
    pairs: int
    impostor_pairs: int
    meta: ijb.IJBMeta | None = None
    pooled: dict[str, ijb.Pooled] | None = None

    def to_dict(self) -> dict:
        """The tool's JSON: the first cell at the top, every cell under ``matrix``, the verdicts."""
        first = matrix.cell_key(*self.cells[0])
        return {"target": self.target, "data_root": self.data_root, "models": self.models,
                "skipped": self.skipped, "query": self.cells[0][0], "gallery": self.cells[0][1],
                **self.results[first], "matrix": self.results, **self.verdicts}

    def tables(self, matrix_names: Sequence[str] | None = None) -> str:
        """Every cell's row, the query x gallery table of ``matrix_names``, the verdicts."""
        resolved = [f for f in metrics.DEFAULT_FARS if self.impostor_pairs * f >= MIN_FALSE_ACCEPTS]
        parts = [matrix.format_cells(self.results, self.target, resolved)]
        hidden = [f for f in metrics.DEFAULT_FARS if f not in resolved]
        if hidden and any("1:1" in c for c in self.results.values()):
            fars = ", ".join(f"{f:g}" for f in hidden)
            parts[0] += (f"\nnot shown: FAR {fars} ({self.impostor_pairs} impostor pairs give fewer than "
                         f"{MIN_FALSE_ACCEPTS} false accepts there; the JSON has every FAR)")
        if matrix_names:
            parts.append(matrix.format_matrix(self.results, list(matrix_names), self.target))
        if self.verdicts.get("ecc_detail"):
            parts.append(matrix.format_verdicts(self.verdicts))
        return "\n\n".join(parts)


def load_features(path: Path, num_faces: int, what: str) -> np.ndarray:
    """A precomputed ``[faces, dim]`` float .npy in face-list order; EvalError naming the file."""
    if not path.is_file():
        raise EvalError(f"{path}: {what} features not found")
    try:
        feats = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise EvalError(f"{path}: cannot read {what} features as .npy ({exc})") from None
    if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.floating):
        raise EvalError(f"{path}: {what} features must be a 2-D float array [faces, dim], got "
                        f"{feats.dtype} {tuple(feats.shape)}")
    if feats.shape[0] != num_faces:
        raise EvalError(f"{path}: {feats.shape[0]} {what} feature rows, the face list has {num_faces} faces "
                        "(rows follow meta/*_name_5pts_score.txt)")
    return feats


def _specs(names: Sequence[str], catalog: EvalCatalog, catalog_source: str, network: str | None) -> dict:
    try:
        return resolve_models(names, catalog, catalog_source, network)
    except UserError:
        raise
    except (ValueError, OSError) as exc:  # what is not a UserError yet: models of mixed sizes
        raise EvalError(str(exc)) from None


def _load_meta(ijb_dir: Path, target: str, allow_missing: bool, cache_dir: Path) -> ijb.IJBMeta | None:
    """The meta files, parsed on rank 0 before the long extraction; every rank learns if it failed."""
    rank, world = dist.get_rank(), dist.get_world_size()
    meta, problem = None, None
    if rank == 0:
        try:
            meta = ijb.load_ijb_meta(ijb_dir, target, allow_missing=allow_missing, cache_dir=cache_dir)
        except ijb.IJBMetaError as exc:
            problem = str(exc)
    if world > 1:
        problem = dist.broadcast_object(problem)
    if problem is not None:
        raise EvalError(problem if rank == 0 else "meta files failed on rank 0")
    return meta


def judge(meta: ijb.IJBMeta, pooled: Mapping[str, ijb.Pooled], names: Sequence[str], *, old: str | None,
          independent: str | None, candidates: Sequence[str] | None, fars: Sequence[float] | None,
          far: float | None = None, transforms: Sequence[str] = (),
          cross_cells: Mapping[str, str] | None = None,
          replicates: int = 1000, seed: int = 0, use_faiss: bool = True, log: Log = print) -> dict:
    """The verdict policy, the certificate's (:mod:`facecompat.eval.certificate`): ``candidates``
    (default: every model but ``old``; a gallery transformation only with ``independent``) against the
    ``old`` gallery,
    at every FAR of ``fars`` the set resolves, with subject-bootstrap intervals; ``ecc`` is the 1:1
    verdict at the operating FAR (``far``, default the smallest resolved): True, False, or None when
    too close to call; ``decision`` also needs 1:N rank-1. A transformation's cross cell is
    ``<independent>|<transform>``. No verdicts (``{}``) when ``old`` is None or was not evaluated.

    Returns:
        ``{"old", "independent", "ecc_fars": [operating far key], "fars": [resolved far keys],
        "unresolved_fars": {key: why}, "ecc": {m: bool | None}, "ecc_detail": {m: {far_key: {"cross",
        "old", "holds", "margin", "margin_ci"}}}, "update_gain", "update_gain_ci", "cross_cell",
        "ecc_search": {m: {"cell", "cross", "old", "holds", "margin", "margin_ci"}}, "decision",
        "certificate"}`` with FAR keys as :func:`metrics.far_key` writes them (``"1e-03"``).
    """
    if old is None:
        return {}
    if old not in names:
        log(f"no ECC verdicts: --old {old} is not in --matrix")
        return {}
    if candidates is None:  # a transformation is judged through the independent new model's queries
        candidates = [n for n in names if n != old and (n not in transforms or independent in names)]
        skipped = [n for n in transforms if n not in candidates]
        if skipped:
            log(f"not judged: {', '.join(skipped)} (a gallery transformation is judged by the new model's "
                "queries: give --independent)")
    impostors = int((~meta.pair_labels.astype(bool)).sum())
    fars = list(fars or CERTIFICATE_FARS)
    if far is None and not any(impostors * f >= MIN_FALSE_ACCEPTS for f in fars):
        log(f"no ECC verdicts: {impostors} impostor pairs resolve none of FAR "
            f"{', '.join(f'{f:g}' for f in fars)} (at least {MIN_FALSE_ACCEPTS} false accepts are needed)")
        return {}
    independent = independent if independent in names else None
    cross = dict(cross_cells or {})
    after = {}
    for c in candidates:
        if c in transforms and independent is not None:
            cross.setdefault(c, matrix.cell_key(independent, c))
            after[c] = matrix.cell_key(independent, independent)
    cert = certify_cells(meta, pooled, old=old, candidates=list(candidates), independent=independent,
                         cross_cells=cross, new_cells=after, fars=fars, far=far,
                         replicates=replicates, seed=seed, use_faiss=use_faiss)
    return verdicts_from_certificate(cert, independent)


def verdicts_from_certificate(cert: Mapping, independent: str | None) -> dict:
    """The evaluation's verdict keys (see :func:`judge`) read from a certificate's figures."""
    def key(label: str) -> str:
        return metrics.far_key(float(label))

    old, op = cert["old"], cert["operating_far"]
    ref = cert["cells"][matrix.cell_key(old, old)]
    out: dict = {"old": old, "independent": independent, "ecc_fars": [key(op)],
                 "fars": [key(f) for f in cert["test_set"]["resolved_fars"]],
                 "unresolved_fars": {key(f): e["unresolved"] for f, e in ref["1:1"].items()
                                     if "unresolved" in e},
                 "ecc": {}, "ecc_detail": {}, "update_gain": {}, "update_gain_ci": {}, "cross_cell": {},
                 "decision": {}, "certificate": cert}
    search = {}
    for c in cert["candidates"]:
        cell = cert["cross_cells"][c]
        verdicts = cert["verdicts"][c]
        out["cross_cell"][c] = cell
        out["ecc_detail"][c] = {
            key(f): {"cross": cert["cells"][cell]["1:1"][f]["tar"], "old": ref["1:1"][f]["tar"],
                     "holds": v["ecc"], "margin": v["margin"], "margin_ci": v["margin_ci"]}
            for f, v in verdicts.items() if f != "1:N" and "unresolved" not in v}
        out["ecc"][c] = verdicts[op]["ecc"]
        out["update_gain"][c] = verdicts[op].get("update_gain")
        out["update_gain_ci"][c] = verdicts[op].get("update_gain_ci")
        out["decision"][c] = cert["decision"][c]["decision"]
        if "1:N" in verdicts:
            v = verdicts["1:N"]
            search[c] = {"cell": cell, "cross": cert["cells"][cell]["1:N"]["rank1"],
                         "old": ref["1:N"]["rank1"], "holds": v["ecc"], "margin": v["margin"],
                         "margin_ci": v["margin_ci"]}
    if search:
        out["ecc_search"] = search
    return out


def evaluate_ijb(catalog: EvalCatalog, models: Sequence[str] = (), *,
                 features: Mapping[str, Path] | None = None,
                 cells: Sequence[tuple[str, str]] | None = None,
                 old: str | None = "old", independent: str | None = "new",
                 candidates: Sequence[str] | None = None, cross_cells: Mapping[str, str] | None = None,
                 ecc_fars: Sequence[float] | None = None, far: float | None = None,
                 replicates: int = 1000, seed: int = 0,
                 data_root: str | Path | None = None, target: str | None = None,
                 cache_dir: Path | None = None, catalog_source: str = "the catalog",
                 network: str | None = None, one_to_one: bool = True, one_to_n: bool = True,
                 use_faiss: bool = True, allow_missing: bool = False, batch_size: int | None = None,
                 workers: int | None = None, device: Any = None, scores_dir: Path | None = None,
                 keep_pooled: bool = False, log: Log = print) -> Evaluation | None:
    """Evaluate ``models`` (catalog names or paths) or precomputed ``features`` on IJB-C / IJB-B.

    Args:
        catalog: model catalog and defaults (data_root, target, cache_dir, batch size, workers).
        models: what to extract and evaluate, in order; ignored when ``features`` is given.
        features: ``{name: .npy}`` precomputed face features (flip fused, not score-weighted),
            evaluated on rank 0 alone, instead of ``models``.
        cells: (query, gallery) cells, the headline one first (default: every combination).
        old, independent, candidates, cross_cells: the verdicts (:func:`judge`); ``old=None``: none.
        ecc_fars: the FARs verdicts are reported at (None: 1e-6 .. 1e-1); those the set cannot resolve
            are listed as unresolved, never judged.
        far: the operating FAR of ``ecc`` and ``decision`` (None: the smallest resolved).
        replicates, seed: the subject bootstrap of the verdicts' intervals.
        data_root, target, cache_dir: override the catalog's.
        network: backbone of a weights-file model given by path.
        one_to_one, one_to_n: which protocols (1:N only when the meta files have it).
        allow_missing: skip and count missing faces, images, pairs and templates.
        batch_size, workers, device: extraction (None: the catalog's / cuda when available).
        scores_dir: write per-pair 1:1 scores there.
        keep_pooled: keep the meta and the pooled templates in the result (``Evaluation.meta``/``pooled``).

    Returns:
        The :class:`Evaluation` on rank 0, None on the other ranks.

    Raises:
        UserError (EvalError, IJBMetaError, ExtractError, ConfigError, WeightsError, ...): one line.
    """
    target = target or catalog.target
    data_root = Path(data_root or catalog.data_root)
    ijb_dir = ijb.find_target_dir(data_root, target)  # IJBMetaError naming the folder looked at
    names = list(features) if features is not None else list(models)
    cells = list(cells) if cells is not None else matrix.matrix_cells(names)
    meta = _load_meta(ijb_dir, target, allow_missing, cache_dir or Path(catalog.cache_dir))
    specs: dict = {}
    missing_rows = np.zeros(0, np.int64)
    if features is not None:
        if dist.get_rank() != 0:  # nothing to extract: rank 0 evaluates alone
            return None
        roles = ("query", "gallery") if len(features) <= 2 else tuple(features)
        feats = {n: load_features(Path(p), meta.num_faces, what)
                 for (n, p), what in zip(features.items(), roles)}
        dims = {n: f.shape[1] for n, f in feats.items()}
        for q, g in cells:
            if dims[q] != dims[g]:
                raise EvalError(f"{features[q]}: {q} features are {dims[q]}-d, {features[g]}: {g} features "
                                f"{dims[g]}-d: they cannot be compared (cell {matrix.cell_key(q, g)})")
    else:
        specs = _specs(names, catalog, catalog_source, network)
        faces = read_face_list(ijb_dir, target, allow_missing=allow_missing)
        feats = model_features(specs, catalog, ijb_dir, target, faces, cache_dir=cache_dir,
                               batch_size=batch_size, num_workers=workers, device=device, log=log)
        missing_rows = faces.missing_rows
        if dist.get_rank() != 0:
            return None
        bad = {n: f.shape[0] for n, f in feats.items() if f.shape[0] != meta.num_faces}
        if bad:
            raise EvalError(f"features of {', '.join(bad)} have {sorted(set(bad.values()))} rows, the face "
                            f"list has {meta.num_faces} faces")

    meta, skipped = _drop_missing(meta, missing_rows, log)
    if one_to_n and not meta.has_1n:
        log(f"no 1:N files in {ijb_dir / 'meta'}: 1:1 only")
    one_to_n = one_to_n and meta.has_1n
    if not one_to_one and not one_to_n:
        raise EvalError("nothing to evaluate: --no-1to1 and no 1:N (files missing or --no-1n)")
    pooled = {}
    for name in names:
        start = time.perf_counter()
        pooled[name] = ijb.pool(meta, np.asarray(feats.pop(name)))
        if not np.isfinite(pooled[name].feats).all():
            raise EvalError(f"{specs[name].source if name in specs else name}: features hold NaN or inf")
        log(f"pooled {name}: {pooled[name].templates.size} templates ({time.perf_counter() - start:.1f} s)")
    results, curves = matrix.evaluate_cells(meta, pooled, cells, one_to_one=one_to_one, one_to_n=one_to_n,
                                            use_faiss=use_faiss, scores_dir=scores_dir, progress=log)
    impostors = int((~meta.pair_labels.astype(bool)).sum())
    verdicts: dict = {}
    if one_to_one:
        transforms = [n for n in names if getattr(specs.get(n), "network", None) == "fct"]
        verdicts = judge(meta, pooled, names, old=old, independent=independent, candidates=candidates,
                         fars=ecc_fars, far=far, transforms=transforms, cross_cells=cross_cells,
                         replicates=replicates, seed=seed, use_faiss=use_faiss, log=log)
    described = {n: ({"source": s.source, "network": s.network, "embedding_size": s.embedding_size,
                      "weights": str(s.weights)} if (s := specs.get(n)) else {"features": str(features[n])})
                 for n in names}
    return Evaluation(target, str(data_root), names, list(cells), results, curves, verdicts, described,
                      skipped, int(meta.pair_labels.size), impostors, meta if keep_pooled else None,
                      pooled if keep_pooled else None)


def _drop_missing(meta: ijb.IJBMeta, missing_rows: np.ndarray, log: Log) -> tuple[ijb.IJBMeta, dict]:
    """Faces whose image is missing dropped from ``meta``; every skip (``allow_missing``) counted."""
    skipped = {"faces_not_in_both_face_files": meta.num_missing_faces,
               "pairs_without_faces": meta.num_missing_pairs}
    if missing_rows.size:
        meta, dropped = matrix.drop_faces(meta, missing_rows)
        skipped.update({"images_missing": dropped["faces"], "templates_without_images": dropped["templates"],
                        "pairs_without_images": dropped["pairs"], "probes_without_images": dropped["probes"],
                        "gallery_templates_without_images": dropped["gallery_templates"]})
    if any(skipped.values()):
        counts = [f"{v} {k.replace('_', ' ')}" for k, v in skipped.items() if v]
        log("skipped (--allow-missing): " + ", ".join(counts))
    return meta, skipped
