#!/usr/bin/env python
"""Search a stored gallery with query features: top-k item ids and cosine scores by a faiss index.

python tools/search_gallery.py --gallery work_dirs/gallery/fct --queries probes.npy \\
    --query-model new -k 5 --out results.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from facecompat.cli import OneLineParser, far_value, output_file, positive_int, run_main
from facecompat.errors import UserError

DEFAULT_CATALOG = Path("configs/eval_ijbc.yaml")

EPILOG = """\
versions (facecompat/index/store.py): the query model (--query-model: a catalog name from --config,
  default configs/eval_ijbc.yaml when it exists, or a run directory / weights file with --network)
  gives the queries' version <network>-<weights sha1[:12]>. Every gallery row must be in that
  space (rows of that model, or rows an FCT transformation mapped into it), or in a space declared
  compatible with it: --declare QUERY=GALLERY (repeatable; each side a version id, a catalog name or
  a model path), e.g. a new model trained with BCT declared compatible with the old model's
  gallery. Anything else stops with one line naming the rows and versions (exit status 2):
  vectors of different versions are never compared silently.
certificates (tools/certify.py): --certificate CERT.json (repeatable) declares every pair its
  decision calls compatible, matched by the version ids it records; a pair it judged incompatible
  or too close to call is refused, naming the decision. --far F (with a certificate) applies that
  pair's score threshold at F (the cross cell's, or the self cell's for a gallery in the query's own
  space): each hit is accepted or rejected (open set: a face whose best hit is rejected is unknown).

index (facecompat/index/gallery.py): cosine = inner product of L2-normalised vectors; --kind flat is
  exact, --kind ivf an IVF index trained on the gallery (--nlist lists, --nprobe searched per
  query; small galleries get fewer lists, or the flat index, with a warning). A GPU is used when
  faiss sees one (--cpu to stay on the CPU).

queries: --queries Q.npy [q, D] float features of the query model (any scale), D = the gallery's.
output: --out JSON {"gallery", "query_model", "query_version", "declared", "index", "k",
  "threshold": {"far", "value", "cell", "certificate"} and "accepted": [[bool ...]] with --far,
  "num_queries", "seconds", "ids": [[...k item ids...] per query], "scores": [[...k cosines...]]};
  the first queries' best matches on stdout. An IVF search reaching fewer than k items pads with
  id -1 and score null.

examples:
  python tools/search_gallery.py --config configs/eval_ijbc_synthetic.yaml --gallery work_dirs/gallery/fct \\
      --queries probes_new.npy --query-model new -k 5 --out results.json
  python tools/search_gallery.py --config configs/eval_ijbc_synthetic.yaml --gallery work_dirs/gallery/old \\
      --queries probes_bct.npy --query-model bct --declare bct=old --kind ivf --nprobe 8 -k 10 --out r.json
