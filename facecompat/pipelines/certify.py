"""The upgrade certificate (``tools/certify.py``): evaluate the old model and the candidates on an IJB-C /
IJB-B set, then write ``certificate.json``, ``certificate.md`` and one score plot per candidate.

    cert = certify(catalog, old="old", candidates=["bct", "mixbct"], independent="new", out_dir=Path("cert"))

Features come from :func:`facecompat.pipelines.evaluate.evaluate_ijb` (extracted once per model and
cached, under torchrun split over the ranks), or from precomputed feature files. The figures are
:func:`facecompat.eval.certificate.certify_cells` (verdicts with subject-bootstrap intervals,
thresholds, churn); the JSON also holds the plain evaluation matrix and fingerprints of models and
data. A candidate that is a transformation of the gallery (FCT: ``network == "fct"`` in the catalog)
is queried by ``independent``: its cross cell is ``<independent>|<candidate>``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facecompat.compat.fct import FCTransform
from facecompat.data.protocol_sets import make_bin_protocol, make_face_folder_protocol
from facecompat.eval import ijb, matrix
from facecompat.eval.catalog import EvalCatalog, TransformSpec
from facecompat.eval.certificate import CERTIFICATE_FARS, CertifyError, _cell_scores, certify_cells
from facecompat.eval.certificate_report import format_certificate, plot_scores
from facecompat.eval.extract import read_face_list
from facecompat.eval.features import model_features, resolve_models
from facecompat.eval.parity import model_parity, transform_parity
from facecompat.fileio import atomic_write, file_sha1
from facecompat.index.store import model_version_id, transform_version_id
from facecompat.models.spec import load_model
from facecompat.pipelines.evaluate import Log, evaluate_ijb

FORMAT = "facecompat-certificate"
VERSION = 1
JSON_NAME, MD_NAME = "certificate.json", "certificate.md"


def _cells(names: Sequence[str], old: str, candidates: Sequence[str], independent: str | None,
           transforms: Sequence[str]) -> tuple[list[tuple[str, str]], dict[str, str], dict[str, str]]:
    """(cells to evaluate, candidate -> cross cell, candidate -> cell after a full backfill)."""
    cross, after = {}, {}
    for c in candidates:
        if c in transforms:
            if independent is None:
                raise CertifyError(f"--new {c}: a gallery transformation needs --independent, the new model "
                                   "whose queries search the upgraded gallery")
            cross[c], after[c] = matrix.cell_key(independent, c), matrix.cell_key(independent, independent)
        else:
            cross[c], after[c] = matrix.cell_key(c, old), matrix.cell_key(c, c)
    keys = [matrix.cell_key(old, old), *cross.values(), *after.values()]
    if independent is not None:
        keys.append(matrix.cell_key(independent, independent))
    return [tuple(k.split("|")) for k in dict.fromkeys(keys)], cross, after


def protocol_set(out_dir: Path, *, faces: Path | None = None, landmarks: Path | None = None,
                 bin_path: Path | None = None, seed: int = 0, log: Log = print) -> Path:
    """The team's own labelled faces (``faces/<identity>/<image>``) or a verification ``.bin`` written as
    an IJB-C-style folder under ``out_dir/protocol`` (:mod:`facecompat.data.protocol_sets`: seeded,
    reused on a rerun with the same inputs), the data root the certificate then evaluates."""
    target = out_dir / "protocol"
    if faces is not None:
        made = make_face_folder_protocol(faces, target, landmarks=landmarks, seed=seed)
    else:
        made = make_bin_protocol(bin_path, target)
    log(f"test set: {target} ({'reused' if made.get('reused') else 'written'}; protocol.json records how)")
    return target


def _is_transform(name: str, catalog: EvalCatalog) -> bool:
    """A gallery transformation: a catalog entry with ``transform``, or a transformation directory."""
    entry = catalog.models.get(name)
    if entry is not None:
        return bool(entry.transform)
    return (Path(name) / "fct.json").is_file()


def _fingerprints(ev: Any, ijb_dir: Path) -> dict[str, str]:
    """sha1 of each model's weights (or feature file) and of the set's meta files."""
    out = {}
    for name, m in ev.models.items():
        path = Path(m.get("weights") or m.get("features") or "")
        if path.is_file():
            out[f"model {name}"] = file_sha1(path)
        elif (path / "transform.pt").is_file():
            out[f"model {name}"] = file_sha1(path / "transform.pt")
    for meta_file in sorted((ijb_dir / "meta").glob("*")):
        if meta_file.is_file():
            out[f"data {meta_file.name}"] = file_sha1(meta_file)
    return out


def deployment_parity(catalog: EvalCatalog, ev: Any, candidates: Sequence[str], *, workdir: Path,
                      catalog_source: str, network: str | None, cache_dir: Path | None, device: Any,
                      providers: Sequence[str] | None, log: Log) -> dict:
    """Each candidate as it will be served: a backbone exported to ONNX and run by onnxruntime on the
    evaluation faces (:func:`facecompat.eval.parity.model_parity`: largest cosine deviation from the
    PyTorch features, TAR change per FAR); a gallery transformation (FCT's h) exported and compared
    with :meth:`FCTransform.apply` on the old model's features of those faces. The PyTorch features
    are the evaluation's (cached: nothing is extracted again)."""
    ijb_dir = ijb.find_target_dir(ev.data_root, ev.target)
    faces = read_face_list(ijb_dir, ev.target)
    if len(faces) != ev.meta.num_faces:
        raise CertifyError("--parity: every face of the set must be present (it ran with --allow-missing "
                           "and skipped some)")
    specs = resolve_models(list(candidates), catalog, catalog_source, network)
    out: dict = {}
    for name, spec in specs.items():
        log(f"parity of {name}: ONNX export and onnxruntime on {len(faces)} faces")
        if isinstance(spec, TransformSpec):
            inputs = [spec.old] + ([spec.side] if spec.side is not None else [])
            feats = model_features({s.name: s for s in inputs}, catalog, ijb_dir, ev.target, faces,
                                   cache_dir=cache_dir, device=device, log=log)
            out[name] = transform_parity(FCTransform.load(spec.directory), feats[spec.old.name],
                                         feats[spec.side.name] if spec.side is not None else None, workdir,
                                         name=name, providers=providers)
            continue
        feats = model_features({name: spec}, catalog, ijb_dir, ev.target, faces, cache_dir=cache_dir,
                               device=device, log=log)[name]
        out[name] = model_parity(load_model(spec), name, ijb_dir, faces, ev.meta, np.asarray(feats),
                                 workdir=workdir, providers=providers, torch_pooled=ev.pooled.get(name),
                                 progress=False)
    return out


def store_versions(ev: Any) -> dict[str, str]:
    """Each evaluated model's store version id (:mod:`facecompat.index.store`), so a store can match the
    certificate's pairs by the ids its rows carry; empty for precomputed features (no identity)."""
    out = {}
    for name, m in ev.models.items():
        weights = Path(m.get("weights") or "")
        if m.get("network") == "fct" and weights.is_file():
            out[name] = transform_version_id({"sha1": file_sha1(weights)})
        elif m.get("network") and weights.is_file():
            out[name] = model_version_id({"network": m["network"], "checkpoint_sha1": file_sha1(weights)})
    return out


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats (an operating threshold at +inf) become None."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def certify(catalog: EvalCatalog, *, old: str, candidates: Sequence[str], independent: str | None = None,
            features: Mapping[str, Path] | None = None, out_dir: Path | None = None,
            json_path: Path | None = None, md_path: Path | None = None,
            fars: Sequence[float] = CERTIFICATE_FARS, far: float | None = None, replicates: int = 1000,
            seed: int = 0, data_root: str | Path | None = None, target: str | None = None,
            cache_dir: Path | None = None, catalog_source: str = "the catalog", network: str | None = None,
            allow_missing: bool = False, batch_size: int | None = None, workers: int | None = None,
            device: Any = None, use_faiss: bool = True, parity: bool = False,
            providers: Sequence[str] | None = None, log: Log = print) -> dict | None:
    """Evaluate and certify; the certificate dict on rank 0 (None on the other ranks).

    Args:
        catalog: model catalog and defaults. old: the deployed model. candidates: what may replace it.
        independent: the independently trained new model (update gains; FCT's query model).
        features: ``{name: .npy}`` precomputed face features instead of models (names as above).
        out_dir: where certificate.json, certificate.md and the plots go (None: nothing written but
            ``json_path`` / ``md_path``).
        fars, far: reported FARs and the operating one (default: the smallest resolved).
        replicates, seed: the subject bootstrap.
        parity: export each candidate to ONNX and compare onnxruntime with PyTorch on the evaluation
            faces (:func:`deployment_parity`; models only, not precomputed features); ``providers``:
            onnxruntime's (default its CPU provider; a GPU one for a set of IJB-C's size).
        The rest: as :func:`~facecompat.pipelines.evaluate.evaluate_ijb`.
    Raises:
        UserError (CertifyError, EvalError, ...): one line.
    """
    if old in candidates:
        raise CertifyError(f"--new {old}: the old model is the reference, not a candidate")
    if parity and features is not None:
        raise CertifyError("--parity needs models (it exports them to ONNX), not precomputed features")
    if parity and out_dir is None:
        raise CertifyError("--parity needs --out DIR (the ONNX files are written under DIR/onnx)")
    names = list(dict.fromkeys([old, *candidates, *([independent] if independent else [])]))
    if features is not None:
        missing = [n for n in names if n not in features]
        if missing:
            raise CertifyError(f"no feature file for {', '.join(missing)}")
        features = {n: features[n] for n in names}
    transforms = [n for n in names if _is_transform(n, catalog)]
    cells, cross, after = _cells(names, old, candidates, independent, transforms)
    ev = evaluate_ijb(catalog, names, features=features, cells=cells, old=None, one_to_n=True,
                      data_root=data_root, target=target, cache_dir=cache_dir, catalog_source=catalog_source,
                      network=network, use_faiss=use_faiss, allow_missing=allow_missing,
                      batch_size=batch_size, workers=workers, device=device, keep_pooled=True, log=log)
    if ev is None:
        return None
    figures = certify_cells(ev.meta, ev.pooled, old=old, candidates=candidates, independent=independent,
                            cross_cells=cross, new_cells=after, fars=fars, far=far, replicates=replicates,
                            seed=seed, use_faiss=use_faiss, progress=log)
    ijb_dir = ijb.find_target_dir(ev.data_root, ev.target)
    parity_entry: dict = {"status": "not measured",
                          "reason": "precomputed features" if features is not None else "run with --parity"}
    if parity:
        parity_entry = deployment_parity(catalog, ev, candidates, workdir=out_dir / "onnx",
                                         catalog_source=catalog_source, network=network, cache_dir=cache_dir,
                                         device=device, providers=providers, log=log)
    cert = _clean({"format": FORMAT, "version": VERSION, "target": ev.target, "data_root": ev.data_root,
                   "models": ev.models, "versions": store_versions(ev), **figures, "matrix": ev.results,
                   "skipped": ev.skipped, "parity": parity_entry,
                   "fingerprints": _fingerprints(ev, ijb_dir)})
    write_certificate(cert, ev, out_dir=out_dir, json_path=json_path, md_path=md_path)
    return cert