"""


class GalleryToolError(UserError, ValueError):
    """Bad input the tool reports in one line (exit status 2)."""


def _declaration(text: str) -> tuple[str, str]:
    query, sep, gallery = text.partition("=")
    if not sep or not query.strip() or not gallery.strip():
        raise argparse.ArgumentTypeError(f"expected QUERY_SPACE=GALLERY_SPACE, got {text!r}")
    return query.strip(), gallery.strip()


def _certified(args: argparse.Namespace, query_version: str, spaces: list[str]) -> tuple[set, dict | None]:
    """(pairs the certificates declare compatible, the threshold entry for --far) for this query and the
    gallery's spaces; GalleryToolError for a pair a certificate judged not compatible."""
    from facecompat.index.certified import pair_for, read_certified_pairs

    pairs = [p for path in args.certificate for p in read_certified_pairs(path)]
    declared = {(p.query, p.gallery) for p in pairs if p.compatible and p.query != p.gallery}
    for space in spaces:
        pair = pair_for(pairs, query_version, space)
        if pair is not None and not pair.compatible:
            raise GalleryToolError(f"--certificate {pair.source}: {pair.candidate} against the {space} "
                                   f"gallery is {pair.decision} at FAR {pair.far} (cell {pair.cell}); "
                                   "not searched")
    if args.far is None:
        return declared, None
    far = format(args.far, "g")  # the certificate's FAR keys
    certified = [pair_for(pairs, query_version, space) for space in spaces]
    if len(spaces) != 1 or certified[0] is None:
        raise GalleryToolError(f"--far {far}: needs one certified pair for the query {query_version} "
                               f"and the gallery's spaces {', '.join(spaces)} (mixed galleries: not yet)")
    pair = certified[0]
    return declared, {"far": far, "value": pair.threshold(far), "cell": pair.cell,
                      "certificate": pair.source}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="search_gallery.py", description=__doc__, epilog=EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gallery", required=True, type=Path, metavar="STORE", help="the gallery feature store")
    p.add_argument("--queries", required=True, type=Path, metavar="NPY", help="[q, D] query features (.npy)")
    p.add_argument("--query-model", required=True, metavar="MODEL",
                   help="the model that embedded the queries (catalog name or path): gives their version")
    p.add_argument("--declare", type=_declaration, action="append", default=[], metavar="QUERY=GALLERY",
                   help="declare a gallery space comparable with a query space (repeatable)")
    p.add_argument("--certificate", type=Path, action="append", default=[], metavar="JSON",
                   help="a certificate.json: its compatible pairs are declared, its thresholds known "
                        "(repeatable)")
    p.add_argument("--far", type=far_value, metavar="F",
                   help="accept hits at the certified pair's threshold for this FAR (needs --certificate)")
    p.add_argument("--config", type=Path, metavar="YAML",
                   help=f"model catalog (default {DEFAULT_CATALOG} when it exists)")
    p.add_argument("--network", help="backbone of a weights-file query model (e.g. r50)")
    p.add_argument("--kind", choices=("flat", "ivf"), default="flat",
                   help="faiss index (default flat: exact)")
    p.add_argument("--nlist", type=positive_int, metavar="N", help="IVF lists (default 4 sqrt(N))")
    p.add_argument("--nprobe", type=positive_int, metavar="N",
                   help="IVF lists searched per query (default 16)")
    p.add_argument("-k", type=positive_int, default=5, metavar="K", help="results per query (default 5)")
    p.add_argument("--cpu", action="store_true", help="search on the CPU even when faiss sees a GPU")
    p.add_argument("--out", required=True, type=output_file, metavar="JSON",
                   help="where to write the results (checked before the search; - prints them instead)")
    return p


def _resolve_version(token: str, known: set[str], catalog, source: str, network: str | None) -> str:
    """A version id: ``token`` itself when the store or query knows it, else a model's version id."""
    from facecompat.eval.catalog import TransformSpec, resolve_model
    from facecompat.index.store import model_version_id

    if token in known:
        return token
    try:
        spec = resolve_model(token, catalog, source, network)
    except (ValueError, OSError) as exc:  # resolve_model's documented bad-input errors
        raise GalleryToolError(f"--declare {token}: not a version id of the query or the gallery "
                               f"({', '.join(sorted(known))}) and not a model ({exc})") from None
    if isinstance(spec, TransformSpec):
        raise GalleryToolError(f"--declare {token}: an FCT transformation; declare the spaces of models")
    return model_version_id(spec.fingerprint())


def _load_queries(path: Path, dim: int):
    import numpy as np

    if not path.is_file():
        raise GalleryToolError(f"--queries {path}: not found")
    try:
        queries = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise GalleryToolError(f"--queries {path}: not a readable .npy file ({exc})") from None
    if queries.ndim != 2 or not np.issubdtype(queries.dtype, np.floating) or queries.shape[1] != dim:
        raise GalleryToolError(f"--queries {path}: expected float [q, {dim}] (the gallery is {dim}-d), got "
                               f"{queries.dtype} {tuple(queries.shape)}")
    if queries.shape[0] == 0:
        raise GalleryToolError(f"--queries {path}: no queries")
    return queries


def search(args: argparse.Namespace) -> dict:
    """Resolve versions, check compatibility, build the index, search, return the results."""
    import numpy as np

    from facecompat.eval.catalog import TransformSpec, load_catalog, resolve_model
    from facecompat.index.gallery import GalleryIndex
    from facecompat.index.store import FeatureStore, model_version_id

    catalog_path = args.config or (DEFAULT_CATALOG if DEFAULT_CATALOG.is_file() else None)
    catalog = load_catalog(catalog_path)
    source = str(catalog_path) if catalog_path else "the default catalog (no --config)"
    store = FeatureStore.open(args.gallery)
    if store.num_items == 0:
        raise GalleryToolError(f"--gallery {args.gallery}: the store is empty")
    if args.k > store.num_items:
        raise GalleryToolError(f"-k {args.k}: the gallery has only {store.num_items} items")
    queries = _load_queries(args.queries, store.dim)
    try:
        spec = resolve_model(args.query_model, catalog, source, args.network)
    except UserError as exc:  # name the flag the model came from
        raise GalleryToolError(f"--query-model: {exc}") from None
    if isinstance(spec, TransformSpec):
        raise GalleryToolError(f"--query-model {args.query_model}: an FCT transformation; queries are "
                               "embedded by a model (the new one)")
    query_version = model_version_id(spec.fingerprint())
    known = set(store.spaces()) | {v["id"] for v in store.versions} | {query_version}
    by_certificate, threshold = _certified(args, query_version, sorted(store.spaces()))
    declared = sorted(by_certificate | {(_resolve_version(q, known, catalog, source, args.network),
                                         _resolve_version(g, known, catalog, source, args.network))
                                        for q, g in args.declare})
    start = time.perf_counter()
    try:
        index = GalleryIndex.from_store(store, query_version, declared, kind=args.kind, nlist=args.nlist,
                                        nprobe=args.nprobe, use_gpu=False if args.cpu else None)
    except UserError:  # IncompatibleError: rows of a version the queries cannot be compared with
        raise
    except ImportError as exc:  # no faiss installed
        raise GalleryToolError(str(exc)) from None
    except ValueError as exc:  # the gallery's rows (a zero vector, ...): from_store's bad-data errors
        raise GalleryToolError(f"--gallery {args.gallery}: {exc}") from None
    built = time.perf_counter() - start
    try:
        scores, ids = index.search(np.asarray(queries), args.k)
    except ValueError as exc:  # a NaN or zero query row
        raise GalleryToolError(f"--queries {args.queries}: {exc}") from None
    seconds = time.perf_counter() - start
    extra = {} if threshold is None else {"threshold": threshold,
                                          "accepted": (scores >= threshold["value"]).tolist()}
    return {**extra, "gallery": str(store.path), "gallery_versions": store.version_counts(),
            "query_model": spec.source, "query_version": query_version,
            "declared": [list(p) for p in declared],
            "index": {"kind": index.kind, "nlist": index.nlist, "nprobe": index.nprobe, "gpu": index.use_gpu},
            "k": args.k, "num_queries": int(queries.shape[0]), "num_items": store.num_items,
            "build_seconds": round(built, 4), "seconds": round(seconds, 4), "ids": ids.tolist(),
            "scores": [[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in scores]}


def report(out: dict, rows: int = 5) -> str:
    index = out["index"]
    kind = index["kind"]
    if kind == "ivf":
        kind += f" (nlist {index['nlist']}, nprobe {index['nprobe']})"
    lines = [f"{out['num_queries']} queries ({out['query_version']}) against {out['num_items']} items of "
             f"{out['gallery']}: {kind}{' on GPU' if index['gpu'] else ''}, {out['seconds']:.3f} s",
             "  query  top-" + str(out["k"]) + " (id: cosine)"]
    for q in range(min(rows, out["num_queries"])):
        hits = ", ".join(f"{i}: {s:.3f}" if s is not None else f"{i}: -"
                         for i, s in zip(out["ids"][q], out["scores"][q]))
        lines.append(f"  {q:5d}  {hits}")
    if out["num_queries"] > rows:
        lines.append(f"  ... {out['num_queries'] - rows} more")
    if "threshold" in out:
        t = out["threshold"]
        known = sum(row[0] for row in out["accepted"])
        lines.append(f"  threshold {t['value']:.4f} (cell {t['cell']} at FAR {t['far']}, "
                     f"{t['certificate']}): {known} of {out['num_queries']} queries matched, "
                     f"{out['num_queries'] - known} unknown")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from facecompat.cli import write_json

    if args.far is not None and not args.certificate:
        raise GalleryToolError(f"--far {args.far:g}: needs --certificate (the threshold is the "
                               "certified pair's)")
    out = search(args)
    write_json(out, args.out)
    if str(args.out) != "-":
        print(report(out))
        print(f"results: {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main("search_gallery.py", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