def write_certificate(cert: dict, ev: Any, *, out_dir: Path | None, json_path: Path | None,
                      md_path: Path | None) -> list[Path]:
    """certificate.json / .md (atomically) and one score plot per candidate (its cross cell beside
    old|old, thresholds at the operating FAR) under ``out_dir``; explicit paths win."""
    written = []
    json_path = json_path or (out_dir / JSON_NAME if out_dir else None)
    md_path = md_path or (out_dir / MD_NAME if out_dir else None)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(json_path, "w") as f:
            json.dump(cert, f, indent=1)
        written.append(json_path)
    if md_path is not None:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(md_path, "w") as f:
            f.write(format_certificate(cert) + "\n")
        written.append(md_path)
    if out_dir is not None:
        far, ref = cert["operating_far"], matrix.cell_key(cert["old"], cert["old"])
        for c in cert["candidates"]:
            keys = [ref, cert["cross_cells"][c]]
            scores = {k: _cell_scores(ev.meta, ev.pooled, *k.split("|")) for k in keys}
            thresholds = {k: cert["cells"][k]["1:1"][far].get("threshold") for k in keys}
            title = f"{c} against the {cert['old']} gallery: scores, FAR {far} thresholds"
            written.append(plot_scores(scores, ev.meta.pair_labels, thresholds, out_dir / f"scores_{c}.png",
                                       title))
    return written


__all__ = ["FORMAT", "JSON_NAME", "MD_NAME", "VERSION", "certify", "write_certificate"]
